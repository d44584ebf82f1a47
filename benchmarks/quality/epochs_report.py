"""Tables, findings and the figure of the epoch study (``benchmarks.quality.epochs``), from its per-seed scores.

``results[row] = [{"seed": s, "epochs": {e: {"val": scores, "test": scores}}}, ...]`` with ``scores`` as
``epochs.scores`` returns them (acc, ece, nll, brier, conf, mi, member_ece, member_nll).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SINGLE = "LoRA r"


def values(results: dict, row: str, epochs: int, split: str, metric: str) -> list[float]:
    return [run["epochs"][epochs][split][metric] for run in results[row]]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def spread(xs: list[float]) -> float:
    """Sample standard deviation (0 for one seed)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def fmt(xs: list[float]) -> str:
    return f"{mean(xs):.3f}" if len(xs) == 1 else f"{mean(xs):.3f}±{spread(xs):.3f}"


def table(results: dict, epochs: list[int], split: str, metrics: tuple[str, ...]) -> str:
    """Rows x epoch budgets, each cell ``metric / metric / ...`` (mean±std over seeds)."""
    lines = ["| row | " + " | ".join(f"{e} ep: {' / '.join(metrics)}" for e in epochs) + " |",
             "|---" * (len(epochs) + 1) + "|"]
    for row in results:
        cells = [" / ".join(fmt(values(results, row, e, split, m)) for m in metrics) for e in epochs]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(results: dict, epochs: list[int], deep: str, renyi: list[str]) -> tuple[list[str], dict]:
    """Where the single adapter's test ECE is worst, where it turns over-confident (mean confidence above accuracy),
    what every other row does there, and the target: each renyi row's ECE at most half the single adapter's and no
    worse than the deep ensemble's at that budget (means over seeds)."""
    if SINGLE not in results:
        return ["(no single-adapter row: no findings)"], {}
    ece = {e: mean(values(results, SINGLE, e, "test", "ece")) for e in epochs}
    nll = {e: mean(values(results, SINGLE, e, "test", "nll")) for e in epochs}
    gap = {e: mean(values(results, SINGLE, e, "test", "conf")) - mean(values(results, SINGLE, e, "test", "acc"))
           for e in epochs}
    worst, best = max(epochs, key=ece.get), min(epochs, key=nll.get)
    over = [e for e in epochs if gap[e] > 0]
    lines = [f"- Single adapter: test ECE {', '.join(f'{ece[e]:.3f} at {e}' for e in epochs)} epochs; mean "
             f"confidence minus accuracy {', '.join(f'{gap[e]:+.3f}' for e in epochs)}. "
             + (f"Over-confident (confidence above accuracy) from {over[0]} epoch(s) on; " if over else
                "Never over-confident on average; ") + f"its ECE is worst at {worst} epochs. Its test NLL is lowest "
             f"at {best} epochs ({nll[best]:.3f})" + (f" and rises to {nll[epochs[-1]]:.3f} by {epochs[-1]} (over-"
                                                      "fitting)." if best != epochs[-1] else ".")]
    for budget in dict.fromkeys([worst, epochs[-1]]):  # the target's budget, then the longest (if another)
        for row in results:
            if row == SINGLE:
                continue
            get = {m: mean(values(results, row, budget, "test", m)) for m in ("acc", "ece", "nll", "conf", "mi",
                                                                              "member_ece")}
            lines.append(f"- {row} at {budget} epochs: ECE {get['ece']:.3f} ({get['ece'] / ece[budget]:.2f} x the "
                         f"single adapter's {ece[budget]:.3f}), NLL {get['nll']:.3f} (single {nll[budget]:.3f}), "
                         f"accuracy {get['acc']:.3f}, confidence - accuracy {get['conf'] - get['acc']:+.3f}, mean "
                         f"MI {get['mi']:.3f}, its members' mean ECE {get['member_ece']:.3f}.")
    target = {"epochs": worst, "single_ece": ece[worst]}
    for row in renyi:
        if row not in results:
            continue
        got = mean(values(results, row, worst, "test", "ece"))
        deep_ece = mean(values(results, deep, worst, "test", "ece")) if deep in results else None
        half = got <= ece[worst] / 2
        vs_deep = deep_ece is None or got <= deep_ece
        target[row] = {"ece": got, "ratio_to_single": got / ece[worst], "deep_ece": deep_ece,
                       "met": bool(half and vs_deep)}
        lines.append(f"- Target for {row}: ECE {got:.3f} = {got / ece[worst]:.2f} x the single adapter's "
                     f"{ece[worst]:.3f} (needs <= 0.50: {'yes' if half else 'no'})"
                     + (f", deep ensemble {deep_ece:.3f} (needs <=: {'yes' if vs_deep else 'no'})" if deep_ece
                        is not None else "") + f": **{'met' if half and vs_deep else 'not met'}**.")
    return lines, target


def plot(results: dict, epochs: list[int], split: str, path: Path, title: str) -> Path:
    """ECE, NLL and accuracy on ``split`` against epochs, log x axis, one line per row (error bars: std over seeds)."""
    fig = Figure(figsize=(14, 4.2), dpi=110)
    FigureCanvasAgg(fig)  # no pyplot: nothing global changes in the caller's session (as renyi_lora.evaluation.plots)
    axes = fig.subplots(1, 3)
    for ax, metric, label in zip(axes, ("ece", "nll", "acc"), ("ECE (15 bins)", "NLL", "accuracy"), strict=True):
        for row in results:
            ys = [values(results, row, e, split, metric) for e in epochs]
            ax.errorbar(epochs, [mean(y) for y in ys], yerr=[spread(y) for y in ys], marker="o", capsize=3,
                        label=row)
        ax.set_xscale("log")
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.set_xlabel("epochs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
