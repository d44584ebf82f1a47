"""Dead members on long completions: what they cost per step, and whether they still happen (issue #19).

Real long completions: GSS respondents (``make quality-data`` builds ``benchmarks/quality/data/survey_gss_train.jsonl``:
seven abortion items, about 100 completion tokens each). SmolLM2-135M, K = 4, LoRA on every linear layer of the top 8
layers (the set-up in which the collapse was reported).

Part 1, the cost of one training step (forward, backward, AdamW), cases interleaved:
- healthy: the members' own routing (about 1/K each at the start);
- dead, before: members 1-3 trail member 0 by 80-100 nats (as in the reported run), so their responsibilities are
  1e-35 to 1e-44 and the products with them in the backward pass are subnormal floats
  (``objective.NEGLIGIBLE_WEIGHT = 0``, the old behaviour);
- dead, now: the same routing, with negligible responsibilities giving exact-zero gradients.

Part 2 (``--train_steps N``), the reported scenario end to end: ``RenyiTrainer`` with alpha = 1, the default warm-up,
batch 8, lr 2e-3, once with the default flags (dead members revived) and once with ``revive_threshold=0`` (as before
the fix): per logging window the effective number of members, the smallest member share, the members' NLL and the
seconds per step.

    python benchmarks/bench_collapse.py                     # part 1 (a few minutes)
    python benchmarks/bench_collapse.py --train_steps 60    # and part 2
    python benchmarks/bench_collapse.py --rounds 0 --train_steps 60    # part 2 alone
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_base, make_ensemble, markdown_table, ms, paired_ratio, run_interleaved, top_layers
from renyi_lora import objective
from renyi_lora.config import RenyiConfig
from renyi_lora.data.sft import SFTCollator, load_sft_dataset
from renyi_lora.likelihoods import IGNORE_INDEX, sequence_loglik
from renyi_lora.training.trainer import RenyiTrainer

DATA = Path(__file__).resolve().parent / "quality" / "data" / "survey_gss_train.jsonl"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_cost(base, tokenizer, dataset, rounds: int) -> None:
    ensemble = make_ensemble(base, 4, ALL_LINEAR, top_layers(base, 8))
    optimizer = torch.optim.AdamW(ensemble.lora_parameters(), lr=2e-3)
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    batch.pop("group", None)
    # [K, 1] nats behind member 0, as in the reported run (dead members' NLL 99-131 against 22): responsibilities
    # e^-80 ~ 2e-35 (normal), e^-95 ~ 5e-42 and e^-100 ~ 4e-44 (subnormal themselves).
    trailing = torch.tensor([0.0, 80.0, 95.0, 100.0])[:, None]
    subnormals, counted = {}, [0]
    tiny = torch.finfo(torch.float32).tiny

    def count(module, grad_input, grad_output) -> None:  # gradients of attention and MLP outputs
        counted[0] += sum(int(((g != 0) & (g.abs() < tiny)).sum()) for g in grad_output if g is not None)

    for name, module in ensemble.named_modules():
        if name.endswith((".mlp", ".self_attn")):
            module.register_full_backward_hook(count)

    def step(name: str, offset: torch.Tensor, negligible: float) -> None:
        objective.NEGLIGIBLE_WEIGHT, saved = negligible, objective.NEGLIGIBLE_WEIGHT
        try:
            optimizer.zero_grad(set_to_none=True)
            counted[0] = 0
            token = ensemble(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])  # [K, B, T]
            loglik = sequence_loglik(token, batch["labels"])  # [K, B]
            # Member k trails member 0 by exactly offset[k] whatever the steps so far did (gradients still flow to all).
            loglik = loglik - (loglik - loglik[:1]).detach() - offset
            loss, _ = objective.renyi_loss(loglik, 1.0)
            loss.backward()
            subnormals[name] = counted[0]
            optimizer.step()
        finally:
            objective.NEGLIGIBLE_WEIGHT = saved

    cases = {"healthy routing": lambda: step("healthy routing", torch.zeros(4, 1), saved_negligible),
             "dead members, before": lambda: step("dead members, before", trailing, 0.0),
             "dead members, now": lambda: step("dead members, now", trailing, saved_negligible)}
    saved_negligible = objective.NEGLIGIBLE_WEIGHT
    tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    print(f"## Part 1: one training step, K = 4, batch 8 GSS respondents ({tokens} completion tokens), top 8 layers\n")
    timings = run_interleaved(cases, warmup=1, rounds=rounds)
    rows = [[name, ms(timings.wall[name]), ms(timings.cpu[name]),
             paired_ratio(timings.cpu[name], timings.cpu["healthy routing"]), str(subnormals[name])]
            for name in cases]
    print(markdown_table(["case", "wall ms", "CPU ms", "CPU vs healthy", "subnormal activation gradients"], rows))
    print()


def scenario(tokenizer, steps: int, **flags) -> list[list[str]]:
    base, _ = load_base("smollm2")
    dataset = load_sft_dataset(DATA, tokenizer, max_length=256)
    with tempfile.TemporaryDirectory() as out:
        args = RenyiConfig(output_dir=out, num_members=4, alpha=1.0, target_modules=ALL_LINEAR,
                           layers_to_transform=list(range(22, 30)), per_device_train_batch_size=8,
                           learning_rate=2e-3, max_steps=steps, logging_steps=10, seed=0, use_cpu=True,
                           report_to="none", save_strategy="no", disable_tqdm=True, **flags)
        trainer = RenyiTrainer(model=base, args=args, processing_class=tokenizer, train_dataset=dataset)
        started, rows, last = time.perf_counter(), [], 0
        trainer.train()
        elapsed = time.perf_counter() - started
    for entry in trainer.state.log_history:
        if "routing/effective_members" not in entry:
            continue
        members = [entry[f"member_{k}/nll"] for k in range(4)]
        shares = [sum(entry.get(f"routing/{g}/member_{k}", 0) for g in trainer.group_names) / len(trainer.group_names)
                  for k in range(4)]
        rows.append([str(entry["step"]), f"{entry.get('renyi/alpha', 1.0):.2f}",
                     f"{entry['routing/effective_members']:.3f}", f"{min(shares):.2g}",
                     " / ".join(f"{x:.0f}" for x in members)])
        last = entry["step"]
    revived = [entry["step"] for entry in trainer.state.log_history if "revived" in entry]
    rows.append([f"{last} steps", "", "", "", f"{elapsed / max(last, 1):.2f} s/step; revivals at steps {revived}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="Part 1's interleaved rounds (0 = skip part 1).")
    parser.add_argument("--train_steps", type=int, default=0, help="Part 2's steps per run (0 = skip part 2).")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.is_file():
        sys.exit(f"{DATA} not found: run `make quality-data` first")
    torch.manual_seed(0)
    base, tokenizer = load_base("smollm2")
    dataset = load_sft_dataset(DATA, tokenizer, max_length=256)
    print(f"# Dead members on long completions (SmolLM2-135M, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    if args.rounds:
        step_cost(base, tokenizer, dataset, args.rounds)
    if args.train_steps:
        headers = ["step", "alpha", "effective members", "smallest share", "member NLL (nats)"]
        for title, flags in (("default flags (revival)", {}), ("revive_threshold=0 (before the fix)",
                                                                {"revive_threshold": 0.0})):
            print(f"## Part 2: {title}\n")
            print(markdown_table(headers, scenario(tokenizer, args.train_steps, **flags)))
            print()


if __name__ == "__main__":
    main()
