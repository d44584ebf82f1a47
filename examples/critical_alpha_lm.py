"""Critical alpha on a tiny language model: the estimator's prediction against what K = 2 members do.

Data: two groups answer the same questions with different letters (question i: group A says ``LETTERS[2i]``, group
B ``LETTERS[2i + 1]``), every prompt in both groups, so the data conflict 50/50 prompt by prompt ("q3:" -> "g" or
"h"). Model: a one-layer Llama of width 128 (initializer_range 0.1: a frozen head reaches confident logits), LoRA on
``down_proj``, at two ranks:

- rank 8 can put 1/2 on each answer of every question: the conflict is represented (well specified), alpha* ~ 1;
- rank 2 cannot serve six questions' twelve letters at once: misspecified, alpha* well below 1.

For each rank the script (a) fits one adapter (K = 1) to a minimum of mean NLL plus the training prior (full-batch
Adam, then L-BFGS in float64: the sweep below starts from these tensors, so the script fits them itself; on an adapter
you trained, ``renyi-lora critical-alpha`` runs that L-BFGS step for you), (b) estimates alpha* there with
``renyi_lora.stability.critical.estimate_critical_alpha`` (``refine=False``: the point is already the fit) and
(c) trains K = 2 ensembles with ``RenyiTrainer`` over a sweep of alpha:

- from the fit: both members at the fitted adapter plus relative noise 1e-3, 600 Adam steps at 1e-4 (the local
  question alpha* answers: does the perturbation grow or decay?). At 3e-3 Adam's steps of about the learning rate in
  directions of tiny curvature carry even a single adapter off its minimum within 300 steps, into a region where V
  is no longer positive definite, and the members then separate below alpha*;
- from a fresh start: B = 0, each member its own A, 300 Adam steps at 3e-3 (the practical question).

It measures how far apart the two members end up, from their completion log-likelihoods ``L [2, N]``:

- gap: root mean square of ``L[0, b] - L[1, b]`` in nats (0 for identical members);
- example sharpness: mean over examples of ``max_k softmax_k L[k, b]``, the mixture posterior (0.5 for identical
  members, 1 when every example is owned by one member);
- group purity: that posterior averaged per group under the better one-to-one assignment of the groups to the
  members (0.5: no split by group). With one answer per example nothing ties a group's answers across prompts, so
  purity stays near 0.5 even when members specialise (docs/specialisation.md).

Run from the repository root (about 3 minutes on one CPU core):

    .venv/bin/python examples/critical_alpha_lm.py

It prints a table per rank and writes docs/images/critical_alpha_lm.png (``--output`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import string
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback

from renyi_lora.data.sft import SFTCollator, TokenizedDataset, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble
from renyi_lora.stability.critical import completion_loglik_fn, estimate_critical_alpha, make_batches
from renyi_lora.stability.lanczos import StabilityResult
from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer

ALPHAS = [0.0, 0.2, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.5, 4.0]
TICKS = [0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 4.0]
LETTERS = string.ascii_lowercase
PRIOR_WEIGHT = 1e-4  # the training default (prior_std 1), used by the fit, alpha* and the sweeps alike


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII with ``<pad>`` (0) and ``<eos>`` (1)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.add_special_tokens(["<pad>", "<eos>"])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token=None)


def make_model(vocab_size: int, seed: int, hidden_size: int = 128, num_layers: int = 1) -> LlamaForCausalLM:
    """A tiny random Llama with eager attention (``torch.func`` needs it), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1, pad_token_id=0, eos_token_id=1, bos_token_id=None, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def adapter_config(num_members: int, rank: int, seed: int) -> EnsembleConfig:
    """LoRA of rank ``rank`` (scaling 2) on ``down_proj`` only."""
    return EnsembleConfig(num_members=num_members, rank=rank, lora_alpha=2.0 * rank, target_modules=["down_proj"],
                          init_seed=seed)


def conflict_records(num_questions: int, answers_per_example: int) -> list[dict]:
    """Every prompt in both groups: question i is answered ``LETTERS[2i]`` by group A and ``LETTERS[2i + 1]`` by B.

    One answer per example: each question once per group. Several: question i with the questions at a fixed
    offset after it (``i, i + o, i + 2o, ...`` mod ``num_questions``), for every offset that gives distinct ones.
    """
    if not 1 <= answers_per_example <= num_questions <= len(LETTERS) // 2:
        raise ValueError(f"need 1 <= answers_per_example <= num_questions <= 13; got {answers_per_example}, "
                         f"{num_questions}")
    offsets = [0] if answers_per_example == 1 else range(1, num_questions)
    records = []
    for question in range(num_questions):
        for offset in offsets:
            asked = [(question + k * offset) % num_questions for k in range(answers_per_example)]
            if len(set(asked)) < answers_per_example:
                continue
            for group, shift in (("A", 0), ("B", 1)):
                completion = ",".join(LETTERS[2 * q + shift] for q in asked)
                records.append({"prompt": ",".join(f"q{q}" for q in asked) + ":",
                                "completion": completion + ("." if answers_per_example > 1 else ""), "group": group})
    return records


