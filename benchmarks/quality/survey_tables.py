"""The survey rows' report: one table per survey and split (mean ± seed std of every metric, the training's member
loads), the per-party mean posteriors, the per-item MI against the Democrat / Republican divergence, the issue's
target checks, and two figures per survey (MI vs JS scatter, party x member heatmap). Written by ``survey_run``;
``python -m benchmarks.quality.survey_tables RESULTS.json`` writes them again from a run's JSON (no model needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from renyi_lora.evaluation.plots import routing_heatmap

from .survey_report import party_table

COLUMNS = ("joint NLL", "NLL/answer", "k=2 NLL", "k=2 acc", "k=3 NLL", "k=3 NLL no steering", "k=3 acc", "NMI party",
           "MI~JS rho")
LOAD_COLUMNS = ("eff. members", "min share", "revivals")


def metrics_of(result: dict) -> dict[str, float | None]:
    joint, steer, items = result["joint"], result["steering"], result.get("items", {})
    return {"joint NLL": joint["nll"], "NLL/answer": joint["nll_per_answer"], "k=2 NLL": steer["2"]["nll"],
            "k=2 acc": steer["2"]["accuracy"], "k=3 NLL": steer["3"]["nll"], "k=3 NLL no steering":
            steer["3"]["nll_prior"], "k=3 acc": steer["3"]["accuracy"], "NMI party": result["party"]["nmi"],
            "MI~JS rho": items.get("spearman")}


def spread(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and seed standard deviation (ddof 1; None with fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def cell(values: list[float | None], digits: int = 3) -> str:
    mean, std = spread(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def main_table(methods: dict[str, list[dict]], loads: dict[str, list[dict]], minutes: dict[str, float],
               cpu: dict[str, float]) -> str:
    head = ["method", "K", "seeds", *COLUMNS, *LOAD_COLUMNS, "min (cpu)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in methods.items():
        per_seed = [metrics_of(r) for r in runs]
        cells = [name, str(runs[0]["members"]), str(len(runs))]
        cells += [cell([m[c] for m in per_seed], 2 if c == "MI~JS rho" else 3) for c in COLUMNS]
        row_loads = [entry for entry in loads.get(name, []) if entry.get("effective_members") is not None]
        cells += [cell([entry["effective_members"] for entry in row_loads], 2),
                  cell([entry["min_share"] for entry in row_loads], 3),
                  " / ".join(str(entry["revivals"]) for entry in row_loads) or "-"]
        cells.append(f"{minutes[name]:.1f} ({cpu[name]:.1f})" if name in minutes else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def item_table(methods: dict[str, list[dict]], names: list[str]) -> str:
    """Seed 0: each item's Democrat / Republican JS divergence (bits) and the no-context MI (nats) of each method."""
    names = [n for n in names if n in methods]
    first = methods[names[0]][0]["items"]
    lines = ["| item | D/R JS (bits) | " + " | ".join(f"MI, {n}" for n in names) + " |",
             "|" + "---|" * (len(names) + 2)]
    lines += [f"| {item} | {first['js'][item]:.4f} | " + " | ".join(f"{methods[n][0]['items']['mi'][item]:.4f}"
                                                                     for n in names) + " |" for item in first["js"]]
    return "\n".join(lines)


