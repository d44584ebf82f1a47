"""Member chunks and gradient checkpointing: peak resident memory and step time of RenyiTrainer SFT steps.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_chunks.py --model smollm2   # ~12 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_chunks.py --model tiny
    add --quick for K = 4 only and two training steps per configuration

For K in {1, 4, 8}, ``--member_chunk_size`` c in {K, 2, 1} and ``--gradient_checkpointing`` off / on, each
configuration trains in its own subprocess (``--child``) through the real ``RenyiTrainer`` (the two-pass chunked
step when c < K), so that ``ru_maxrss`` is that configuration's own peak. "loaded" is the peak after the model,
adapters and optimiser exist and every weight was read once; "rise" = peak - loaded is what training adds
(activations kept for backward, gradients, AdamW state). Step time is the median over the steps after the first.
Targets (issue 8): with c = 1 the K = 8 peak is at most 1.5 x the K = 1 peak; chunking costs < 1.5 x the
all-at-once step.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import common
import torch
from transformers import TrainerCallback

from renyi_lora.data.sft import SFTCollator
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def configurations(quick: bool) -> list[tuple[int, int, bool]]:
    """``(K, c, gradient checkpointing)``, K = 1 first (the reference of every ratio)."""
    members = [4] if quick else [4, 8]
    configs = [(1, 1, False), (1, 1, True)]
    for K in members:
        for chunk in dict.fromkeys([K, 2, 1]):
            configs += [(K, chunk, False), (K, chunk, True)]
    return configs


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def child(K: int, chunk: int, checkpointing: bool, chosen: common.Setting, steps: int) -> dict:
    base, _ = common.load_base(chosen.model)
    batch = common.sft_batch(base.config.vocab_size, chosen.batch * steps, chosen.length)
    examples = [{"input_ids": ids.tolist(), "labels": labels.tolist(), "group": -1}
                for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]
    with tempfile.TemporaryDirectory() as output_dir:
        config = RenyiConfig(
            output_dir=output_dir, num_members=K, rank=common.RANK, lora_alpha=common.LORA_ALPHA,
            target_modules=common.QV, alpha=1.0, member_chunk_size=chunk if chunk < K else None,
            gradient_checkpointing=checkpointing, per_device_train_batch_size=chosen.batch, max_steps=steps,
            learning_rate=common.LEARNING_RATE, report_to="none", use_cpu=True, save_strategy="no",
            disable_tqdm=True, logging_strategy="no", seed=0,
        )
        ensemble = LoraEnsemble(base, config.ensemble_config())
        timer = StepTimer()
        trainer = RenyiTrainer(model=ensemble, args=config, train_dataset=examples,
                               data_collator=SFTCollator(pad_token_id=0), callbacks=[timer])
        with torch.no_grad():  # page the weights in (from_pretrained maps the safetensors file lazily)
            touched = sum(float(p.sum()) for p in base.parameters())
        loaded = peak_mb()
        trainer.train()
    return {"K": K, "chunk": chunk, "checkpointing": checkpointing, "loaded": loaded, "peak": peak_mb(),
            "step": statistics.median(timer.seconds[1:] or timer.seconds), "touched": touched}


def main() -> None:
    argv = sys.argv[1:]
    if "--child" in argv:
        index = argv.index("--child")
        K, chunk, checkpointing = json.loads(argv[index + 1])
        args = common.parse_args(__doc__, argv[:index] + argv[index + 2:])
        chosen = common.resolve_setting(args)
        print(json.dumps(child(K, chunk, checkpointing, chosen, 2 if args.quick else 3)))
        return
    args = common.parse_args(__doc__)
    chosen = common.resolve_setting(args)
    steps = 2 if args.quick else 3
    common.print_header("Member chunks and gradient checkpointing: peak RSS and step time (RenyiTrainer SFT)",
                        chosen, f"B={chosen.batch} per member, T={chosen.length} (completion = second half), LoRA "
                        f"q_proj, v_proj r={common.RANK}; {steps} training steps per configuration, each "
                        "configuration in a fresh process, run one after another")
    results = []
    for K, chunk, checkpointing in configurations(args.quick):
        command = [sys.executable, __file__, *argv, "--child", json.dumps([K, chunk, checkpointing])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  K={K} c={chunk} checkpointing={checkpointing}: peak {r['peak']:.0f} MB, step {r['step']:.2f} s",
              file=sys.stderr, flush=True)
    single = {r["checkpointing"]: r for r in results if r["K"] == 1}
    whole = {(r["K"], r["checkpointing"]): r for r in results if r["chunk"] == r["K"]}
    rows = []
    for r in results:
        one, all_at_once = single[r["checkpointing"]], whole[(r["K"], r["checkpointing"])]
        rows.append([
            str(r["K"]), str(r["chunk"]), "on" if r["checkpointing"] else "off", f"{r['loaded']:.0f}",
            f"{r['peak']:.0f}", f"{r['peak'] - r['loaded']:.0f}", f"{r['peak'] / one['peak']:.2f}",
            f"{r['step']:.3g}", f"{r['step'] / all_at_once['step']:.2f}", f"{r['step'] / (r['K'] * one['step']):.2f}",
        ])
    print("Memory in MB (ru_maxrss of the configuration's own process); ratios against the K = 1 run and the "
          "all-at-once (c = K) run with the same checkpointing setting. Targets: K=8, c=1 peak / K=1 peak <= 1.5; "
          "step / all-at-once step < 1.5.\n")
    print(common.markdown_table(["K", "chunk c", "checkpointing", "loaded", "peak", "rise", "peak / K=1 peak",
                                 "step (s)", "step / (c = K step)", "step / (K x K=1 step)"], rows))


if __name__ == "__main__":
    main()
