"""SFT step time: our K-member ensemble versus K x our K=1 step and versus the PEFT set_adapter loop.

One step = forward + backward + AdamW step on B examples per member (completion = second half of T).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py --model tiny      # ~1 min (--model small: ~2 min)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft.py --model smollm2   # ~6 min on an idle 2-core VM
    add --quick for a smoke run (fewer members and rounds)

Cases, all in one process, interleaved per round (see ``common.run_interleaved``):

- ``ours K``: one forward over K*B rows (``LoraEnsemble(..., labels=...)``), ``routed_loss`` (alpha = 1), one
  backward, AdamW.
- ``PEFT Renyi K``: K adapters on one PeftModel, per adapter ``set_adapter`` + requires_grad re-enabled on all
  adapters + a forward keeping its graph; then one backward of ``renyi_loss`` over the K log-likelihoods (the
  same objective as ours) and one AdamW step. The log-likelihood is what a PEFT user writes: the model's full
  logits and a float32 cross-entropy.
- ``PEFT loop K``: the plain loop, one forward and one backward of ``-mean L_k`` per adapter (the alpha = 0
  objective; same cost, less memory).
- all-linear LoRA at K=4; the shared trunk (LoRA only on the top layers) with the trunk on and forced off.
"""

from __future__ import annotations

import common


def ours_case(base, members, batch, **kwargs):
    ensemble = common.make_ensemble(base, members, **kwargs)
    optimizer = common.adamw(ensemble.lora_parameters())
    return lambda: common.ours_sft_step(ensemble, optimizer, batch), ensemble


def peft_case(model, members, batch, renyi):
    names = common.adapter_names(members)
    optimizer = common.adamw(common.peft_parameters(model, names))
    return lambda: common.peft_sft_step(model, names, optimizer, batch, renyi=renyi)


def build_cases(base, chosen: common.Setting, batch) -> tuple[dict, dict]:
    cases, info = {}, {}
    peft_model = common.make_peft(base, max(chosen.members))
    for K in chosen.members:
        cases[f"ours K={K}"], _ = ours_case(base, K, batch)
        cases[f"PEFT Renyi K={K}"] = peft_case(peft_model, K, batch, renyi=True)
        if K > 1:
            cases[f"PEFT loop K={K}"] = peft_case(peft_model, K, batch, renyi=False)
    cases["ours K=1 all-linear"], _ = ours_case(base, 1, batch, targets=common.ALL_LINEAR)
    cases["ours K=4 all-linear"], _ = ours_case(base, 4, batch, targets=common.ALL_LINEAR)
    peft_all = common.make_peft(base, 4, targets=common.PEFT_ALL_LINEAR)
    cases["PEFT Renyi K=4 all-linear"] = peft_case(peft_all, 4, batch, renyi=True)
    layers = common.top_layers(base, chosen.top_layers)
    cases["ours K=4 top layers"], shared = ours_case(base, 4, batch, layers=layers)
    cases["ours K=4 top layers, trunk off"], _ = ours_case(base, 4, batch, layers=layers, shared_trunk=False)
    info["layers"], info["shared_trunk_layers"] = layers, shared.shared_trunk_layers
    return cases, info


def report(clock: str, times: dict[str, list[float]], chosen: common.Setting, info: dict) -> None:
    single = times["ours K=1"]
    headers = ["K", "ours (ms)", "spread", "K x ours K=1 (ms)", "ours / (K x single)",
               "PEFT K graphs + 1 Renyi backward (ms)", "PEFT Renyi / ours", "PEFT plain loop (ms)",
               "PEFT loop / ours"]
    rows = []
    for K in chosen.members:
        ours, renyi, loop = times[f"ours K={K}"], times[f"PEFT Renyi K={K}"], times.get(f"PEFT loop K={K}")
        rows.append([
            str(K), common.ms(ours), common.spread(ours), f"{1000 * K * common.median(single):.1f}",
            common.paired_ratio(ours, single, K), common.ms(renyi), common.paired_ratio(renyi, ours),
            common.ms(loop) if loop else "-", common.paired_ratio(loop, ours) if loop else "-",
        ])
    print(f"### {clock}\n\nLoRA on q_proj, v_proj. Times in ms of {clock}; ratios: median [min-max] of per-round "
          "ratios. Targets: ours / (K x single) <= 1.05 at K=4; PEFT / ours >= 2 (tiny), >= 1.3 (SmolLM2).\n")
    print(common.markdown_table(headers, rows))

    comparisons = [
        ("all-linear K=4: ours / (4 x ours K=1 all-linear)", "ours K=4 all-linear", "ours K=1 all-linear", 4),
        ("all-linear K=4: PEFT Renyi / ours", "PEFT Renyi K=4 all-linear", "ours K=4 all-linear", 1),
        (f"shared trunk, LoRA on layers {info['layers']} ({info['shared_trunk_layers']} shared), K=4: "
         "trunk on / trunk off", "ours K=4 top layers", "ours K=4 top layers, trunk off", 1),
        ("top layers K=4 (trunk on) / all layers q,v K=4", "ours K=4 top layers", "ours K=4", 1),
    ]
    rows = [[label, common.ms(times[a]), common.ms(times[b]), str(scale),
             common.paired_ratio(times[a], times[b], scale)] for label, a, b, scale in comparisons]
    print()
    print(common.markdown_table(["comparison", "A (ms)", "B (ms)", "scale", "A / (scale x B)"], rows))
    print()


def main() -> None:
    args = common.parse_args(__doc__)
    chosen = common.resolve_setting(args)
    common.print_header("SFT step: ours vs K x single vs PEFT set_adapter loop", chosen)
    base, _ = common.load_base(chosen.model)
    batch = common.sft_batch(base.config.vocab_size, chosen.batch, chosen.length)
    cases, info = build_cases(base, chosen, batch)
    timings = common.run_interleaved(cases, chosen.warmup, chosen.rounds, chosen.steps)
    for clock, times in timings.clocks().items():
        report(clock, times, chosen, info)


if __name__ == "__main__":
    main()
