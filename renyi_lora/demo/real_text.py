"""``renyi-lora demo --real_text {yes,only}``: the demo's second part, on real text nobody here wrote.

The 14 categories of gensim's word-analogy questions (``demo.analogies``) are a multi-task SFT set with one group
per category ("Athens is to Greece as Baghdad is to" -> " Iraq"). We train K members at alpha = 1 and a single
adapter (K = 1) the same way as the first part (``demo.training.train_ensemble``: top layers only, a few dozen
steps), and compare the mixture, the single adapter and the base model (adapters disabled) on held-out four-way
multiple choice.

What to expect (docs/specialisation.md): the categories do not conflict (every prompt has one
right answer) and each example is one short decision, so nothing ties a category's examples to one member unless
one rank-limited adapter cannot fit all fourteen tasks. The purity of the group x member routing (mean over
groups of the largest mean responsibility) against 1/K is the measurement, whichever way it comes out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from renyi_lora.data.sft import load_sft_dataset
from renyi_lora.demo.analogies import write_analogy_data
from renyi_lora.demo.training import DemoArguments, train_ensemble
from renyi_lora.evaluation.multiple_choice import evaluate_multiple_choice, load_multiple_choice
from renyi_lora.evaluation.plots import routing_heatmap
from renyi_lora.evaluation.report import format_table
from renyi_lora.models import load_model_and_tokenizer

METRICS = ("accuracy", "ece", "nll", "brier")


def purity(matrix: list[list[float]]) -> float:
    """Mean over groups of the largest mean responsibility, ``matrix [G][K]``: 1/K without specialisation, 1 when
    every group belongs to one member."""
    return sum(max(row) for row in matrix) / len(matrix)


def purity_null(responsibility: torch.Tensor, groups: torch.Tensor, num_permutations: int = 1000,
                seed: int = 0) -> tuple[float, float]:
    """Mean and 95th percentile of the purity with the group labels shuffled over the items.

    With finitely many items per group the largest of K noisy group means exceeds 1/K even when routing ignores
    the group; this is the scale to read an observed purity against.

    Args:
        responsibility: ``[N, K]`` per-item responsibilities.
        groups: ``[N]`` group index of each item, 0 .. G-1.
    """
    generator = torch.Generator().manual_seed(seed)
    num_groups = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1)[:, None].double()  # [G, 1]
    order = torch.stack([torch.randperm(len(groups), generator=generator) for _ in range(num_permutations)])  # [P, N]
    one_hot = torch.nn.functional.one_hot(groups[order], num_groups).double()  # [P, N, G]
    means = one_hot.transpose(1, 2) @ responsibility.double() / counts  # [P, G, K]
    null = means.max(-1).values.mean(-1)  # [P]
    return null.mean().item(), null.quantile(0.95).item()


def run_real_text(args: DemoArguments) -> dict:
    """Build the analogy data, train, evaluate, print the tables and write ``real_text_report.md``; returns the
    summary (also written to ``real_text_summary.json``) under ``args.output_dir``."""
    start = time.perf_counter()
    out = Path(args.output_dir)
    paths = write_analogy_data(out / "real_text" / "data", seed=args.seed)
    _, tokenizer = load_model_and_tokenizer(args.model, torch_dtype=torch.float32)
    dataset = load_sft_dataset(paths["sft_train"], tokenizer, max_length=32)
    items = load_multiple_choice(paths["mc_test"])
    print(f"\n== real text: gensim word analogies, {len(dataset.group_names)} categories, {len(dataset)} training "
          f"examples, {len(items)} held-out 4-way questions (data in {paths['sft_train'].parent}) ==")
    runs: dict[str, dict] = {}
    for name, num_members, folder in ((f"mixture K={args.num_members}, alpha=1", args.num_members, "alpha_1"),
                                      ("single adapter (K=1)", 1, "single")):
        print(f"training {name}: {args.max_steps} steps")
        folder = out / "real_text" / folder
        ensemble, routing, seconds = train_ensemble(args, tokenizer, dataset, 1.0, num_members, folder)
        runs[name] = {"num_members": num_members, "train_seconds": seconds, **routing,
                      "eval": evaluate_multiple_choice(ensemble, tokenizer, items, batch_size=32)}
    runs["base model"] = {"num_members": 0, "train_seconds": 0.0,
                          "eval": evaluate_multiple_choice(ensemble, tokenizer, items, batch_size=32, base_only=True)}
    mixture = runs[f"mixture K={args.num_members}, alpha=1"]
    train_matrix = [mixture["routing"][g] for g in dataset.group_names]
    test_matrix = [mixture["eval"]["groups"][g]["routing"] for g in dataset.group_names]  # rows in the same order
    test_items = mixture["eval"]["items"]
    null_mean, null_95 = purity_null(torch.tensor([i["responsibility"] for i in test_items]),
                                     torch.tensor([dataset.group_names.index(i["group"]) for i in test_items]),
                                     seed=args.seed)
    summary = {
        "data": {k: str(v) for k, v in paths.items()}, "groups": dataset.group_names,
        "num_members": args.num_members, "purity_train": purity(train_matrix), "purity_test": purity(test_matrix),
        "purity_test_shuffled_groups": {"mean": null_mean, "q95": null_95},
        "routing_train": train_matrix, "routing_test": test_matrix,
        "example_sharpness_test": sum(max(i["responsibility"]) for i in test_items) / len(items),
        "runs": {name: {**run, "eval": {k: v for k, v in run["eval"].items() if k != "items"}}
                 for name, run in runs.items()},
    }
    summary["wall_seconds"] = time.perf_counter() - start
    tables = _tables(summary)
    print("\n\n".join(tables))
    (out / "real_text_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _report(summary, tables, out)
    print(f"\nreal-text report: {out / 'real_text_report.md'} ({summary['wall_seconds']:.0f} s)")
    return summary


def _tables(summary: dict) -> list[str]:
    """The printed tables: overall metrics, per-category metrics, routing and its purity."""
    runs, groups, K = summary["runs"], summary["groups"], summary["num_members"]
    order = ["base model", "single adapter (K=1)", f"mixture K={K}, alpha=1"]
    short = {order[0]: "base", order[1]: "single", order[2]: "mixture"}
    rows = []
    for name in order:
        m, ensemble = runs[name]["eval"]["mixture"], runs[name]["num_members"] > 1
        rows.append([name, *(m[k] for k in METRICS), m["epistemic"], m["auroc_mi_errors"] if ensemble else None,
                     m["auroc_total_errors"], runs[name]["train_seconds"]])
    for k, member in enumerate(runs[order[2]]["eval"]["members"]):
        rows.append([f"  member {k}", *(member[key] for key in METRICS), None, None, None, None])
    overall = format_table(["held-out 4-way analogies", "acc", "ECE", "NLL", "Brier", "MI", "AUROC(MI)",
                            "AUROC(total)", "train s"], rows)
    per_group = []
    for header in (("accuracy", "nll"), ("ece", "brier")):
        cells = []
        for g in groups:
            blocks = [runs[name]["eval"]["groups"][g]["mixture"] for name in order]
            cells.append([g, *(b[header[0]] for b in blocks), *(b[header[1]] for b in blocks)])
        labels = [f"{header[i]} {short[name]}" for i in range(2) for name in order]
        per_group.append(format_table(["category", *labels], cells))
    routing_rows = [[g, *train, max(train), *test, max(test)]
                    for g, train, test in zip(groups, summary["routing_train"], summary["routing_test"], strict=True)]
    routing = format_table(["routing (mixture)", *(f"train m{k}" for k in range(K)), "max",
                            *(f"test m{k}" for k in range(K)), "max"], routing_rows)
    owners = {row.index(max(row)) for row in summary["routing_train"]}
    null = summary["purity_test_shuffled_groups"]
    purity_line = "\n".join([
        "purity = mean over categories of the largest member's mean responsibility (1/K = "
        f"{1 / K:.3f}: no specialisation; 1: one member per category)",
        f"  train {summary['purity_train']:.3f}; test {summary['purity_test']:.3f} (test with the categories "
        f"shuffled over the questions: mean {null['mean']:.3f}, 95th percentile {null['q95']:.3f})",
        f"  members that own a category (train): {len(owners)} of {K}; per-question routing sharpness (test, mean "
        f"largest responsibility): {summary['example_sharpness_test']:.3f}"])
    return [overall, per_group[0], per_group[1], routing, purity_line]


def _report(summary: dict, tables: list[str], out: Path) -> Path:
    """``real_text_report.md`` next to the demo's ``report.md``, with the two routing heatmaps."""
    images, K = out / "images", summary["num_members"]
    num_items = summary["runs"]["base model"]["eval"]["num_items"]
    for split, what in (("train", "training set"), ("test", "held-out questions")):
        routing_heatmap(summary[f"routing_{split}"], summary["groups"], images / f"real_text_routing_{split}.png",
                        title=f"K={K}, alpha=1: {what}")
    lines = [
        "# renyi-lora demo, part 2: real text (gensim word analogies)", "",
        "Command: `renyi-lora demo --real_text only` (or `--real_text yes` after the first part). Data: the 14 "
        "categories of gensim's `questions-words.txt`, one group per category; prompt `a is to b as c is to`, "
        "completion ` d`; held-out 4-way multiple choice whose answers and distractors are words never seen in "
        f"training. Wall time of this part: {summary['wall_seconds']:.0f} s.", "",
        "## Mixture vs single adapter vs base model (held-out)", "",
        "AUROC(MI) / AUROC(total): how well the mixture's mutual information / total entropy ranks its errors "
        "above its correct answers (0.5 = chance; '-' for K = 1 and the base model, whose MI is zero). "
        f"{num_items} questions: one question moves the overall accuracy by {1 / num_items:.3f} and a category's "
        f"({num_items // len(summary['groups'])} questions) by {len(summary['groups']) / num_items:.3f}.", "",
        "```", tables[0], "```", "", "## Per category", "", "```", tables[1], "", tables[2], "```", "",
        "## Do members specialise by category?", "",
        "Rows: categories; columns: members; cells: mean responsibility (training set: the alpha = 1 routing of "
        "the objective; test: the posterior routing on the correct answer among the four choices).", "",
        "```", tables[3], "", tables[4], "```", "",
        "![routing, training set](images/real_text_routing_train.png)",
        "![routing, held-out questions](images/real_text_routing_test.png)", "",
    ]
    path = out / "real_text_report.md"
    path.write_text("\n".join(lines))
    return path

