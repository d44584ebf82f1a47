"""Quality benchmark on real data: is the posterior worth having?

Rows, side by side on one base model, the same data and the same optimizer steps and tokens per member: the base
model; one LoRA of rank r; one LoRA of rank r x K (parameter-matched); a deep ensemble of K LoRAs trained
independently with different seeds (scored through ``load_adapter_mixture`` from their PEFT exports, as a user's own
adapters would be); renyi-lora K members at several alpha, with and without alpha warm-up, and variants (a randomised
prior). Every row trains through ``RenyiTrainer`` and is scored by ``evaluate_multiple_choice`` on the validation split
(for choosing settings), the test split, and held-out out-of-distribution items (AUROC of each uncertainty score).

LoRA sits on the top ``--top_layers`` layers only, so the frozen layers below compute the same hidden states for a
sequence in every row: ``trunk.TrunkStates`` computes them once (cached on disk) and every row trains and evaluates
on a truncated copy of the model. Usage (after ``make quality-data``):

    python -m benchmarks.quality.run --task mmlu --quick          # <= 10 min on 2 CPU cores
    python -m benchmarks.quality.run --task mmlu                  # the full table
    python -m benchmarks.quality.run --task survey --quick        # survey respondents (benchmarks.quality.survey_run)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from benchmarks.quality import survey_run
from benchmarks.quality.arguments import ROOT, ModelArguments
from benchmarks.quality.trunk import TrunkStates, truncated_model
from renyi_lora.data.sft import SFTCollator, load_sft_dataset
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble, load_adapter_mixture
from renyi_lora.evaluation.inference import encode_prompt
from renyi_lora.evaluation.multiple_choice import (
    encode_choices,
    evaluate_multiple_choice,
    load_multiple_choice,
    ood_detection,
)
from renyi_lora.evaluation.plots import mi_histogram, reliability_diagram, risk_coverage_plot, routing_heatmap
from renyi_lora.io import export_peft
from renyi_lora.models import load_model_and_tokenizer
from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer
from renyi_lora.uncertainty import risk_coverage_curve


@dataclass
class QualityArguments(ModelArguments):
    task: str = field(default="mmlu", metadata={"help": "Data set prefix in --data_dir: <task>_train.jsonl (SFT), "
                      "<task>_val_mc.jsonl, <task>_test_mc.jsonl, <task>_ood_mc.jsonl (multiple choice)."})
    data_dir: str | None = field(default=None, metadata={"help": "Built by make quality-data (default: "
                                 "benchmarks/quality/data, or its quick/ folder with --quick)."})
    ood_file: str | None = field(default=None, metadata={"help": "Out-of-distribution items in --data_dir (default "
                                 "<task>_ood_mc.jsonl; e.g. piqa_mc.jsonl for BoolQ)."})
    quick: bool = field(default=False, metadata={"help": "The <= 10 minute version: the quick data, one seed, the "
                        "main rows."})
    rows: list[str] | None = field(default=None, metadata={"help": "Rows to run (default: all for the mode)."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds (default: 0 with --quick, "
                                    "else 0 1 2)."})
    top_layers: int = field(default=4, metadata={"help": "LoRA on the top N decoder layers (all linear modules)."})
    epochs: float = 2.0
    batch_size: int = 16
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate of every row (3e-4: the single "
                                 "adapter's best validation NLL on analogies among 1e-4, 3e-4, 1e-3)."})
    alpha_warmup_ratio: float = field(default=0.3, metadata={"help": "Warm-up length of the '+ warm-up' rows, as a "
                                      "fraction of the steps."})
    init_lora_b_std: float = field(default=0.1, metadata={"help": "Std of B's random start in the 'prior' rows (0.1: "
                                   "best validation NLL with the most member diversity among 0.05, 0.1, 0.3, 1)."})
    max_items: int | None = field(default=None, metadata={"help": "Cap on items per evaluation split."})


@dataclass(frozen=True)
class Row:
    """One method: how many members, rank, objective order, warm-up, random B start, independent training."""

    name: str
    num_members: int = 1
    rank_factor: int = 1
    alpha: float = 1.0
    warmup: bool = False
    prior: bool = False
    independent: bool = False  # a deep ensemble: K single runs with their own seeds and data order
    base: bool = False
    mc_dropout: bool = False  # one adapter trained with LoRA dropout, K dropout masks at evaluation
    text_loss: bool = False  # every token is a target (the prompt too), as with TRL's completion_only_loss=False


def all_rows(k: int) -> list[Row]:
    rows = [Row("base model", base=True), Row("LoRA r"), Row(f"LoRA r x {k}", rank_factor=k),
            Row(f"LoRA r + MC dropout x{k}", num_members=k, mc_dropout=True),
            Row(f"deep ensemble K={k}", num_members=k, independent=True)]
    for alpha in (0.0, 0.5, 0.8, 1.0, 2.0):
        rows.append(Row(f"renyi K={k} a={alpha:g}", num_members=k, alpha=alpha))
        if alpha > 0:
            rows.append(Row(f"renyi K={k} a={alpha:g} + warm-up", num_members=k, alpha=alpha, warmup=True))
    rows += [Row(f"renyi K={k} a=1 + prior", num_members=k, prior=True),
             Row(f"deep ensemble K={k} + prior", num_members=k, independent=True, prior=True),
             Row(f"renyi K={k} a=1 + prior + text loss", num_members=k, prior=True, text_loss=True),
             Row(f"deep ensemble K={k} + prior + text loss", num_members=k, independent=True, prior=True,
                 text_loss=True)]
    return rows


QUICK_ROWS = ("base model", "LoRA r", "LoRA r x {k}", "LoRA r + MC dropout x{k}", "deep ensemble K={k}",
              "renyi K={k} a=0", "renyi K={k} a=1", "renyi K={k} a=1 + prior")


MC_DROPOUT = 0.1  # LoRA dropout of the MC-dropout row, in training and at evaluation
FIGURE_ROWS = ("LoRA r", "deep ensemble K={k}", "renyi K={k} a=1 + prior")


class Benchmark:
    def __init__(self, args: QualityArguments, splits: tuple[str, ...] = ("val", "test", "ood")) -> None:
        self.args = args
        data = Path(args.data_dir or ROOT / "benchmarks/quality/data" / ("quick" if args.quick else ""))
        self.model, self.tokenizer = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
        self.model.eval()
        self.pad = self.tokenizer.pad_token_id
        self.train_data = load_sft_dataset(data / f"{args.task}_train.jsonl", self.tokenizer, max_length=512)
        self.splits = {}
        for split in splits:
            name = args.ood_file if split == "ood" and args.ood_file else f"{args.task}_{split}_mc.jsonl"
            items = load_multiple_choice(data / name)
            if args.max_items is not None and len(items) > args.max_items:
                items = random.Random(0).sample(items, args.max_items)
            self.splits[split] = items
        num_layers = self.model.config.num_hidden_layers
        self.first_layer = num_layers - args.top_layers
        self.trunk = self._trunk_states()
        self.steps = math.ceil(args.epochs * len(self.train_data) / args.batch_size)

    def _trunk_states(self) -> TrunkStates:
        """Hidden states entering the first adapted layer for every training row, prompt and choice row."""
        sequences = [tuple(e["input_ids"]) for e in self.train_data.examples]
        for items in self.splits.values():
            sequences += [tuple(encode_prompt(self.tokenizer, item.prompt)[0]) for item in items]
            # A one-token choice is served by its prompt's states (the last token of a row needs none).
            sequences += [tuple(p + c[:-1]) for p, c in encode_choices(self.tokenizer, items) if len(c) > 1]
        key = hashlib.sha256(json.dumps([self.args.model, self.first_layer, sorted(set(sequences))]).encode())
        path = Path(self.args.cache_dir) / f"trunk-{key.hexdigest()[:16]}.pt"
        trunk = TrunkStates(self.model, self.first_layer, self.pad)
        if path.is_file():
            trunk.states = torch.load(path)
            print(f"trunk states: {len(trunk.states)} sequences from {path}", flush=True)
            return trunk
        start = time.perf_counter()
        trunk.add(sequences)
        print(f"trunk states: {len(trunk.states)} sequences in {time.perf_counter() - start:.0f} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trunk.states, path)
        return trunk

    def fresh_model(self):
        return truncated_model(self.trunk)

    def train(self, row: Row, seed: int, num_members: int, callbacks: tuple = (), **overrides) -> LoraEnsemble:
        """Train ``row``'s adapters for ``self.steps`` steps; ``overrides`` replace ``RenyiConfig`` fields (e.g. the
        learning-rate schedule) and ``callbacks`` (``TrainerCallback``) watch the run."""
        args = self.args
        with tempfile.TemporaryDirectory() as output_dir:
            config = RenyiConfig(**{**dict(
                output_dir=output_dir, max_steps=self.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, logging_strategy="no", save_strategy="no", report_to=[],
                disable_tqdm=True, seed=seed, num_members=num_members, rank=args.rank * row.rank_factor,
                lora_alpha=2.0 * args.rank * row.rank_factor, target_modules=["all-linear"], alpha=row.alpha,
                alpha_warmup_steps=round(args.alpha_warmup_ratio * self.steps) if row.warmup else 0,
                init_lora_b_std=args.init_lora_b_std if row.prior else 0.0,
                lora_dropout=MC_DROPOUT if row.mc_dropout else 0.0, use_cpu=True), **overrides})
            ensemble = LoraEnsemble(self.fresh_model(), config.ensemble_config())
            data = self.train_data
            if row.text_loss:
                data = copy.copy(data)
                data.examples = [{**e, "labels": list(e["input_ids"])} for e in data.examples]
            trainer = RenyiTrainer(model=ensemble, args=config, group_names=data.group_names, train_dataset=data,
                                   data_collator=SFTCollator(self.pad), callbacks=list(callbacks))
            trainer.train()
        return ensemble.eval()

    def build(self, row: Row, seed: int) -> LoraEnsemble:
        if row.base:
            return LoraEnsemble(self.fresh_model(), EnsembleConfig(num_members=1))
        if row.mc_dropout:  # the trained adapter copied into K members; each member row draws its own mask
            single = self.train(row, seed, 1)
            config = EnsembleConfig(**{**asdict(single.ensemble_config), "num_members": row.num_members})
            ensemble = LoraEnsemble(self.fresh_model(), config).eval()
            with torch.no_grad():
                for name, layer in ensemble.lora_layers().items():
                    layer.lora_A.copy_(single.lora_layers()[name].lora_A.expand_as(layer.lora_A))
                    layer.lora_B.copy_(single.lora_layers()[name].lora_B.expand_as(layer.lora_B))
                    layer.dropout.train()
            return ensemble
        if not row.independent:
            return self.train(row, seed, row.num_members)
        with tempfile.TemporaryDirectory() as folder:  # K adapters trained apart, joined from their PEFT exports
            paths = []
            for k in range(row.num_members):
                single = self.train(row, 1000 + seed * row.num_members + k, 1)
                paths.append(export_peft(single, Path(folder) / f"member_{k}", 0))
            return load_adapter_mixture(self.fresh_model(), paths)

    def evaluate(self, ensemble: LoraEnsemble, base: bool) -> dict:
        results = {}
        for split, items in self.splits.items():
            results[split] = evaluate_multiple_choice(ensemble, self.tokenizer, items, batch_size=32, base_only=base,
                                                      input_scores=split != "val", shared_prompt=False)
        return results


def purity(results: dict, shuffle_seed: int | None = None) -> float:
    """Mean over groups of the largest member share of the (alpha = 1) responsibility for the correct answer."""
    items = results["items"]
    groups = [i["group"] for i in items]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(groups)
    shares = {}
    for group, item in zip(groups, items, strict=True):
        shares.setdefault(group, []).append(item["responsibility"])
    return sum(max(torch.tensor(r).mean(0).tolist()) for r in shares.values()) / len(shares)


def summary(results: dict) -> dict:
    test, ood, val = results["test"], results["ood"], results["val"]
    m = test["mixture"]
    detection = ood_detection(test, ood)
    return {
        "val_acc": val["mixture"]["accuracy"], "val_nll": val["mixture"]["nll"],
        "acc": m["accuracy"], "ece": m["ece"], "nll": m["nll"], "brier": m["brier"], "aurc": m["aurc"],
        "acc@80": m["accuracy_at_80"], "mi_in": m["epistemic"], "mi_out": ood["mixture"]["epistemic"],
        "ood_mi": detection.get("auroc_epistemic"), "ood_total": detection.get("auroc_total"),
        "ood_prompt_mi": detection.get("auroc_prompt_mi"), "ood_prompt_spread": detection.get("auroc_prompt_spread"),
        "purity": purity(test), "purity_shuffled": purity(test, 0),
    }


COLUMNS = ("acc", "ece", "nll", "brier", "aurc", "acc@80", "ood_mi", "ood_total", "ood_prompt_mi", "ood_prompt_spread",
           "mi_in", "mi_out", "val_acc", "val_nll")


def cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def markdown_table(summaries: dict[str, list[dict]], minutes: dict[str, float]) -> str:
    lines = ["| row | seeds | " + " | ".join(COLUMNS) + " | min |", "|---" * (len(COLUMNS) + 3) + "|"]
    for name, per_seed in summaries.items():
        cells = [cell([s[c] for s in per_seed]) for c in COLUMNS]
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + f" | {minutes[name]:.1f} |")
    return "\n".join(lines)


def write_figures(raw: dict[str, list[dict]], stem: Path, names: list[str]) -> list[Path]:
    """Seed-0 figures of the test split for the rows ``names``: reliability diagrams, MI in vs out of distribution
    and group x member routing (ensembles), and the risk-coverage curves of every row."""
    paths = []
    curves = {}
    for name, runs in raw.items():
        test = runs[0]["test"]["items"]
        curves[name] = risk_coverage_curve(torch.tensor([i["total"] for i in test]),
                                           torch.tensor([i["correct"] for i in test]))
        if name not in names:
            continue
        ood = runs[0]["ood"]["items"]
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
        paths.append(reliability_diagram([max(i["probs"]) for i in test], [i["correct"] for i in test],
                                         f"{stem}_reliability_{slug}.png", title=name))
        if len(test[0]["member_probs"]) > 1:
            paths.append(mi_histogram({"test (in distribution)": [i["epistemic"] for i in test],
                                       "held out (out of distribution)": [i["epistemic"] for i in ood]},
                                      f"{stem}_mi_{slug}.png", title=f"MI, {name}"))
            routing = runs[0]["test"]["routing_matrix"]
            paths.append(routing_heatmap(routing["matrix"], routing["groups"], f"{stem}_routing_{slug}.png",
                                         title=f"Responsibility for the correct answer, {name}"))
    paths.append(risk_coverage_plot(curves, f"{stem}_risk_coverage.png", title="Selective prediction (test)"))
    return paths


def task_of(argv: list[str]) -> str | None:
    """The value of ``--task`` in ``argv`` (``--task survey`` or ``--task=survey``)."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    if task_of(sys.argv[1:] if argv is None else argv) == "survey":  # its own rows, flags and metrics
        survey_run.main(argv)
        return
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.num_members
    rows = all_rows(k)
    wanted = args.rows or ([name.format(k=k) for name in QUICK_ROWS] if args.quick else [r.name for r in rows])
    rows = [r for r in rows if r.name in wanted]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    start = time.perf_counter()
    bench = Benchmark(args)
    print(f"{args.task}: {len(bench.train_data)} training examples, {bench.steps} steps of {args.batch_size}; "
          + ", ".join(f"{s} {len(i)}" for s, i in bench.splits.items()), flush=True)
    summaries, minutes, raw = {}, {}, {}
    for row in rows:
        row_start = time.perf_counter()
        for seed in seeds if not row.base else seeds[:1]:
            results = bench.evaluate(bench.build(row, seed), row.base)
            summaries.setdefault(row.name, []).append(summary(results))
            raw.setdefault(row.name, []).append({"seed": seed, **{s: r for s, r in results.items()}})
            print(row.name, seed, {c: round(v, 4) if isinstance(v, float) else v
                                   for c, v in summaries[row.name][-1].items()}, flush=True)
        minutes[row.name] = (time.perf_counter() - row_start) / 60
    total = (time.perf_counter() - start) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{args.task}{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}"
    table = markdown_table(summaries, minutes)
    header = (f"# Quality benchmark: {args.task}{' (quick)' if args.quick else ''}\n\n"
              f"`python -m benchmarks.quality.run {' '.join(sys.argv[1:] if argv is None else argv)}`: "
              f"{total:.1f} min wall in all. Model {args.model}, LoRA r={args.rank} on the top {args.top_layers} "
              f"layers (all linear), {bench.steps} steps of {args.batch_size} (lr {args.learning_rate}), seeds "
              f"{seeds}; {len(bench.train_data)} training examples, "
              + ", ".join(f"{s} {len(i)} items" for s, i in bench.splits.items()) + ".\n\n")
    stem.with_suffix(".md").write_text(header + table + "\n")
    (stem.parent / f"{stem.name}.json").write_text(json.dumps(
        {"args": asdict(args), "summaries": summaries, "minutes": minutes, "total_minutes": total}, indent=1))
    torch.save(raw, Path(args.cache_dir) / f"{stem.name}_raw.pt")
    write_figures(raw, stem, [name.format(k=k) for name in FIGURE_ROWS])
    print(header + table)


if __name__ == "__main__":
    main()
