"""Multiple-choice scoring with K=4 members (no grad): ours versus PEFT mixed-batch inference and a set_adapter loop.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scoring.py --model tiny      # ~4 min
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scoring.py --model smollm2   # ~4 min
    add --quick for a smoke run

One call scores every choice of every item with every member: the sequence log-likelihood of each choice
(the second half of the T tokens), in minibatches of M sequences.

- ours: the library's multiple-choice scorer (``scoring.shared_prompt_logliks``, what ``renyi-lora eval`` runs):
  each item's prompt once over K rows, its choices continued from the KV cache.
- ours, full rows: ``LoraEnsemble(input_ids, attention_mask, labels=labels)`` over the K*M (prompt + choice) rows
  -> ``[K, M, T]``, summed (the prompt recomputed for every choice, as the PEFT cases do).
- PEFT mixed batch: the M rows repeated once per adapter in one batch with ``adapter_names=[m0]*M + [m1]*M ...``
  (PEFT's mixed-adapter inference), then the full logits and a float32 cross-entropy.
- PEFT mixed batch, head on the completion only: the same with ``logits_to_keep`` = completion length + 1, so
  that PEFT, like ours, runs the output head only where it is needed (isolates the batching from the head).
- PEFT loop: ``set_adapter(k)`` and one forward of the M rows per adapter.
"""

from __future__ import annotations

import common
import torch

from renyi_lora.evaluation.scoring import shared_prompt_logliks

MEMBERS = 4
CHOICES = 4


def scoring_shapes(model: str, quick: bool) -> tuple[int, int, int]:
    """``(items, T, minibatch M)``."""
    if model != "smollm2":
        return (16 if quick else 64), 64, 64
    return (2 if quick else 4), 64, 16


def choice_batches(vocab: int, items: int, length: int, minibatch: int) -> list[dict[str, torch.Tensor]]:
    """Every item's CHOICES sequences (same prompt, different second half), cut into minibatches."""
    generator = torch.Generator().manual_seed(0)
    half = length // 2
    prompts = torch.randint(2, vocab, (items, 1, half), generator=generator).expand(-1, CHOICES, -1)
    answers = torch.randint(2, vocab, (items, CHOICES, length - half), generator=generator)
    input_ids = torch.cat([prompts, answers], dim=-1).reshape(items * CHOICES, length)
    labels = input_ids.clone()
    labels[:, :half] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}
            for ids, lab in zip(input_ids.split(minibatch), labels.split(minibatch), strict=True)]


def shared_prompt_batches(batches: list[dict[str, torch.Tensor]]) -> list[tuple[list, list]]:
    """The same minibatches as ``(prompts, choices per prompt)`` token lists (each item's CHOICES rows are
    consecutive and share the first half)."""
    out = []
    for b in batches:
        ids, half = b["input_ids"], int((b["labels"][0] == -100).sum())
        prompts = ids[::CHOICES, :half].tolist()
        choices = [ids[i:i + CHOICES, half:].tolist() for i in range(0, len(ids), CHOICES)]
        out.append((prompts, choices))
    return out


def score_ours(ensemble, shared_batches) -> torch.Tensor:
    scores = [torch.cat(shared_prompt_logliks(ensemble, prompts, choices, pad_token_id=0), dim=1)
              for prompts, choices in shared_batches]
    return torch.cat(scores, dim=1)  # [K, N]


@torch.no_grad()
def score_ours_full_rows(ensemble, batches) -> torch.Tensor:
    scores = [ensemble(b["input_ids"], b["attention_mask"], labels=b["labels"]).sum(-1) for b in batches]
    return torch.cat(scores, dim=1)  # [K, N]


