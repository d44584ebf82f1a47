"""``renyi-lora demo``: soft specialists at work on the embedded SmolLM2-135M, offline, in minutes on a CPU.

Trains K = 4 members at alpha = 0 (the plain ensemble), 1 (the mixture) and 4 (toward winner-take-all), and a
single adapter (K = 1) the same way, on data generated in code (``renyi_lora.demo.data``): four house styles that share
every prompt and disagree on spelling and case (conflicting, identifiable: three words per example), two
annotators with opposite tastes on one word per example (conflicting, not identifiable), and capital cities that
everyone agrees on (consistent). Then it evaluates each with ``evaluate_multiple_choice``, shows what each member
generates with the mixture's per-token MI, and writes ``report.md`` with the plots.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.demo.data import CONFLICTING, CONSISTENT, ONE_DECISION, write_demo_data
from renyi_lora.demo.real_text import run_real_text
from renyi_lora.demo.training import DemoArguments, train_ensemble
from renyi_lora.ensemble import LoraEnsemble
from renyi_lora.evaluation.generate import generate
from renyi_lora.evaluation.multiple_choice import evaluate_multiple_choice, load_multiple_choice
from renyi_lora.evaluation.plots import bar_chart, routing_heatmap
from renyi_lora.evaluation.report import format_number, format_table
from renyi_lora.models import load_model_and_tokenizer

logger = logging.getLogger(__name__)


# The three kinds of (dis)agreement in the demo data, as (label, groups).
PARTS = {"conflicting": CONFLICTING, "one decision": ONE_DECISION, "consistent": CONSISTENT}


def _group_mean(results: dict, groups: tuple[str, ...], key: str) -> float:
    values = [results["groups"][g]["mixture"][key] for g in groups if g in results["groups"]]
    return sum(values) / len(values)


def run_demo(args: DemoArguments) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real_text == "only":
        return {"real_text": run_real_text(args)}
    started = time.perf_counter()
    out = Path(args.output_dir)
    paths = write_demo_data(out / "data", seed=args.seed)
    print(f"data written to {out / 'data'}: " + ", ".join(p.name for p in paths.values()))
    _, tokenizer = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    dataset = load_sft_dataset(paths["sft_train"], tokenizer, max_length=64)
    items = load_multiple_choice(paths["mc_test"])
    runs = [(f"K={args.num_members}, alpha={a:g}", a, args.num_members) for a in args.alphas]
    runs.append(("single adapter (K=1)", 1.0, 1))
    summary = {"runs": {}, "data": {k: str(v) for k, v in paths.items()}}
    ensembles = {}
    for name, alpha, num_members in runs:
        print(f"\n== training {name}: {args.max_steps} steps on {len(dataset)} examples ==")
        folder = out / (f"alpha_{alpha:g}" if num_members > 1 else "single")
        ensemble, routing, seconds = train_ensemble(args, tokenizer, dataset, alpha, num_members, folder)
        results = evaluate_multiple_choice(ensemble, tokenizer, items, batch_size=32)
        results.pop("items")
        summary["runs"][name] = {"alpha": alpha, "num_members": num_members, "train_seconds": seconds,
                                 "seconds_per_step": seconds / args.max_steps, **routing, "eval": results}
        ensembles[name] = ensemble
    _show(summary, out)
    demo_name = next((n for n, a, k in runs if k > 1 and a == 1.0), runs[-2][0])
    summary["generations_run"] = demo_name
    summary["generations_owners"] = _owned_groups(summary["runs"][demo_name]["routing"])
    summary["generations"] = _generations(ensembles[demo_name], tokenizer, demo_name, paths["sft_test"],
                                          summary["generations_owners"])
    summary["wall_seconds"] = time.perf_counter() - started
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(summary, out)
    print(f"\nreport: {out / 'report.md'} ({summary['wall_seconds'] / 60:.1f} min)")
    if args.real_text == "yes":
        summary["real_text"] = run_real_text(args)
    return summary


def _show(summary: dict, out: Path) -> None:
    for run in summary["runs"].values():
        run["mi"] = {part: _group_mean(run["eval"], groups, "epistemic") for part, groups in PARTS.items()}
        run["mi_ratio"] = run["mi"]["conflicting"] / max(run["mi"]["consistent"], 1e-12)
    print("\nmean mutual information (epistemic) of the mixture on held-out multiple choice:")
    print(format_table(["run", *(f"MI {part}" for part in PARTS), "conflicting / consistent", "s/step"],
                       [[name, *map(format_number, [*run["mi"].values(), run["mi_ratio"], run["seconds_per_step"]])]
                        for name, run in summary["runs"].items()]))
    print("\naccuracy per group, mixture / best member (groups in conflict share prompts: no single predictor is "
          "right on both sides):")
    groups = list(next(iter(summary["runs"].values()))["eval"]["groups"])
    print(format_table(["run", *groups], [[name, *(_accuracy_cell(run, g) for g in groups)]
                                          for name, run in summary["runs"].items()]))
    print("\nrouting over the training set (mean responsibility per member):")
    for name, run in summary["runs"].items():
        if run["num_members"] > 1:
            print(f"  {name}")
            for group, row in run["routing"].items():
                print(f"    {group:>10}: " + "  ".join(f"{w:.2f}" for w in row))


def _accuracy_cell(run: dict, group: str) -> str:
    block = run["eval"]["groups"][group]
    return f"{block['mixture']['accuracy']:.2f} / {max(m['accuracy'] for m in block['members']):.2f}"


def _owned_groups(routing: dict[str, list[float]]) -> list[str]:
    """Per member, the groups whose training examples it holds more than 60 % of (``"-"`` if none)."""
    K = len(next(iter(routing.values())))
    return [", ".join(g for g, row in routing.items() if row[k] > 0.6) or "-" for k in range(K)]


def _generations(ensemble: LoraEnsemble, tokenizer, name: str, test_file: Path, owners: list[str]) -> list[dict]:
    """Greedy generations of every member and of the mixture (with per-token MI) on the first held-out prompt of
    each part: conflicting, one decision, consistent."""
    held_out = [json.loads(line) for line in test_file.read_text().splitlines()]
    prompts = [next(r["prompt"] for r in held_out if r["group"] in groups) for groups in PARTS.values()]
    print(f"\nwhat each member of {name} writes (greedy), and the mixture with its per-token MI:")
    records = []
    for prompt in prompts:
        members = generate(ensemble, tokenizer, [prompt], mode="members", max_new_tokens=12)[0].to_dict()
        mixture = generate(ensemble, tokenizer, [prompt], mode="mixture", max_new_tokens=12)[0].to_dict()
        print(f"  prompt: {prompt.strip()!r}")
        for k, continuation in enumerate(members["continuations"]):
            print(f"    member {k} ({owners[k]}): {continuation['text'].strip()!r}")
        tokens = mixture["continuations"][0]["tokens"]
        print("    mixture:  " + " ".join(f"{t['text']!r}({t['mi']:.2f})" for t in tokens))
        records.append({"prompt": prompt, "members": members, "mixture": mixture})
    return records


def _report(summary: dict, out: Path) -> None:
    images = out / "images"
    lines = ["# renyi-lora demo", "", "Command: `renyi-lora demo` (`make demo`). Base model: SmolLM2-135M-Instruct.",
             "", "## Routing (group x member mean responsibility, training set)", ""]
    for name, run in summary["runs"].items():
        if run["num_members"] > 1:
            groups = list(run["routing"])
            slug = f"routing_alpha_{run['alpha']:g}.png"
            routing_heatmap([run["routing"][g] for g in groups], groups, images / slug, title=name)
            lines.append(f"![{name}](images/{slug})")
    names = list(summary["runs"])
    bar_chart({part: [summary["runs"][n]["mi"][part] for n in names] for part in PARTS}, names, images / "mi.png",
              title="Mean MI of the mixture on held-out multiple choice", ylabel="mutual information (nats)")
    lines += ["", "Rows are groups, columns members. The four house styles are identifiable (a style shows on three "
              "words per example): as alpha grows each gets its own member. Tea versus coffee is one word per "
              "example: a 50/50 member represents it exactly, so nothing forces a split at alpha = 1.", "",
              "## Epistemic uncertainty: conflicting vs consistent prompts", "", "![MI](images/mi.png)", "",
              "| run | " + " | ".join(f"MI {part}" for part in PARTS) + " | conflicting / consistent | s/step |",
              "|---" * (len(PARTS) + 3) + "|"]
    for name, run in summary["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in run["mi"].values())
                     + f" | {run['mi_ratio']:.3g} | {run['seconds_per_step']:.2f} |")
    groups = list(next(iter(summary["runs"].values()))["eval"]["groups"])
    lines += ["", "## Accuracy per group (held-out multiple choice): mixture / best member", "",
              "| run | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_accuracy_cell(run, g) for g in groups) + " |"
              for name, run in summary["runs"].items()]
    lines += ["", "## Generations", "", f"Greedy, members of {summary['generations_run']}; \"owns\" lists the "
              "groups whose training examples a member holds more than 60 % of. The mixture's per-token MI is high "
              "where the members disagree.", ""]
    for record in summary["generations"]:
        lines.append(f"Prompt `{record['prompt'].strip()}`:")
        for k, continuation in enumerate(record["members"]["continuations"]):
            lines.append(f"- member {k} (owns {summary['generations_owners'][k]}): `{continuation['text'].strip()}`")
        tokens = record["mixture"]["continuations"][0]["tokens"]
        lines.append("- mixture (token, MI): " + " ".join(f"`{t['text']}` ({t['mi']:.2f})" for t in tokens))
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
