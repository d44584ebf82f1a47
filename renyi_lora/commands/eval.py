"""``renyi-lora eval``: evaluation of an ensemble, of adapters trained elsewhere, or of the base model, on
multiple-choice data (calibration, uncertainty, routing; out-of-distribution detection when ``--ood_data`` is given)
or on held-out SFT data (the NLL of the mixture and of each member, routing by group and its NMI,
``renyi_lora.evaluation.sequences``), whichever the file's first record is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from renyi_lora.commands.common import ROUTE_EXAMPLES_HELP, ModelArguments, route_weights
from renyi_lora.data.records import SFT_FORMATS
from renyi_lora.data.sources import read_typed_records
from renyi_lora.evaluation.inference import load_for_inference
from renyi_lora.evaluation.multiple_choice import evaluate_multiple_choice, load_multiple_choice, ood_detection
from renyi_lora.evaluation.plots import mi_histogram, risk_coverage_plot
from renyi_lora.evaluation.report import format_table, results_table, sft_results_table, write_report, write_sft_report
from renyi_lora.evaluation.sequences import eval_data_format, evaluate_sft
from renyi_lora.uncertainty import risk_coverage_curve


@dataclass
class EvalArguments(ModelArguments):
    """Flags of ``renyi-lora eval``."""

    data: str = field(default=None, metadata={"help": "Data file (.jsonl, .json or .parquet): multiple-choice "
                      "{prompt, choices, answer[, group]} records, or SFT records ({prompt, completion}, {messages} or "
                      "{text}, each with an optional group) for the held-out NLL of the mixture and of each member, "
                      "the routing per group and its NMI. The first record decides."})
    adapters: list[str] | None = field(default=None, metadata={"help": "One or more adapter folders scored as one "
                                       "mixture: saved ensembles (all their members) and PEFT LoRA adapters (one "
                                       "member each, e.g. K LoRAs trained independently: a deep ensemble). Required "
                                       "unless --base_only."})
    ood_data: str | None = field(default=None, metadata={"help": "A second multiple-choice file of out-of-"
                                 "distribution items: reports the AUROC of each uncertainty score (answer entropy and "
                                 "MI, members' disagreement on the prompt) for telling them from --data's items."})
    output: str | None = field(default=None, metadata={"help": "Write the results JSON here; the plots and "
                               "<stem>_report.md are written next to it."})
    length_normalize: bool = field(default=False, metadata={"help": "Score a choice by its mean token "
                                   "log-likelihood instead of the sum."})
    base_only: bool = field(default=False, metadata={"help": "Evaluate the base model alone (adapters disabled, "
                            "K = 1) through the same code."})
    members: list[int] | None = field(default=None, metadata={"help": "Evaluate only these members (indices into the "
                                      "members of --adapters, in order; e.g. --members 0 2)."})
    weights: list[float] | None = field(default=None, metadata={"help": "Mixture weights, one per evaluated member "
                                        "(normalised); the saved ensemble's mixture weights if omitted (uniform "
                                        "unless learned; uniform over the members of several folders)."})
    route_on_prompt: bool = field(default=False, metadata={"help": "Weigh the members of each example by their "
                                  "posterior given its prompt, w_k ∝ pi_k p_k(prompt), before scoring the answer."})
    route_examples: str | None = field(default=None, metadata={"help": ROUTE_EXAMPLES_HELP})
    max_length: int = field(default=1024, metadata={"help": "SFT data: tokens per example (longer completions are cut "
                            "from the right, as in training)."})
    input_scores: bool | None = field(default=None, metadata={"help": "Also score the members' disagreement on each "
                                      "prompt's own tokens (one more forward per item); default: on with --ood_data."})
    batch_size: int = field(default=16, metadata={"help": "(item, choice) rows per forward pass (SFT data: "
                            "examples)."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', ..."})

    def __post_init__(self) -> None:
        for flag, path in (("--data", self.data), ("--ood_data", self.ood_data),
                           ("--route_examples", self.route_examples)):
            if flag == "--data" and not path:
                raise ValueError("--data is required: a multiple-choice or SFT .jsonl, .json or .parquet file")
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} {path}: file not found")
        if isinstance(self.adapters, str):
            self.adapters = [self.adapters]
        if not self.adapters and not self.base_only:
            raise ValueError("--adapters DIR is required (a saved ensemble or PEFT adapters), unless --base_only")
        if self.members is not None and not self.adapters:
            raise ValueError("--members needs --adapters DIR (the saved ensemble to take members from)")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1; got {self.batch_size}")
        if self.base_only and self.route_examples:
            raise ValueError("--route_examples weighs the members of --adapters; the base model alone (--base_only) "
                             "has none to weigh")
        if self.input_scores is None:
            self.input_scores = self.ood_data is not None


def run_eval(args: EvalArguments) -> dict:
    """What ``renyi-lora eval`` does: validate the data, load the model and adapters, evaluate, write files."""
    if args.route_examples:  # bad data fails before the model loads
        read_typed_records(args.route_examples, SFT_FORMATS, "--route_examples")
    if eval_data_format(args.data) == "sft":
        return run_sft_eval(args)
    items = load_multiple_choice(args.data)
    ood_items = load_multiple_choice(args.ood_data) if args.ood_data else None
    ensemble, tokenizer = load_for_inference(args.model, args.adapters, args.members, args.trust_remote_code,
                                             device=args.device)
    weights = route_weights(args.route_examples, ensemble, tokenizer, args.weights, args.batch_size)

    def evaluate(batch):
        return evaluate_multiple_choice(ensemble, tokenizer, batch, length_normalize=args.length_normalize,
                                        batch_size=args.batch_size, weights=weights, base_only=args.base_only,
                                        member_ids=args.members, input_scores=args.input_scores, progress=True,
                                        route_on_prompt=args.route_on_prompt)

    results = evaluate(items)
    results.update(data=args.data, model=args.model, adapters=args.adapters)
    if args.route_examples:
        results["route_examples"] = {"data": args.route_examples, "weights": weights}
    if ood_items is not None:
        ood = evaluate(ood_items)
        results["ood"] = {"data": args.ood_data, "num_items": ood["num_items"], "mixture": ood["mixture"],
                          "detection": ood_detection(results, ood), "items": ood["items"]}
    if args.output:
        write_report(results, args.output)
        if ood_items is not None:
            write_ood_figures(results, args.output)
    return results


def run_sft_eval(args: EvalArguments) -> dict:
    """``renyi-lora eval`` on SFT data (``renyi_lora.evaluation.sequences.evaluate_sft``)."""
    if args.ood_data or args.length_normalize or args.input_scores:
        flag = "--ood_data" if args.ood_data else "--length_normalize" if args.length_normalize else "--input_scores"
        raise ValueError(f"{flag} applies to multiple-choice data; {args.data} holds SFT records (the report gives the "
                         "NLL per example and per token)")
    ensemble, tokenizer = load_for_inference(args.model, args.adapters, args.members, args.trust_remote_code,
                                             device=args.device)
    weights = route_weights(args.route_examples, ensemble, tokenizer, args.weights, args.batch_size)
    results = evaluate_sft(ensemble, tokenizer, args.data, weights=weights, route_on_prompt=args.route_on_prompt,
                           base_only=args.base_only, member_ids=args.members, batch_size=args.batch_size,
                           max_length=args.max_length, progress=True)
    results.update(data=args.data, model=args.model, adapters=args.adapters)
    if args.route_examples:
        results["route_examples"] = {"data": args.route_examples, "weights": weights}
    if args.output:
        write_sft_report(results, args.output)
    return results


def ood_table(results: dict) -> str:
    """The out-of-distribution part of the printed summary (empty without ``--ood_data``)."""
    if "ood" not in results:
        return ""
    detection = results["ood"]["detection"]
    names = list(detection)
    return format_table(["out-of-distribution vs in", *[n.removeprefix("auroc_") for n in names]],
                        [[f"AUROC ({results['ood']['num_items']} vs {results['num_items']} items)",
                          *[detection[n] for n in names]]])


def print_results(results: dict) -> None:
    if results.get("task") == "sft":
        print(sft_results_table(results))
        return
    print(results_table(results))
    if "ood" in results:
        print("\n" + ood_table(results))


def write_ood_figures(results: dict, output: str | Path) -> list[Path]:
    """``<stem>_ood_mi.png`` (MI in vs out of distribution) and ``<stem>_risk_coverage.png``, next to the JSON."""
    output = Path(output)
    stem = output.parent / output.stem
    inside, outside = results["items"], results["ood"]["items"]
    histogram = mi_histogram({"in distribution": [i["epistemic"] for i in inside],
                              "out of distribution": [i["epistemic"] for i in outside]}, f"{stem}_ood_mi.png",
                             title="Mutual information, in vs out of distribution")
    curve = risk_coverage_curve(torch.tensor([i["total"] for i in inside]),
                                torch.tensor([i["correct"] for i in inside]))
    coverage = risk_coverage_plot({"mixture, by total entropy": curve}, f"{stem}_risk_coverage.png")
    return [histogram, coverage]
