"""Where the time of one SFT step goes, and what the output head's checkpoint costs.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_step.py --model smollm2 --members 4   # ~3 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_step.py --model tiny --members 4
    add --quick to skip the profiler tables (head timings only)

1. torch.profiler tables (one warm-up step, one profiled step) for ours at K=1 and K and for the PEFT Renyi
   loop at K: the operators with the largest self CPU time, and the share of matrix multiplies.
2. The output head alone, forward + backward of ``likelihoods.target_logprobs`` on the K*B*T/2 completion rows,
   interleaved: the library's checkpointed chunks (head matmul run 3 times: forward, recompute, backward),
   the same without the checkpoint (2 matmuls, but the ``[N, V]`` float32 logits are kept for backward), and a
   sketch of a fix, ``fused_target_logprobs`` below (2 matmuls, keeps only ``[N, H]``).
"""

from __future__ import annotations

import argparse

import common
import torch
from torch.profiler import ProfilerActivity, profile

import renyi_lora.likelihoods as likelihoods

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear")


def profile_case(name: str, step, rows: int) -> None:
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"### {name}: {total / 1e6:.2f} s self CPU, matrix multiplies {matmul / total:.0%}\n")
    print("```")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
    print("```\n", flush=True)


def checkpointed_chunks(hidden, head, targets, chunk_size: int = 1024) -> torch.Tensor:
    """The fallback path of ``likelihoods.target_logprobs`` (a head with a bias or trainable weights)."""
    return torch.cat([likelihoods.checkpoint(likelihoods._chunk_logprobs, hidden[i:i + chunk_size], head.weight,
                                             head.bias, targets[i:i + chunk_size], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk_size)])


def without_checkpoint(hidden, head, targets, chunk_size: int = 1024) -> torch.Tensor:
    """Plain autograd through each chunk: its ``[chunk, V]`` logits stay alive until backward."""
    return torch.cat([likelihoods._chunk_logprobs(hidden[i:i + chunk_size], head.weight, head.bias,
                                                  targets[i:i + chunk_size])
                      for i in range(0, hidden.shape[0], chunk_size)])


def head_timings(base, chosen: common.Setting, members: int) -> None:
    head = base.get_output_embeddings()
    rows = members * chosen.batch * (chosen.length // 2)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, head.in_features, generator=generator).requires_grad_(True)
    targets = torch.randint(0, head.out_features, (rows,), generator=generator)
    upstream = torch.randn(rows, generator=generator)
    variants = {"library (fused gradient)": likelihoods.target_logprobs,
                "checkpointed chunks (fallback)": checkpointed_chunks,
                "no checkpoint (logits kept)": without_checkpoint}
    grads = {}
    for name, function in variants.items():
        hidden.grad = None
        (function(hidden, head, targets) * upstream).sum().backward()
        grads[name] = hidden.grad.clone()
    for name, grad in grads.items():
        error = (grad - grads["library (fused gradient)"]).abs().max().item()
        if error > 1e-4:
            raise RuntimeError(f"{name}: gradient differs from the library's by {error}")

    def case(function):
        def run():
            hidden.grad = None
            (function(hidden, head, targets) * upstream).sum().backward()
        return run

    times = common.run_interleaved({name: case(f) for name, f in variants.items()}, 1, 2 * chosen.rounds + 1,
                                   chosen.steps, progress=False).wall
    library = times["library (fused gradient)"]
    print(f"### Output head alone: forward + backward on N = K*B*T/2 = {rows} rows, V = {head.out_features}, "
          f"H = {head.in_features}; gradients checked equal\n")
    kept = {"library (fused gradient)": f"d log p / d h [N, H]: {rows * head.in_features * 4 / 2**20:.1f} MB",
            "checkpointed chunks (fallback)": "chunk's hidden [1024, H]",
            "no checkpoint (logits kept)": f"logits [N, V] float32: {rows * head.out_features * 4 / 2**20:.0f} MB"}
    rows_out = [[name, common.ms(values), common.paired_ratio(values, library), kept[name]]
                for name, values in times.items()]
    print(common.markdown_table(["variant", "fwd + bwd (ms)", "/ library", "kept for backward"], rows_out))
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per table")
    known, rest = parser.parse_known_args()
    args = common.parse_args(__doc__, rest)
    chosen = common.resolve_setting(args)
    K = known.members
    common.print_header(f"Profile of one SFT step, K={K}", chosen,
                        f"B={chosen.batch}, T={chosen.length}, LoRA q_proj, v_proj r={common.RANK}")
    base, _ = common.load_base(chosen.model)
    head_timings(base, chosen, K)
    if args.quick:
        return
    batch = common.sft_batch(base.config.vocab_size, chosen.batch, chosen.length)
    for members in (1, K):
        ensemble = common.make_ensemble(base, members)
        optimizer = common.adamw(ensemble.lora_parameters())
        profile_case(f"ours K={members}", lambda e=ensemble, o=optimizer: common.ours_sft_step(e, o, batch), known.rows)
    peft_model = common.make_peft(base, K)
    names = common.adapter_names(K)
    optimizer = common.adamw(common.peft_parameters(peft_model, names))
    profile_case(f"PEFT K graphs + 1 Renyi backward, K={K}",
                 lambda: common.peft_sft_step(peft_model, names, optimizer, batch, renyi=True), known.rows)


if __name__ == "__main__":
    main()
