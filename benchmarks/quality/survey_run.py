"""The survey rows of the quality benchmark: ``python -m benchmarks.quality.run --task survey [--quick]``.

Side by side on each survey (ANES 1996, GSS abortion items; ``benchmarks.quality.survey``), the same training
respondents and the same optimizer steps for every row: one LoRA of rank r; one of rank r x K; a deep ensemble (K
single adapters trained apart with their own seeds, exported as PEFT adapters and joined by
``load_adapter_mixture``, as ``renyi-lora eval --adapters`` joins them); renyi-lora K = 4 at alpha 0, 1 and 2 with the
trainer's default alpha warm-up, revival of dead members and uniform mixture weights, and alpha 1 with learned
weights (``learn_weights``); beside them the classical anchors fitted in numpy on the same training answers
(``survey_anchors``). Every model is scored on the held-out splits by ``survey_scoring.score`` and
``survey_metrics.evaluate``; the tables, target checks and figures are ``survey_tables``.

As in the other tasks LoRA sits on the top ``--top_layers`` layers and the frozen layers below run once per distinct
row (``trunk.TrunkStates``, cached on disk). The loss is on the answer tokens only by default (``--targets
answers``): the text between the answers is the same for every respondent, and leaving it out makes a step about
three times cheaper on CPU; the sequence log-likelihood that routes a respondent to members is then exactly the joint
log-likelihood of their answers, the quantity the table scores. ``--targets completion`` trains on the whole
completion, as ``renyi-lora train`` does on the raw files. ``--bf16`` trains under CPU bfloat16 autocast (about twice
as fast here); scoring always runs in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, PrinterCallback

from benchmarks.quality.arguments import ROOT, ModelArguments
from benchmarks.quality.survey import SURVEYS, RespondentEncoder
from benchmarks.quality.survey_anchors import fit_group_marginals, fit_latent_classes, fit_marginals, told_log_weights
from benchmarks.quality.survey_metrics import PARTIES, Respondents, context_free_scores, evaluate, load_respondents
from benchmarks.quality.survey_scoring import score
from benchmarks.quality.survey_tables import write_report
from benchmarks.quality.trunk import TrunkStates, truncated_model
from renyi_lora.data.sft import SFTCollator, load_sft_dataset
from renyi_lora.ensemble import LoraEnsemble, load_adapter_mixture
from renyi_lora.io import export_peft
from renyi_lora.likelihoods import IGNORE_INDEX
from renyi_lora.models import load_model_and_tokenizer
from renyi_lora.training.trainer import RenyiConfig, RenyiTrainer

EVAL_SPLITS = {"gss": ("test", "test_shift"), "anes": ("test",)}


@dataclass
class SurveyArguments(ModelArguments):
    task: str = field(default="survey", metadata={"help": "Always 'survey' here (run.py dispatches on it)."})
    surveys: list[str] = field(default_factory=lambda: ["anes", "gss"], metadata={"help": "Which surveys."})
    data_dir: str | None = field(default=None, metadata={"help": "survey_<name>_<split>.jsonl files from make "
                                 "quality-data (default: benchmarks/quality/data, or its quick/ folder with --quick)."})
    quick: bool = field(default=False, metadata={"help": "The quick data (400 training respondents per survey), "
                        "one seed, 30 steps."})
    rows: list[str] | None = field(default=None, metadata={"help": "Rows to run (default: all); the anchors always."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Default: 0 with --quick, else 0 1 2."})
    validation: bool = field(default=False, metadata={"help": "Score the validation split instead of the test "
                             "splits (for choosing settings; writes *_val files)."})
    top_layers: int = field(default=1, metadata={"help": "LoRA on the top N decoder layers (all linear modules)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps of every row and of every "
                                  "deep-ensemble member (default 60, or 30 with --quick: what the time budget allows; "
                                  "validation prefers more, see quality_survey_validation.md)."})
    batch_size: int = 8
    learning_rate: float = field(default=4e-3, metadata={"help": "AdamW learning rate of every row (4e-3: the "
                                 "single adapter's best validation NLL at 60 steps over both surveys among 5e-4 to "
                                 "1.6e-2)."})
    targets: str = field(default="answers", metadata={"help": "'answers': the loss on the answer tokens only; "
                         "'completion': on the whole completion (every line's text too)."})
    bf16: bool = field(default=True, metadata={"help": "Train under CPU bfloat16 autocast (scoring stays float32)."})
    lcm_restarts: int = 10

    def __post_init__(self) -> None:
        if self.max_steps is None:
            self.max_steps = 30 if self.quick else 60
        unknown = [name for name in self.surveys if name not in SURVEYS]
        if unknown:
            raise ValueError(f"--surveys {unknown}: expected some of {sorted(SURVEYS)}")
        if self.targets not in ("answers", "completion"):
            raise ValueError(f"--targets {self.targets!r}: expected 'answers' or 'completion'")
        if self.max_steps < 1 or self.batch_size < 1 or self.top_layers < 1:
            raise ValueError(f"--max_steps {self.max_steps}, --batch_size {self.batch_size} and --top_layers "
                             f"{self.top_layers} must each be >= 1")


@dataclass(frozen=True)
class Row:
    name: str
    num_members: int = 1
    rank_factor: int = 1
    alpha: float = 1.0
    independent: bool = False  # a deep ensemble: K single adapters trained apart, joined from their PEFT exports
    learn_weights: bool = False


def all_rows(k: int) -> list[Row]:
    return [Row("LoRA r"), Row(f"LoRA r x {k}", rank_factor=k), Row(f"deep ensemble K={k}", k, independent=True),
            *(Row(f"renyi K={k} a={a:g}", k, alpha=a) for a in (0.0, 1.0, 2.0)),
            Row(f"renyi K={k} a=1 + learned pi", k, learn_weights=True)]


def answer_labels(dataset, respondents: Respondents, encode: RespondentEncoder, targets: str):
    """``dataset`` with the loss on each respondent's answer tokens only (``targets == 'answers'``); checks that the
    training rows are the rows scoring reads."""
    for number, (example, answers) in enumerate(zip(dataset.examples, respondents.answers, strict=True), start=1):
        ids, positions = encode([None if a < 0 else int(a) for a in answers])
        if example["input_ids"][: len(ids)] != ids:
            raise ValueError(f"training row {number}: its tokens differ from the row the scoring encodes (cut at "
                             f"{len(example['input_ids'])} tokens?); the survey files and survey.RespondentEncoder "
                             "disagree")
        if targets == "answers":
            labels = [IGNORE_INDEX] * len(example["input_ids"])
            for position in positions:
                if position is not None:
                    labels[position + 1] = example["input_ids"][position + 1]
            example["labels"] = labels
    return dataset


def member_loads(log_history: list[dict], group_shares: dict[str, float], num_members: int) -> dict:
    """The training's member loads: the per-example effective number of members (exp of the routing entropy) and
    each member's share of the examples in the last logging window (its per-party responsibilities weighted by the
    parties' shares of the training set), and the members revived (log entries with "revived")."""
    logged = [entry for entry in log_history if "routing/effective_members" in entry]
    revivals = sum(len(entry["revived"]) for entry in log_history if "revived" in entry)
    if not logged:
        return {"effective_members": None, "min_share": None, "shares": None, "revivals": revivals}
    last = logged[-1]
    shares = [sum(share * last.get(f"routing/{group}/member_{k}", 0.0) for group, share in group_shares.items())
              for k in range(num_members)]
    return {"effective_members": last["routing/effective_members"], "min_share": min(shares),
            "shares": [round(s, 4) for s in shares], "revivals": revivals}