def mean_nll(ensemble: LoraEnsemble, batches: list[dict], prior_curvature: float) -> torch.Tensor:
    """The K = 1 training objective: mean completion NLL plus ``prior_curvature / 2 * ||theta||^2``.

    Computed by ``completion_loglik_fn`` on the live parameters, which keeps the model's dtype (the chunked
    ``likelihoods.token_logliks`` rounds log-probabilities to float32, too coarse for L-BFGS to reach a minimum).
    """
    loglik_fn = completion_loglik_fn(ensemble)
    params = {name: value for name, value in ensemble.named_parameters() if value.requires_grad}
    total = sum(loglik_fn(params, batch).sum() for batch in batches)
    count = sum(batch["input_ids"].shape[0] for batch in batches)
    return -total / count + 0.5 * prior_curvature * sum(value.pow(2).sum() for value in params.values())


def fit_single_adapter(ensemble: LoraEnsemble, batches: list[dict], prior_curvature: float, adam_steps: int = 300,
                       lbfgs_steps: int = 1000, learning_rate: float = 3e-3) -> float:
    """Fit a K = 1 ensemble in place to a minimum of ``mean_nll``: full-batch Adam, then L-BFGS in float64.

    Returns:
        The final gradient norm (the ensemble is left in float64).
    """
    parameters = ensemble.lora_parameters()
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    for _ in range(adam_steps):
        optimizer.zero_grad()
        mean_nll(ensemble, batches, prior_curvature).backward()
        optimizer.step()
    ensemble.double()
    lbfgs = torch.optim.LBFGS(parameters, lr=1, max_iter=lbfgs_steps, history_size=50, tolerance_grad=1e-9,
                              tolerance_change=0, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = mean_nll(ensemble, batches, prior_curvature)
        loss.backward()
        return loss

    lbfgs.step(closure)
    closure()
    return math.sqrt(sum(p.grad.pow(2).sum().item() for p in parameters))


def member_loglik(ensemble: LoraEnsemble, dataset: TokenizedDataset) -> torch.Tensor:
    """Each member's completion log-likelihood of every example, ``L [K, N]``."""
    batch = SFTCollator(0)(dataset.examples)
    with torch.no_grad():
        token = ensemble.eval()(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])  # [K, N, T]
    return token.sum(-1)


def separation(ensemble: LoraEnsemble, dataset: TokenizedDataset) -> dict[str, float]:
    """How far apart the two members of ``ensemble`` are on ``dataset``.

    Returns:
        ``gap``: root mean square over examples of ``L[0, b] - L[1, b]`` (nats; 0 for identical members);
        ``sharpness``: mean over examples of ``max_k softmax_k L[k, b]`` (the mixture posterior: 0.5 for identical
        members, 1 when every example is owned by one member);
        ``purity``: that posterior averaged per group, under the better one-to-one assignment of the two groups to
        the two members (0.5: no split by group, 1: each group owned by its own member).
    """
    loglik = member_loglik(ensemble, dataset)  # [2, N]
    posterior = loglik.softmax(0)  # [2, N]
    group = torch.tensor([example["group"] for example in dataset.examples])  # [N]
    routing = torch.stack([posterior[:, group == g].mean(1) for g in range(len(dataset.group_names))])  # [G, 2]
    return {
        "gap": (loglik[0] - loglik[1]).pow(2).mean().sqrt().item(),
        "sharpness": posterior.max(0).values.mean().item(),
        "purity": max(routing.diagonal().mean(), routing.flip(1).diagonal().mean()).item(),
    }


