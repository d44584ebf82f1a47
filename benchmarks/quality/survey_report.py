"""The survey task's classical anchors on the real data, as a table: ``python -m benchmarks.quality.survey_report``.

Fits, on each survey's training respondents, the independent item marginals, the group oracle (told the party) and
latent class models (K = 1 .. 6 compared on validation and by BIC; the ``--num_classes`` one in the main table), and
scores them on the held-out splits with ``survey_metrics.evaluate``. ``markdown_table`` also takes the results of
adapters and ensembles (``survey_scoring.score`` then ``evaluate``), so every method lands in the same table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .survey_anchors import fit_group_marginals, fit_latent_classes, fit_marginals, told_log_weights
from .survey_metrics import PARTIES, context_free_scores, evaluate, load_respondents

ROOT = Path(__file__).resolve().parents[2]
SPLITS = {"gss": ("test", "test_shift"), "anes": ("test",)}


def anchors(data_dir: Path, survey: str, num_classes: int, restarts: int, seed: int) -> dict:
    """``{"splits": {split: {method: results}}, "bic": [...], "train": N}`` for one survey."""
    train = load_respondents(data_dir / f"survey_{survey}_train.jsonl")
    fitted = {"independent marginals": (fit_marginals(train.answers, train.num_choices), False),
              "group oracle (told the party)": (fit_group_marginals(train.answers, train.num_choices, train.groups,
                                                                    list(PARTIES)), True)}
    bic, val = [], load_respondents(data_dir / f"survey_{survey}_val.jsonl")
    for classes in range(1, 7):  # K is chosen on validation (or by BIC), never on test
        fit = fit_latent_classes(train.answers, train.num_choices, classes, restarts=restarts, seed=seed)
        nll = evaluate(context_free_scores(fit.model, len(val.answers)), val, ks=())["joint"]["nll"]
        bic.append({"classes": classes, "train_loglik": round(fit.loglik, 2), "bic": round(fit.bic(len(train.answers)),
                    1), "val_nll": round(nll, 4), "iterations": fit.iterations,
                    "restart_spread": round(max(fit.restart_logliks) - min(fit.restart_logliks), 3)})
        if classes == num_classes:
            fitted[f"latent classes K={classes} (EM)"] = (fit.model, False)
            weights = np.exp(fit.model.log_weights).round(3).tolist()
    splits = {}
    for split in SPLITS[survey]:
        held = load_respondents(data_dir / f"survey_{survey}_{split}.jsonl")
        splits[split] = {}
        for name, (model, told) in fitted.items():
            weights_n = told_log_weights(held.groups, list(PARTIES)) if told else None
            splits[split][name] = evaluate(context_free_scores(model, len(held.answers), weights_n), held)
    return {"train": len(train.answers), "splits": splits, "bic": bic, "class_weights": weights}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, dict], ks: tuple[str, ...] = ("2", "3")) -> str:
    """One row per method (``name -> survey_metrics.evaluate`` result)."""
    head = ["method", "K", "joint NLL", "NLL/answer", "best member"]
    for k in ks:
        head += [f"k={k} NLL (prior)", f"k={k} acc (prior)"]
    head += ["NMI party", "MI~JS rho"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in results.items():
        joint = result["joint"]
        cells = [name, str(result["members"]), fmt(joint["nll"]), fmt(joint["nll_per_answer"]),
                 fmt(joint["best_member_nll"])]
        for k in ks:
            steer = result["steering"][k]
            cells += [f"{steer['nll']:.3f} ({steer['nll_prior']:.3f})",
                      f"{steer['accuracy']:.3f} ({steer['accuracy_prior']:.3f})"]
        cells += [fmt(result["party"]["nmi"]), fmt(result.get("items", {}).get("spearman"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def party_table(result: dict) -> str:
    """The per-party mean posterior over members of one method."""
    table = result["party"]["table"]
    members = len(next(iter(table.values())))
    lines = ["| party | n | " + " | ".join(f"member {k}" for k in range(members)) + " |", "|" + "---|" * (members + 2)]
    lines += [f"| {party} | {result['party']['counts'][party]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for party, row in table.items()]
    return "\n".join(lines)


def item_table(results: dict[str, dict]) -> str:
    """Per item: the Democrat / Republican JS divergence and each method's no-context MI."""
    names = [n for n, r in results.items() if "items" in r and r["members"] > 1]
    first = results[names[0]]["items"]
    lines = ["| item | D/R JS (bits) | " + " | ".join(f"MI, {n} (nats)" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    lines += [f"| {item} | {first['js'][item]:.4f} | " + " | ".join(f"{results[n]['items']['mi'][item]:.4f}"
                                                                     for n in names) + " |" for item in first["js"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(ROOT / "benchmarks/quality/data"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_survey_anchors.md"))
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_dir, sections, raw = Path(args.data_dir), [], {}
    for survey in SPLITS:
        raw[survey] = result = anchors(data_dir, survey, args.num_classes, args.restarts, args.seed)
        lcm = f"latent classes K={args.num_classes} (EM)"
        for split, methods in result["splits"].items():
            count = next(iter(methods.values()))["joint"]["respondents"]
            sections += [f"## {survey.upper()} {split} ({count} respondents; anchors fitted on {result['train']})", "",
                         markdown_table(methods), "", f"Per-party mean posterior of the {lcm} (class weights "
                         f"{result['class_weights']}):", "", party_table(methods[lcm]), "",
                         item_table(methods), ""]
        sections += [f"Latent class models fitted on {survey.upper()} train, scored on validation (restart spread: "
                     "best minus worst training log-likelihood over the restarts):", "",
                     "| K | train log-lik | BIC | val joint NLL | EM iterations | restart spread |",
                     "|---|---|---|---|---|---|"]
        sections += [f"| {b['classes']} | {b['train_loglik']} | {b['bic']} | {b['val_nll']} | {b['iterations']} | "
                     f"{b['restart_spread']} |" for b in result["bic"]] + [""]
    seconds = time.perf_counter() - start
    header = (f"# Survey task: classical anchors\n\n`python -m benchmarks.quality.survey_report` ({seconds:.0f} s; "
              f"data from `{data_dir.relative_to(ROOT) if data_dir.is_relative_to(ROOT) else data_dir}`, EM with "
              f"{args.restarts} restarts, seed {args.seed}). Joint NLL: nats per respondent; steering: mean NLL and "
              "accuracy of the answers after the first k, with the prior weights in brackets; NMI of the argmax "
              "posterior with the party; Spearman's rho of the no-context MI per item with the Democrat / Republican "
              "JS divergence. Definitions: docs/quality.md, the survey task.\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n" + "\n".join(sections))
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
