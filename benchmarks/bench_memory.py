"""Peak resident memory of SFT training: K=8 versus K=1 members at the same per-member batch, each in a fresh process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory.py --model smollm2   # ~8 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_memory.py --model tiny
    add --quick for one training step per configuration instead of two

Every configuration runs in its own subprocess (``--child NAME``), which loads the model, builds the adapters
and the optimiser, reads every weight once (``from_pretrained`` maps the file lazily, so the weights would
otherwise enter the resident set during the first step), records ``ru_maxrss`` ("loaded"), runs the training
steps of ``bench_sft`` and reports the process's peak ``ru_maxrss``. The rise (peak - loaded) is the training
memory: activations kept for backward, gradients, AdamW state. "Parameters held" counts the base model once
plus the K adapters (ours and PEFT both share one base), against K full model copies (K separate fine-tuned
models, each with its adapter).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import common
import torch

MEMBERS = 8
# name -> (library, K, LoRA on the top-N layers only (None = all layers), option)
CONFIGS = {
    "ours K=1": ("ours", 1, None, None),
    "ours K=8": ("ours", MEMBERS, None, None),
    "ours K=8, top layers (shared trunk)": ("ours", MEMBERS, "top", None),
    "ours K=8, top layers, trunk off": ("ours", MEMBERS, "top", "trunk off"),
    "PEFT K=1": ("peft", 1, None, None),
    "PEFT K=8, K graphs + 1 Renyi backward": ("peft", MEMBERS, None, "renyi"),
    "PEFT K=8, plain loop (backward per adapter)": ("peft", MEMBERS, None, "loop"),
}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(name: str, chosen: common.Setting, steps: int) -> dict:
    library, K, top, option = CONFIGS[name]
    base, _ = common.load_base(chosen.model)
    batch = common.sft_batch(base.config.vocab_size, chosen.batch, chosen.length)
    layers = common.top_layers(base, chosen.top_layers) if top else None
    if library == "ours":
        ensemble = common.make_ensemble(base, K, layers=layers, shared_trunk=option != "trunk off")
        adapters = ensemble.lora_parameters()
        optimizer = common.adamw(adapters)

        def step():
            common.ours_sft_step(ensemble, optimizer, batch)
    else:
        model = common.make_peft(base, K, layers=layers)
        names = common.adapter_names(K)
        adapters = common.peft_parameters(model, names)
        optimizer = common.adamw(adapters)

        def step():
            common.peft_sft_step(model, names, optimizer, batch, renyi=option != "loop")

    with torch.no_grad():  # page the weights in (from_pretrained maps the safetensors file lazily)
        touched = sum(float(p.sum()) for p in base.parameters())
    loaded = peak_mb()
    for _ in range(steps):
        step()
    base_params = sum(p.numel() for p in base.parameters())
    adapter_params = sum(p.numel() for p in adapters)
    return {"loaded": loaded, "peak": peak_mb(), "K": K, "base": base_params, "adapters": adapter_params,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, "touched": touched,
            "top_layers": common.top_layers(base, chosen.top_layers)}


def main() -> None:
    parser_args = sys.argv[1:]
    if "--child" in parser_args:
        index = parser_args.index("--child")
        name = parser_args[index + 1]
        args = common.parse_args(__doc__, parser_args[:index] + parser_args[index + 2:])
        chosen = common.resolve_setting(args)
        print(json.dumps(child(name, chosen, 1 if args.quick else 2)))
        return
    args = common.parse_args(__doc__)
    chosen = common.resolve_setting(args)
    common.print_header("Peak RSS of SFT training, one fresh process per configuration", chosen,
                        f"{1 if args.quick else 2} training step(s) per configuration")
    results = {}
    for name in CONFIGS:
        output = subprocess.run([sys.executable, __file__, *parser_args, "--child", name], check=True,
                                capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(f"  {name}: {results[name]['peak']:.0f} MB", file=sys.stderr, flush=True)
    layers = results["ours K=1"]["top_layers"]
    print(f"SFT step of bench_sft (alpha = 1), B = {chosen.batch} per member, T = {chosen.length}, LoRA q_proj, v_proj "
          f"r = {common.RANK}; top layers = {layers}. Memory in MB (ru_maxrss).\n")
    single = results["ours K=1"]
    rows = []
    for name, r in results.items():
        rise = r["peak"] - r["loaded"]
        copies = r["K"] * (r["base"] + r["adapters"] / r["K"])
        rows.append([
            name, f"{r['loaded']:.0f}", f"{r['peak']:.0f}", f"{rise:.0f}",
            f"{rise / (single['peak'] - single['loaded']):.2f}", f"{(r['base'] + r['adapters']) / 1e6:.2f}",
            f"{copies / 1e6:.2f}", f"{r['minor_faults'] / 1e3:.0f}",
        ])
    print(common.markdown_table(["configuration", "loaded", "peak", "rise", "rise / rise of ours K=1",
                                 "params held, base once + K adapters (M)", "K full copies (M)",
                                 "minor page faults (thousands)"], rows))


if __name__ == "__main__":
    main()