def make_pair(vocab_size: int, rank: int, seed: int, start: dict[str, torch.Tensor] | None = None,
              perturbation: float = 1e-2) -> LoraEnsemble:
    """Two members on a fresh tiny model. ``start``: adapter tensors of a K = 1 fit (``name -> [1, ...]``); both
    members start there, plus Gaussian noise of relative size ``perturbation``. None: a fresh start (B = 0, each
    member its own A)."""
    ensemble = LoraEnsemble(make_model(vocab_size, seed), adapter_config(2, rank, seed))
    if start is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in ensemble.named_parameters():
                if name in start:
                    value = start[name].to(parameter).expand_as(parameter)  # [2, ...]
                    noise = torch.randn(parameter.shape, generator=generator).to(parameter)
                    parameter.copy_(value + perturbation * value.std() * noise)
    return ensemble


def train_pair(ensemble: LoraEnsemble, dataset: TokenizedDataset, alpha: float, steps: int, prior_weight: float,
               seed: int, output_dir: str, learning_rate: float = 3e-3) -> LoraEnsemble:
    """Train the two members with ``RenyiTrainer``: AdamW at a constant ``learning_rate``, batch 16 (the whole set),
    the Gaussian prior."""
    config = ensemble.ensemble_config
    args = RenyiConfig(
        output_dir=output_dir, alpha=alpha, num_members=2, rank=config.rank, lora_alpha=config.lora_alpha,
        target_modules=config.target_modules, max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="constant", per_device_train_batch_size=16, seed=seed, prior_weight=prior_weight,
        alpha_warmup_steps=0,  # the stability of this alpha from a perturbed fit, not an annealed path to it
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10_000, use_cpu=True,
    )
    trainer = RenyiTrainer(model=ensemble, args=args, group_names=dataset.group_names, train_dataset=dataset,
                           data_collator=SFTCollator(0))
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dump per run
    trainer.train()
    return ensemble


def critical_alpha_at_fit(dataset: TokenizedDataset, tokenizer, rank: int, prior_weight: float, seed: int,
                          workdir: Path) -> tuple[StabilityResult, float, dict[str, torch.Tensor]]:
    """Fit one rank-``rank`` adapter on ``dataset``, save it, and estimate alpha* there (float64, with the prior).

    Returns:
        ``(result, gradient norm at the fit, the fitted adapter's tensors name -> [1, ...])``.
    """
    ensemble = LoraEnsemble(make_model(len(tokenizer), seed), adapter_config(1, rank, seed))
    batches = make_batches(dataset, tokenizer.pad_token_id, batch_size=len(dataset))
    gradient_norm = fit_single_adapter(ensemble, batches, prior_weight)
    folder = workdir / f"single_rank{rank}"
    ensemble.save_pretrained(folder)
    fitted = {name: value.detach().clone() for name, value in ensemble.named_parameters() if "lora_" in name}
    result = estimate_critical_alpha(  # refine=False: alpha* at exactly the tensors the sweep starts from
        make_model(len(tokenizer), seed), tokenizer, dataset, folder, max_examples=None, batch_size=len(dataset),
        prior_weight=prior_weight, refine=False, dtype=torch.float64, seed=seed, progress=False, num_eigenvalues=1,
        tol=1e-3,
    )
    return result, gradient_norm, fitted