@torch.no_grad()
def score_peft_mixed(model, names, batches, head_on_completion: bool) -> torch.Tensor:
    scores = []
    for b in batches:
        M, T = b["input_ids"].shape
        keep = int((b["labels"] != -100).sum(-1).max()) + 1 if head_on_completion else 0  # 0 = every position
        repeated = {key: value.repeat(len(names), 1) for key, value in b.items()}
        logits = model(input_ids=repeated["input_ids"], attention_mask=repeated["attention_mask"], use_cache=False,
                       adapter_names=[name for name in names for _ in range(M)], logits_to_keep=keep).logits
        scores.append(common.logits_sequence_loglik(logits, repeated["labels"][:, T - logits.shape[1]:]).view(-1, M))
    return torch.cat(scores, dim=1)  # [K, N]


@torch.no_grad()
def score_peft_loop(model, names, batches) -> torch.Tensor:
    scores = []
    for name in names:
        model.set_adapter(name)
        scores.append(torch.cat([common.peft_sequence_loglik(model, b) for b in batches]))
    return torch.stack(scores)  # [K, N]


def randomise_lora_b(ensemble, peft_model, names) -> None:
    """Non-zero, identical members on both sides, so that the scores can be checked equal."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, layer in ensemble.lora_layers().items():
            layer.lora_B.normal_(0, 0.02, generator=generator)
            peft_layer = peft_model.base_model.model.get_submodule(module_name)
            for k, name in enumerate(names):
                peft_layer.lora_A[name].weight.copy_(layer.lora_A[k])
                peft_layer.lora_B[name].weight.copy_(layer.lora_B[k])


def main() -> None:
    args = common.parse_args(__doc__)
    chosen = common.resolve_setting(args)
    items, length, minibatch = scoring_shapes(chosen.model, args.quick)
    chosen.steps = min(chosen.steps, 2)  # a pass is already K x the SFT batch, forward only
    common.print_header("Scoring: ours vs PEFT mixed-batch adapter_names vs PEFT set_adapter loop", chosen,
                        f"{chosen.warmup} warm-up + {chosen.rounds} timed rounds x {chosen.steps} passes per case, "
                        "cases interleaved")
    base, _ = common.load_base(chosen.model)
    batches = choice_batches(base.config.vocab_size, items, length, minibatch)
    ensemble = common.make_ensemble(base, MEMBERS).eval()
    names = common.adapter_names(MEMBERS)
    peft_model = common.make_peft(base, MEMBERS).eval()
    randomise_lora_b(ensemble, peft_model, names)
    shared_batches = shared_prompt_batches(batches)
    reference, difference = score_ours(ensemble, shared_batches), 0.0
    for other in (score_peft_mixed(peft_model, names, batches, False), score_peft_loop(peft_model, names, batches),
                  score_ours_full_rows(ensemble, batches)):
        difference = max(difference, (other.double() - reference).abs().max().item())
    if difference > 1e-3 * reference.abs().max().item():
        raise RuntimeError(f"the cases disagree on the scores: max abs difference {difference}")
    cases = {
        "ours": lambda: score_ours(ensemble, shared_batches),
        "ours, full rows": lambda: score_ours_full_rows(ensemble, batches),
        "PEFT mixed batch": lambda: score_peft_mixed(peft_model, names, batches, False),
        "PEFT mixed batch, head on completion": lambda: score_peft_mixed(peft_model, names, batches, True),
        "PEFT set_adapter loop": lambda: score_peft_loop(peft_model, names, batches),
    }
    timings = common.run_interleaved(cases, chosen.warmup, chosen.rounds, chosen.steps)
    print(f"K = {MEMBERS} members, {items} items x {CHOICES} choices = {items * CHOICES} sequences of T = {length} "
          f"(choice = second half), minibatch M = {minibatch} sequences ({MEMBERS * minibatch} rows); LoRA q_proj, "
          f"v_proj; scores of all cases checked equal (max abs diff {difference:.1e}). Ratios: median [min-max] of "
          "per-round ratios; target: PEFT / ours >= 1.3.\n")
    for clock, times in timings.clocks().items():
        ours = times["ours"]
        rows = [[name, common.ms(values), common.spread(values), common.paired_ratio(values, ours)]
                for name, values in times.items()]
        print(f"### {clock}\n")
        print(common.markdown_table(["case", "time per pass (ms)", "spread", "case / ours"], rows))
        print()


if __name__ == "__main__":
    main()