def target_checks(methods: dict[str, list[dict]], k: int) -> list[tuple[str, str, str]]:
    """The issue's targets for the K = k, alpha = 1 mixture: ``(target, measured, verdict)`` rows."""
    renyi, single, deep, lcm = f"renyi K={k} a=1", "LoRA r", f"deep ensemble K={k}", f"latent classes K={k} (EM)"
    if not all(name in methods for name in (renyi, single, deep, lcm)):
        return []

    def values(name: str, column: str) -> list[float | None]:
        return [metrics_of(r)[column] for r in methods[name]]

    def lower_by_two_std(other: str) -> tuple[str, str]:
        (ours, our_std), (theirs, their_std) = spread(values(renyi, "joint NLL")), spread(values(other, "joint NLL"))
        gap = theirs - ours
        if our_std is None or their_std is None:
            return (f"{ours:.3f} vs {theirs:.3f} (gap {gap:+.3f}; one seed, no spread)",
                    "lower, spread unknown" if gap > 0 else "not met")
        bar = 2 * max(our_std, their_std)
        return (f"{ours:.3f} vs {theirs:.3f}: gap {gap:+.3f}, two seed std {bar:.3f}",
                "met" if gap > bar else "not met")

    checks = []
    for other in (single, deep):
        measured, verdict = lower_by_two_std(other)
        checks.append((f"joint NLL below {other} by > 2 seed std", measured, verdict))
    ours, theirs = spread(values(renyi, "joint NLL"))[0], spread(values(lcm, "joint NLL"))[0]
    checks.append((f"joint NLL <= {lcm}", f"{ours:.3f} vs {theirs:.3f} ({ours - theirs:+.3f})",
                   "met" if ours <= theirs else "not met"))
    ours, theirs = spread(values(renyi, "k=3 NLL"))[0], spread(values(single, "k=3 NLL"))[0]
    checks.append(("k=3 steering NLL below LoRA r with the same 3 answers in context",
                   f"{ours:.3f} vs {theirs:.3f} ({ours - theirs:+.3f})", "met" if ours < theirs else "not met"))
    ours, theirs = spread(values(renyi, "NMI party"))[0], spread(values(lcm, "NMI party"))[0]
    checks.append((f"NMI with party >= {lcm}", f"{ours:.3f} vs {theirs:.3f}", "met" if ours >= theirs else "not met"))
    ours, theirs = spread(values(renyi, "MI~JS rho"))[0], spread(values(deep, "MI~JS rho"))[0]
    met = ours is not None and ours >= 0.5 and (theirs is None or theirs < 0.5)
    checks.append(("per-item MI ~ D/R JS: Spearman >= 0.5, the deep ensemble's < 0.5",
                   f"{_fmt(ours)} vs {_fmt(theirs)}", "met" if met else "not met"))
    return checks


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def scatter(methods: dict[str, list[dict]], names: list[str], path: Path, title: str) -> Path:
    """Seed 0: per item, the no-context MI of each method against the Democrat / Republican JS divergence."""
    figure = Figure(figsize=(6.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in [n for n in names if n in methods]:
        items = methods[name][0]["items"]
        js = [items["js"][i] for i in items["js"]]
        mi = [items["mi"][i] for i in items["js"]]
        axes.scatter(js, mi, label=f"{name} (rho {_fmt(items['spearman'])})")
        for label, x, y in zip(items["js"], js, mi, strict=True):
            axes.annotate(label, (x, y), fontsize=6, alpha=0.7)
    axes.set_xlabel("Democrat / Republican JS divergence (bits)")
    axes.set_ylabel("mutual information answer ~ member, no context (nats)")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_report(stem: Path, report: dict, args: dict, command: str, total: dict) -> None:
    """``<stem>.md`` and ``<stem>.json`` (every per-seed result), and the figures ``<stem>_<survey>_*.png``."""
    k = args["num_members"]
    renyi, deep, lcm = f"renyi K={k} a=1", f"deep ensemble K={k}", f"latent classes K={k} (EM)"
    start, end = total["load_average_start"], total["load_average_end"]
    lines = [f"# Survey task: adapters, ensembles and the classical anchors{' (quick)' if args['quick'] else ''}", "",
             f"`{command}`: {total['wall']:.1f} min wall, {total['cpu']:.1f} min of this process's CPU time, in all "
             f"(on a 2-core machine shared with other jobs, {args['threads'] or 'default'} torch thread(s); load "
             f"average over 1 / 5 / 15 min {' / '.join(f'{x:.2f}' for x in start)} at the start, "
             f"{' / '.join(f'{x:.2f}' for x in end)} at the end). Model {args['model']}, LoRA r={args['rank']} on "
             f"the top {args['top_layers']} layer(s) "
             f"(all linear), {args['max_steps']} steps of {args['batch_size']} respondents for every row and every "
             f"deep-ensemble member (lr {args['learning_rate']}, the loss on "
             f"{'the answer tokens only' if args['targets'] == 'answers' else 'the whole completion'}, "
             f"{'bf16 autocast' if args['bf16'] else 'float32'} training, float32 scoring), seeds {args['seeds']}. "
             "Renyi rows: the trainer's defaults (alpha warm-up over half the steps, dead members revived below a "
             "0.01 load, uniform pi unless learned). Anchors fitted in numpy on the same training answers (EM with "
             f"{args['lcm_restarts']} restarts, seeded by the row's seed).", "",
             "Columns: joint NLL per respondent (nats); steering: NLL and accuracy of the answers after the first k, "
             "with the posterior over members from those k (a single adapter reads the same answers in context; "
             "'no steering' uses the prior pi); NMI of the argmax posterior with the party; Spearman's rho of the "
             "no-context MI per item with the Democrat / Republican JS divergence; training loads of the ensemble "
             "rows: effective members (exp of the routing entropy, mean per example) and the smallest member's share "
             "in the last logging window of 10 steps (its per-party responsibilities weighted by the parties' training "
             "shares), revivals per seed; min (cpu): wall minutes of the row, all seeds, training and scoring (this "
             "process's CPU minutes: the wall time on an otherwise idle core).", ""]
    for survey, entry in report.items():
        for split, methods in entry["results"].items():
            count = next(iter(methods.values()))[0]["joint"]["respondents"]
            lines += [f"## {survey.upper()} {split} ({count} respondents; trained on {entry['train']})", "",
                      main_table(methods, entry["loads"], entry["minutes"], entry["cpu_minutes"]), ""]
            checks = target_checks(methods, k)
            if checks:
                lines += [f"Targets for {renyi} ({survey.upper()} {split}):", "", "| target | measured | verdict |",
                          "|---|---|---|"] + [f"| {t} | {m} | {v} |" for t, m, v in checks] + [""]
            for name in (renyi, f"{renyi} + learned pi", deep, lcm):
                if name in methods:
                    lines += [f"Per-party mean posterior, {name} (seed {args['seeds'][0]}):", "",
                              party_table(methods[name][0]), ""]
            names = [n for n in methods if methods[n][0]["members"] > 1 and "oracle" not in n]
            if names:
                lines += [item_table(methods, names), ""]
            if split in ("test", "val"):
                figures = [scatter(methods, [renyi, f"{renyi} + learned pi", deep, lcm],
                                   stem.parent / f"{stem.name}_{survey}_mi_vs_js.png",
                                   f"{survey.upper()} {split}: disagreement per item (seed {args['seeds'][0]})")]
                if renyi in methods:
                    table = methods[renyi][0]["party"]["table"]
                    figures.append(routing_heatmap(list(table.values()), list(table),
                                                   stem.parent / f"{stem.name}_{survey}_routing.png",
                                                   f"{survey.upper()} {split}: mean posterior, {renyi}"))
                lines += [" ".join(f"![{f.stem}]({f.name})" for f in figures), ""]
        learned = entry["loads"].get(f"{renyi} + learned pi")
        if learned:
            lines += [f"{survey.upper()}: learned pi per seed: {[e['mixture_weights'] for e in learned]}; member "
                      f"shares in the last window: {[e['shares'] for e in learned]}.", ""]
        wall, cpu = entry["minutes"], entry["cpu_minutes"]
        lines += [f"{survey.upper()}: {wall['total']:.1f} min wall ({cpu['total']:.1f} CPU) in all; loading the rows "
                  f"and the trunk states {wall['setup']:.1f} ({cpu['setup']:.1f}), the anchors "
                  f"{wall['anchors'] * 60:.0f} s.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    (stem.parent / f"{stem.name}.json").write_text(json.dumps(
        {"command": command, "args": args, "total": total, "report": report}, indent=1))


def main(argv: list[str] | None = None) -> None:
    path = Path((sys.argv[1:] if argv is None else argv)[0])
    saved = json.loads(path.read_text())
    write_report(path.with_suffix(""), saved["report"], saved["args"], saved["command"], saved["total"])
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
