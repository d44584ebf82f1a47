"""SFT step time with the ensemble forward compiled by inductor (``--torch_compile``) against eager.

One step = forward + backward + AdamW step on B examples per member (completion = second half of T), as in
``bench_sft.py``. The compiled case wraps the ensemble in ``torch.compile`` as the Trainer's ``--torch_compile``
does: the forward (member log-likelihoods, which under compile run the output head on every position, see
``likelihoods.token_logliks``) is compiled, ``routed_loss``, backward and AdamW run as usual.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compile.py                       # SmolLM2, ~8 min loaded
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_compile.py --model tiny --rounds 5
    add --all_linear for LoRA on every linear layer, --every_position for a third case: eager with the head on
    every position (the compiled graph's arithmetic, without the compiler)

Both ensembles share the frozen base weights; the first call of the compiled one compiles it (timed apart, not in
the ratios), then every case gets the warm-up steps and the interleaved timed rounds of ``common.run_interleaved``.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import common
import torch

from renyi_lora.likelihoods import IGNORE_INDEX


@contextmanager
def every_position():
    """Run ``token_logliks``'s compile path eagerly (the head on every position, fixed shapes)."""
    original = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*common.RANDOM_CONFIGS, "smollm2"], default="smollm2")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--all_linear", action="store_true", help="LoRA on every linear layer (default q, v)")
    parser.add_argument("--every_position", action="store_true", help="add eager with the head on every position")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    common.parse_args(__doc__, [])  # threads, seed, quiet logging
    chosen = common.setting(args.model, quick=False)
    chosen.warmup, chosen.rounds, chosen.steps = args.warmup, args.rounds, 1
    targets = common.ALL_LINEAR if args.all_linear else common.QV
    load = os.getloadavg()[0]  # before this run's own work
    base, _ = common.load_base(chosen.model)
    batch = common.sft_batch(base.config.vocab_size, chosen.batch, chosen.length)
    common.print_header("SFT step: inductor-compiled ensemble forward vs eager", chosen,
                        f"K={args.members}, B={chosen.batch}, T={chosen.length} (completion = second half), LoRA "
                        f"{'all-linear' if args.all_linear else 'q_proj, v_proj'} r={common.RANK}, "
                        f"lora_alpha={common.LORA_ALPHA:g}; {common.timing_line(chosen)}")

    eager = common.make_ensemble(base, args.members, targets)
    compiled_ensemble = common.make_ensemble(base, args.members, targets)
    compiled = torch.compile(compiled_ensemble)
    optimizers = {name: common.adamw(e.lora_parameters()) for name, e in (("eager", eager),
                                                                          ("inductor", compiled_ensemble))}
    start, start_cpu = time.perf_counter(), time.process_time()
    token = compiled(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    token.sum().backward()  # compiles the forward and the backward graph
    compile_wall, compile_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    compiled_ensemble.zero_grad(set_to_none=True)
    with torch.no_grad():
        difference = (token.detach() - eager(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]))
    targets_count = int((batch["labels"] != IGNORE_INDEX).sum())

    cases = {
        "eager": lambda: common.ours_sft_step(eager, optimizers["eager"], batch),
        "inductor": lambda: common.ours_sft_step(compiled, optimizers["inductor"], batch),
    }
    if args.every_position:
        every = common.make_ensemble(base, args.members, targets)
        optimizers["every"] = common.adamw(every.lora_parameters())

        def eager_every_position() -> None:
            with every_position():
                common.ours_sft_step(every, optimizers["every"], batch)

        cases["eager, head on every position"] = eager_every_position
    timings = common.run_interleaved(cases, chosen.warmup, chosen.rounds, chosen.steps)

    print(f"- load average (1 min) before the run: {load:.1f} on {os.cpu_count()} cores"
          + (": the machine was under load from other jobs; absolute times are inflated, the interleaved ratios "
             "hold better (process CPU time is the steadier clock)" if load > 1 else ""))
    print(f"- compiling (first forward + backward): {compile_wall:.0f} s wall, {compile_cpu:.0f} s CPU of this process "
          "(inductor compiles kernels in worker processes too); "
          f"max |compiled - eager| member log-likelihood over {args.members} x {targets_count} target tokens at "
          f"step 0: {difference.abs().max().item():.2g} nats\n")
    for clock, times in timings.clocks().items():
        print(f"### {clock}\n\nMilliseconds per step (median over rounds, spread = (max - min) / median); "
              "ratios: median [min-max] of per-round ratios.\n")
        rows = [[name, common.ms(values), common.spread(values), common.paired_ratio(values, times["eager"])]
                for name, values in times.items()]
        print(common.markdown_table(["case", "step (ms)", "spread", "case / eager"], rows))
        print()


if __name__ == "__main__":
    main()