class SurveyTask:
    """One survey: its training rows, held-out respondents, cached trunk states, and every row's training."""

    def __init__(self, args: SurveyArguments, name: str, model, tokenizer, data_dir: Path) -> None:
        self.args, self.name, self.tokenizer, self.model = args, name, tokenizer, model
        self.survey = SURVEYS[name]
        self.encode = RespondentEncoder(tokenizer, self.survey)
        path = data_dir / f"survey_{name}_train.jsonl"
        self.train_respondents = load_respondents(path)
        self.train_data = answer_labels(load_sft_dataset(path, tokenizer, max_length=2048), self.train_respondents,
                                        self.encode, args.targets)
        splits = ("val",) if args.validation else EVAL_SPLITS[name]
        self.splits = {split: load_respondents(data_dir / f"survey_{name}_{split}.jsonl") for split in splits}
        groups = self.train_respondents.groups
        self.group_shares = {g: groups.count(g) / len(groups) for g in sorted(set(groups))}
        self.trunk = self._trunk_states()

    def _trunk_states(self) -> TrunkStates:
        """Hidden states entering the first adapted layer of every row training and scoring read.

        A training row is the respondent's scoring row plus the end-of-sequence token, whose own state predicts
        nothing: ``TrunkStates`` serves it from the scoring row. So one state per respondent's row is kept, in one
        file per survey, model and first layer that grows as new rows come (the quick and full splits share rows).
        """
        rows = [self.train_respondents.answers, *(r.answers for r in self.splits.values())]
        alone = np.full((len(self.survey.items), len(self.survey.items)), -1)
        np.fill_diagonal(alone, 0)  # the no-context rows (survey_scoring.no_context_log_probs)
        needed = {tuple(self.encode([None if a < 0 else int(a) for a in row])[0])
                  for row in np.unique(np.concatenate([alone, *rows]), axis=0)}
        first_layer = self.model.config.num_hidden_layers - self.args.top_layers
        key = hashlib.sha256(json.dumps([self.args.model, first_layer, self.name]).encode()).hexdigest()[:16]
        path = Path(self.args.cache_dir) / f"trunk-survey-{self.name}-{key}.pt"
        trunk = TrunkStates(self.model, first_layer, self.tokenizer.pad_token_id)
        if path.is_file():
            trunk.states = torch.load(path)
        missing = needed - trunk.states.keys()
        if missing:
            start = time.perf_counter()
            trunk.add(sorted(missing), progress=False)
            print(f"{self.name}: trunk states of {len(missing)} new rows in {time.perf_counter() - start:.0f} s",
                  flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(trunk.states, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # whole or not at all
        return trunk

    def train(self, row: Row, seed: int, num_members: int) -> tuple[LoraEnsemble, dict]:
        args = self.args
        rank = args.rank * row.rank_factor
        with tempfile.TemporaryDirectory() as output_dir:
            config = RenyiConfig(
                output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, logging_strategy="steps", logging_steps=min(10, args.max_steps),
                save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, num_members=num_members, rank=rank,
                lora_alpha=2.0 * rank, target_modules=["all-linear"], alpha=row.alpha,
                learn_weights=row.learn_weights, bf16=args.bf16, use_cpu=True)
            ensemble = LoraEnsemble(truncated_model(self.trunk), config.ensemble_config())
            trainer = RenyiTrainer(model=ensemble, args=config, group_names=self.train_data.group_names,
                                   train_dataset=self.train_data,
                                   data_collator=SFTCollator(self.tokenizer.pad_token_id))
            trainer.remove_callback(PrinterCallback)  # the log lines would drown the table's progress
            trainer.train()
        loads = member_loads(trainer.state.log_history, self.group_shares, num_members) if num_members > 1 else {}
        return ensemble.eval(), loads

    def build(self, row: Row, seed: int) -> tuple[LoraEnsemble, dict]:
        if not row.independent:
            return self.train(row, seed, row.num_members)
        with tempfile.TemporaryDirectory() as folder:
            paths = []
            for k in range(row.num_members):
                single, _ = self.train(row, 1000 + seed * row.num_members + k, 1)
                paths.append(export_peft(single, Path(folder) / f"member_{k}", 0))
            return load_adapter_mixture(truncated_model(self.trunk), paths).eval(), {}

    def evaluate(self, ensemble: LoraEnsemble) -> dict:
        log_weights = ensemble.mixture_weights.double().log().numpy()
        return {split: evaluate(score(ensemble, self.tokenizer, held, log_weights), held)
                for split, held in self.splits.items()}

    def anchors(self, seed: int) -> dict[str, dict]:
        """``{method: {split: results}}`` of the numpy anchors fitted on the same training answers."""
        train, k = self.train_respondents, self.args.num_members
        lcm = fit_latent_classes(train.answers, train.num_choices, k, restarts=self.args.lcm_restarts, seed=seed)
        fitted = {"independent marginals": (fit_marginals(train.answers, train.num_choices), False),
                  "group oracle (told the party)": (fit_group_marginals(train.answers, train.num_choices,
                                                                        train.groups, list(PARTIES)), True),
                  f"latent classes K={k} (EM)": (lcm.model, False)}
        return {name: {split: evaluate(context_free_scores(model, len(held.answers), told_log_weights(
                    held.groups, list(PARTIES)) if told else None), held) for split, held in self.splits.items()}
                for name, (model, told) in fitted.items()}


def run_survey(args: SurveyArguments, task: SurveyTask, rows: list[Row], seeds: list[int]) -> dict:
    """``{"results": {split: {row: [per seed]}}, "loads": {row: [per seed]}, "minutes": {row: m}}``."""
    results = {split: {} for split in task.splits}
    loads, minutes, cpu = {}, {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    for seed in seeds:
        for name, per_split in task.anchors(seed).items():
            for split, result in per_split.items():
                results[split].setdefault(name, []).append(result)
    minutes["anchors"], cpu["anchors"] = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    for row in rows:
        start, cpu_start = time.perf_counter(), time.process_time()
        for seed in seeds:
            torch.manual_seed(seed)
            ensemble, load = task.build(row, seed)
            load["mixture_weights"] = [round(w, 4) for w in ensemble.mixture_weights.tolist()]
            for split, result in task.evaluate(ensemble).items():
                results[split].setdefault(row.name, []).append(result)
            loads.setdefault(row.name, []).append(load)
            first = results[next(iter(results))][row.name][-1]
            print(f"{task.name} {row.name} seed {seed}: joint NLL {first['joint']['nll']:.3f}, k=3 NLL "
                  f"{first['steering']['3']['nll']:.3f}, NMI {first['party']['nmi']:.3f}, rho "
                  f"{first['items']['spearman']}, loads {load}", flush=True)
        minutes[row.name], cpu[row.name] = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    return {"results": results, "loads": loads, "minutes": minutes, "cpu_minutes": cpu,
            "train": len(task.train_respondents.answers),
            "held_out": {split: len(r.answers) for split, r in task.splits.items()}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = HfArgumentParser(SurveyArguments).parse_args_into_dataclasses(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = all_rows(args.num_members)
    if args.rows:
        unknown = sorted(set(args.rows) - {r.name for r in rows})
        if unknown:
            raise SystemExit(f"--rows {unknown}: expected some of {[r.name for r in rows]}")
        rows = [r for r in rows if r.name in args.rows]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()
    data_dir = Path(args.data_dir or ROOT / "benchmarks/quality/data" / ("quick" if args.quick else ""))
    model, tokenizer = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    model.eval()
    report = {}
    for name in args.surveys:
        task_start, task_cpu = time.perf_counter(), time.process_time()
        task = SurveyTask(args, name, model, tokenizer, data_dir)
        setup = {"wall": (time.perf_counter() - task_start) / 60, "cpu": (time.process_time() - task_cpu) / 60}
        print(f"{name}: {len(task.train_data)} training respondents, {args.max_steps} steps of {args.batch_size}; "
              + ", ".join(f"{s} {len(r.answers)}" for s, r in task.splits.items()), flush=True)
        report[name] = run_survey(args, task, rows, seeds)
        report[name]["minutes"].update(total=(time.perf_counter() - task_start) / 60, setup=setup["wall"])
        report[name]["cpu_minutes"].update(total=(time.process_time() - task_cpu) / 60, setup=setup["cpu"])
    total = {"wall": (time.perf_counter() - start) / 60, "cpu": (time.process_time() - cpu_start) / 60,
             "load_average_start": load_start, "load_average_end": os.getloadavg()}
    stem = Path(args.out) / ("quality_survey" + ("_quick" if args.quick else "") + ("_val" if args.validation else "")
                             + (f"_{args.tag}" if args.tag else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality.run " + " ".join(argv)
    write_report(stem, report, {**asdict(args), "seeds": seeds}, command, total)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