def first_alpha(alphas: list[float], flags: list[bool]) -> float:
    """The first alpha from which every larger alpha on the grid is flagged (nan if the last one is not)."""
    return next((alpha for i, alpha in enumerate(alphas) if all(flags[i:])), math.nan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/images/critical_alpha_lm.png"))
    parser.add_argument("--num-questions", type=int, default=6)
    parser.add_argument("--answers-per-example", type=int, default=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 2], help="LoRA rank of each run")
    parser.add_argument("--prior-weight", type=float, default=PRIOR_WEIGHT)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each fresh K = 2 ensemble")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam learning rate from a fresh start")
    parser.add_argument("--fit-steps", type=int, default=600, help="training steps from the perturbed fit")
    parser.add_argument("--fit-learning-rate", type=float, default=1e-4,
                        help="Adam learning rate from the fit (3e-3 jitters it off the minimum, see the docs)")
    parser.add_argument("--perturbation", type=float, default=1e-3, help="relative noise on the fitted members")
    parser.add_argument("--threshold", type=float, default=0.75, help="example sharpness that counts as specialised")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = make_tokenizer()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(args.ranks)
    figure, axes = plt.subplots(2, columns, figsize=(5.5 * columns, 7.0), sharex=True, squeeze=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "conflict.jsonl"
        records = conflict_records(args.num_questions, args.answers_per_example)
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        dataset = load_sft_dataset(path, tokenizer, max_length=64)
        print(f"{len(records)} examples ({args.num_questions} questions x 2 groups, {args.answers_per_example} "
              f"answer(s) each), e.g. {records[0]} and {records[1]}; prior_weight {args.prior_weight:g}")
        for column, rank in enumerate(args.ranks):
            started = time.time()
            result, gradient_norm, fitted = critical_alpha_at_fit(dataset, tokenizer, rank, args.prior_weight,
                                                                  args.seed, workdir)
            initial = separation(make_pair(len(tokenizer), rank, args.seed, fitted, args.perturbation), dataset)["gap"]
            print(f"\nrank {rank}: single adapter fitted to gradient norm {gradient_norm:.1e}; alpha* = "
                  f"{result.alpha_star:.4f} (lambda_max {result.eigenvalues[0]:.4f}, {result.iterations} Lanczos "
                  f"steps, {time.time() - started:.0f} s); perturbed start: gap {initial:.3g} nats")
            print(f"  {'alpha':>6} | from the fit: {'gap':>8} {'sharpness':>9} {'purity':>6} | fresh start: "
                  f"{'gap':>8} {'sharpness':>9} {'purity':>6}")
            rows: dict[str, list[float]] = {}
            for alpha in args.alphas:
                line = f"  {alpha:6.2f} |"
                for label, start, steps, learning_rate in (("fit", fitted, args.fit_steps, args.fit_learning_rate),
                                                           ("fresh", None, args.steps, args.learning_rate)):
                    pair = make_pair(len(tokenizer), rank, args.seed, start, args.perturbation)
                    train_pair(pair, dataset, alpha, steps, args.prior_weight, args.seed, str(workdir / "out"),
                               learning_rate)
                    for key, value in separation(pair, dataset).items():
                        rows.setdefault(f"{label} {key}", []).append(value)
                    line += " " * 14 + " ".join(f"{rows[f'{label} {key}'][-1]:{width}.3g}"
                                                for key, width in (("gap", 8), ("sharpness", 9), ("purity", 6))) + " |"
                print(line.rstrip(" |"), flush=True)
            grows = first_alpha(args.alphas, [gap > initial for gap in rows["fit gap"]])
            specialised = {
                label: first_alpha(args.alphas, [value > args.threshold for value in rows[f"{label} sharpness"]])
                for label in ("fit", "fresh")
            }
            print(f"  predicted alpha* {result.alpha_star:.3g}; the perturbation grows from alpha {grows:.3g} on; "
                  f"sharpness > {args.threshold} from alpha {specialised['fit']:.3g} (from the fit), "
                  f"{specialised['fresh']:.3g} (fresh start); {time.time() - started:.0f} s")

            top, bottom = axes[0, column], axes[1, column]
            top.plot(args.alphas, rows["fit gap"], "o-", color="tab:orange",
                     label=f"from the fit (+{args.perturbation:g} relative noise), {args.fit_steps} steps")
            top.plot(args.alphas, rows["fresh gap"], "o-", color="tab:blue", label=f"fresh start, {args.steps} steps")
            top.axhline(initial, color="tab:orange", linestyle="--", linewidth=0.8, label="gap of the perturbed start")
            top.set_yscale("log")
            top.set_title(f"rank {rank}: members' log-likelihood gap after training")
            bottom.plot(args.alphas, rows["fit sharpness"], "o-", color="tab:orange", label="sharpness, from the fit")
            bottom.plot(args.alphas, rows["fresh sharpness"], "o-", color="tab:blue", label="sharpness, fresh start")
            bottom.plot(args.alphas, rows["fit purity"], "x--", color="tab:orange", alpha=0.6,
                        label="group purity, from the fit")
            bottom.plot(args.alphas, rows["fresh purity"], "x--", color="tab:blue", alpha=0.6,
                        label="group purity, fresh start")
            bottom.set_xlabel("alpha")
            bottom.set_title(f"rank {rank}: routing (mixture posterior)")
            for axis in (top, bottom):
                axis.axvline(result.alpha_star, color="black", linestyle=":", label=f"alpha* = {result.alpha_star:.3g}")
                axis.set_xscale("symlog", linthresh=1.0, linscale=2.0)  # linear on [0, 1], logarithmic above
                axis.set_xticks(TICKS, [f"{tick:g}" for tick in TICKS])
    axes[0, 0].set_ylabel("RMS gap of L[0, b] - L[1, b] (nats)")
    axes[1, 0].set_ylabel("member responsibility")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    figure.suptitle(f"Tiny Llama, LoRA on down_proj, {args.answers_per_example} conflicting answer(s) per example: "
                    "two members against alpha")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
