"""Calibration over training length: one LoRA, a deep ensemble and renyi-lora ensembles after 1, 3, 10 and 30 epochs.

Published LoRA ensembles beat one adapter on NLL and ECE once training runs long enough for the single adapter to
over-fit. This driver trains every row once for the longest budget with a constant learning rate and scores the
adapters as they stood at the end of each budget (``--epochs``), on the validation split (for choosing settings) and
the test split. With a constant schedule and the Trainer's seeded data order, the state after e epochs of a long run
is the state a run of e epochs would end in, so one run serves every budget.

Rows (``run.all_rows``): one LoRA (K = 1); a deep ensemble (K adapters trained apart with their own seeds and data
order, snapshots exported as PEFT adapters and joined with ``load_adapter_mixture``); renyi-lora K members at alpha
0 and 1. The task is one multiple-choice file of ``make quality-data`` (``<task>_mc.jsonl``, split here into train /
validation / test by a seeded shuffle) or a task with its own splits (``<task>_train.jsonl``, ``_val_mc``,
``_test_mc``, subsampled to the sizes asked). It reuses ``run.Benchmark``: its trunk cache, training and scoring.

    python -m benchmarks.quality.epochs --task commonsenseqa --threads 1
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainerCallback

from benchmarks.quality import epochs_report as report
from benchmarks.quality.arguments import ROOT, ModelArguments
from benchmarks.quality.run import Benchmark, QualityArguments, Row, all_rows
from renyi_lora.ensemble import EnsembleConfig, LoraEnsemble, load_adapter_mixture
from renyi_lora.evaluation.multiple_choice import evaluate_multiple_choice
from renyi_lora.io import copy_adapters, export_peft

ROWS = ("LoRA r", "deep ensemble K={k}", "renyi K={k} a=0", "renyi K={k} a=1")


@dataclass
class EpochArguments(ModelArguments):
    task: str = field(default="commonsenseqa", metadata={"help": "<task>_mc.jsonl in --data_dir (split here), or a "
                      "task with <task>_train.jsonl, <task>_val_mc.jsonl and <task>_test_mc.jsonl."})
    data_dir: str = field(default=str(ROOT / "benchmarks/quality/data"), metadata={"help": "Built by make "
                          "quality-data."})
    train_items: int = field(default=700, metadata={"help": "Training questions (at most; fewer if the set is small)."})
    val_items: int = field(default=200, metadata={"help": "Validation questions (choosing settings)."})
    test_items: int = field(default=291, metadata={"help": "Test questions (at most)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the shuffle that splits and samples the items."})
    epochs: list[int] = field(default_factory=lambda: [1, 3, 10, 30], metadata={"help": "Epoch budgets, increasing: "
                              "every row trains for the last one and is scored at each."})
    rows: list[str] | None = field(default=None, metadata={"help": f"Rows (default: {', '.join(ROWS)})."})
    seeds: list[int] = field(default_factory=lambda: [0])
    top_layers: int = 4
    batch_size: int = 16
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate, constant (no warm-up, no "
                                 "decay) unless --lr_scheduler_type says otherwise."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "The Trainer's schedule over the longest "
                                   "budget; constant makes each snapshot equal a run of its own length."})
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"], metadata={"help": "Splits scored at "
                                   "each budget (val alone while choosing settings)."})
    merge: list[str] | None = field(default=None, metadata={"help": "Write one report from these JSON files of "
                                    "earlier runs (e.g. rows or seeds run in parallel processes) instead of running; "
                                    "the other flags are the first file's, except --out and --tag."})

    def __post_init__(self) -> None:
        if not self.epochs or any(e < 1 for e in self.epochs) or sorted(set(self.epochs)) != self.epochs:
            raise ValueError(f"--epochs must be increasing positive integers (e.g. 1 3 10 30); got {self.epochs}")
        for name in ("train_items", "val_items", "test_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if not self.eval_splits or not set(self.eval_splits) <= {"val", "test"}:
            raise ValueError(f"--eval_splits must be among val, test; got {self.eval_splits}")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(record: dict) -> str:
    """Case- and space-normalised prompt: equal questions land in one split."""
    return " ".join(record["prompt"].lower().split())


def split_task(args: EpochArguments) -> Path:
    """Write ``<task>_train.jsonl`` (SFT: the gold choice as completion), ``_val_mc`` and ``_test_mc`` into a folder of
    the cache and return it. One seeded shuffle of distinct prompts; validation first, then test, then train."""
    data = Path(args.data_dir)
    rng = random.Random(f"{args.split_seed}/epochs/{args.task}")
    if (data / f"{args.task}_train.jsonl").is_file():
        splits = {s: _read_jsonl(data / f"{args.task}_{name}.jsonl")
                  for s, name in (("train", "train"), ("val", "val_mc"), ("test", "test_mc"))}
        for split, records in splits.items():
            rng.shuffle(records)
            splits[split] = records[: getattr(args, f"{split}_items")]
    else:
        path = data / f"{args.task}_mc.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `make quality-data` (or give --data_dir / --task of a "
                                    f"built multiple-choice set)")
        records = list({_key(r): r for r in _read_jsonl(path)}.values())
        rng.shuffle(records)
        val, test = records[: args.val_items], records[args.val_items: args.val_items + args.test_items]
        train = records[args.val_items + args.test_items:][: args.train_items]
        if not train:
            raise ValueError(f"{path}: {len(records)} distinct items leave none for training after --val_items "
                             f"{args.val_items} and --test_items {args.test_items}")
        splits = {"train": [{"prompt": r["prompt"], "completion": r["choices"][r["answer"]], "group": r.get("group")}
                            for r in train], "val": val, "test": test}
    folder = Path(args.cache_dir) / "epochs_data" / (f"{args.task}-{args.split_seed}-{args.train_items}-"
                                                     f"{args.val_items}-{args.test_items}")
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        name = f"{args.task}_train.jsonl" if split == "train" else f"{args.task}_{split}_mc.jsonl"
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


class Snapshots(TrainerCallback):
    """Copies the adapters (``<module>.lora_A`` / ``lora_B``) at the end of the chosen optimizer steps."""

    def __init__(self, ensemble: list[LoraEnsemble], steps: dict[int, int]) -> None:
        self.ensemble, self.steps = ensemble, steps  # ensemble: a one-item list, filled once the Trainer exists
        self.taken: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            tensors = {}
            for name, layer in (model or self.ensemble[0]).lora_layers().items():
                tensors[f"{name}.lora_A"] = layer.lora_A.detach().clone()
                tensors[f"{name}.lora_B"] = layer.lora_B.detach().clone()
            self.taken[self.steps[state.global_step]] = tensors
        return control


def mean_confidence(results: dict) -> float:
    return sum(max(item["probs"]) for item in results["items"]) / len(results["items"])


def scores(results: dict) -> dict:
    """The mixture's accuracy, ECE, NLL, Brier and mean confidence; the members' mean ECE / NLL; the mean MI."""
    m, members = results["mixture"], results["members"]
    return {"acc": m["accuracy"], "ece": m["ece"], "nll": m["nll"], "brier": m["brier"],
            "conf": mean_confidence(results), "mi": m["epistemic"],
            "member_ece": sum(x["ece"] for x in members) / len(members),
            "member_nll": sum(x["nll"] for x in members) / len(members)}


class EpochStudy:
    def __init__(self, args: EpochArguments) -> None:
        self.args = args
        folder = split_task(args)
        quality = QualityArguments(task=args.task, data_dir=str(folder), model=args.model, num_members=args.num_members,
                                   rank=args.rank, top_layers=args.top_layers, epochs=float(args.epochs[-1]),
                                   batch_size=args.batch_size, learning_rate=args.learning_rate,
                                   cache_dir=args.cache_dir, threads=args.threads)
        self.bench = Benchmark(quality, splits=("val", "test"))
        self.steps_per_epoch = -(-len(self.bench.train_data) // args.batch_size)
        self.bench.steps = self.steps_per_epoch * args.epochs[-1]
        self.at = {self.steps_per_epoch * e: e for e in args.epochs}

    def train(self, row: Row, seed: int, num_members: int) -> dict[int, dict[str, torch.Tensor]]:
        """Adapters at each budget: ``{epochs: tensors}``."""
        holder: list[LoraEnsemble] = []
        snapshots = Snapshots(holder, self.at)
        holder.append(self.bench.train(row, seed, num_members, callbacks=(snapshots,), routing_summary=False,
                                       lr_scheduler_type=self.args.lr_scheduler_type))
        return snapshots.taken

    def evaluate(self, ensemble: LoraEnsemble) -> dict:
        return {split: evaluate_multiple_choice(ensemble.eval(), self.bench.tokenizer, self.bench.splits[split],
                                                batch_size=32, shared_prompt=False) for split in self.args.eval_splits}

    def run(self, row: Row, seed: int) -> dict[int, dict]:
        """``{epochs: {split: evaluation}}`` of one row and seed."""
        out = {}
        if not row.independent:
            taken = self.train(row, seed, row.num_members)
            ensemble = LoraEnsemble(self.bench.fresh_model(), self._config(row.num_members))
            for epochs, tensors in taken.items():
                copy_adapters(ensemble, tensors)
                out[epochs] = self.evaluate(ensemble)
            return out
        # A deep ensemble: K runs of one adapter with their own seeds (run.Benchmark.build's), joined from PEFT exports.
        members = [self.train(row, 1000 + seed * row.num_members + k, 1) for k in range(row.num_members)]
        single = LoraEnsemble(self.bench.fresh_model(), self._config(1))
        with tempfile.TemporaryDirectory() as folder:
            for epochs in self.args.epochs:
                paths = []
                for k, taken in enumerate(members):
                    copy_adapters(single, taken[epochs])
                    paths.append(export_peft(single, Path(folder) / f"e{epochs}" / f"member_{k}", 0))
                out[epochs] = self.evaluate(load_adapter_mixture(self.bench.fresh_model(), paths))
        return out

    def _config(self, num_members: int) -> EnsembleConfig:
        """The shape ``run.Benchmark.train`` gives a row of rank factor 1 (its adapters are copied in)."""
        return EnsembleConfig(num_members=num_members, rank=self.args.rank, lora_alpha=2.0 * self.args.rank,
                              target_modules=["all-linear"])


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EpochArguments).parse_args_into_dataclasses(argv)
    if args.merge:
        return merge(args)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.num_members
    wanted = args.rows or [name.format(k=k) for name in ROWS]
    rows = {r.name: r for r in all_rows(k)}
    unknown = [name for name in wanted if name not in rows]
    if unknown:
        raise ValueError(f"--rows: unknown {unknown}; choose among {list(rows)}")
    start = time.perf_counter()
    study = EpochStudy(args)
    bench = study.bench
    print(f"{args.task}: {len(bench.train_data)} training examples, {study.steps_per_epoch} steps of "
          f"{args.batch_size} per epoch, budgets {args.epochs}; "
          + ", ".join(f"{s} {len(i)}" for s, i in bench.splits.items()), flush=True)
    results, minutes = {}, {}
    for name in wanted:
        row_start = time.perf_counter()
        for seed in args.seeds:
            per_epoch = study.run(rows[name], seed)
            results.setdefault(name, []).append({"seed": seed, "epochs": {
                e: {split: scores(r) for split, r in evaluation.items()} for e, evaluation in per_epoch.items()}})
            for e, got in results[name][-1]["epochs"].items():
                print(name, seed, e, {split: {m: round(v, 4) for m, v in s.items()} for split, s in got.items()},
                      flush=True)
        minutes[name] = (time.perf_counter() - row_start) / 60
    run = {"command": " ".join(sys.argv[1:] if argv is None else argv), "args": asdict(args), "results": results,
           "minutes": minutes, "total_minutes": (time.perf_counter() - start) / 60,
           "train_size": len(bench.train_data), "steps_per_epoch": study.steps_per_epoch,
           "sizes": {s: len(i) for s, i in bench.splits.items()}}
    write_report(args, [run])
    return results


def merge(args: EpochArguments) -> dict:
    """One report from several runs' JSON files: their rows side by side, a row's seeds pooled."""
    runs = []
    for path in args.merge:
        runs += json.loads(Path(path).read_text())["runs"]
    for run in runs:  # JSON keys are strings
        run["results"] = {row: [{**r, "epochs": {int(e): v for e, v in r["epochs"].items()}} for r in per_seed]
                          for row, per_seed in run["results"].items()}
    first = EpochArguments(**{**runs[0]["args"], "merge": args.merge, "out": args.out, "tag": args.tag})
    write_report(first, runs)
    results = {}
    for run in runs:
        for row, per_seed in run["results"].items():
            results.setdefault(row, []).extend(per_seed)
    return results


def write_report(args: EpochArguments, runs: list[dict]) -> Path:
    """The table (``.md``), all numbers (``.json``) and the figure (``.png``) of one or more runs (see ``merge``)."""
    results, minutes = {}, {}
    for run in runs:
        for row, per_seed in run["results"].items():
            results.setdefault(row, []).extend(per_seed)
            minutes[row] = minutes.get(row, 0.0) + run["minutes"][row]
    first = runs[0]
    k = args.num_members
    order = [row.name for row in all_rows(k)]  # the benchmark's row order, whatever order the parts ran in
    results = dict(sorted(results.items(), key=lambda item: order.index(item[0])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_epochs{'_' + args.tag if args.tag else ''}"
    lines, target = [], {}
    if "test" in args.eval_splits:
        lines, target = report.findings(results, args.epochs, f"deep ensemble K={k}",
                                        [f"renyi K={k} a=0", f"renyi K={k} a=1"])
    commands = "; ".join(f"`python -m benchmarks.quality.epochs {run['command']}` ({run['total_minutes']:.1f} min)"
                         for run in runs)
    train_size, steps_per_epoch, sizes = first["train_size"], first["steps_per_epoch"], first["sizes"]
    text = (f"# Calibration over training length: {args.task}\n\n"
            f"{commands}{'; run in parallel, one process each' if len(runs) > 1 else ''}. Minutes per row: "
            + ", ".join(f"{name} {m:.1f}" for name, m in minutes.items()) + ". "
            f"Model {args.model}, LoRA r={args.rank} on the top {args.top_layers} layer(s) (all linear), batch "
            f"{args.batch_size}, lr {args.learning_rate} ({args.lr_scheduler_type} schedule), {steps_per_epoch} steps "
            f"per epoch; every row trained once for {args.epochs[-1]} epochs and scored at {args.epochs}; seeds "
            f"{args.seeds} (mean±std over seeds where several). {train_size} training questions, "
            + ", ".join(f"{s} {n}" for s, n in sizes.items()) + " questions (split seed "
            f"{args.split_seed}).\n")
    for split in ("test", "val"):
        if split in args.eval_splits:
            name = "Test" if split == "test" else "Validation"
            text += (f"\n## {name}: accuracy / ECE / NLL\n\n" + report.table(results, args.epochs, split,
                                                                           ("acc", "ece", "nll"))
                     + f"\n\n## {name}: mean confidence / mean MI / members' mean ECE\n\n"
                     + report.table(results, args.epochs, split, ("conf", "mi", "member_ece")) + "\n")
    if lines:
        text += "\n## Findings (computed)\n\n" + "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    (stem.parent / f"{stem.name}.json").write_text(json.dumps({"runs": runs, "target": target}, indent=1))
    split = "test" if "test" in args.eval_splits else "val"
    report.plot(results, args.epochs, split, stem.with_suffix(".png"),
                f"{args.task}: {split} calibration vs training length")
    print(text)
    return stem


if __name__ == "__main__":
    main()
