"""Diagnostic figures: reliability diagram, group x member routing heatmap, mutual-information histogram.

Each function takes plain tensors, numpy arrays or lists, saves one PNG and returns its path. Figures are
drawn on matplotlib's Agg canvas directly (no pyplot), so nothing opens a window or changes the global
backend of the caller's session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from renyi_lora.uncertainty import calibration_bins

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _new_figure(width: float = 6.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def reliability_diagram(
    confidences: ArrayLike,
    correct: ArrayLike,
    path: str | os.PathLike[str],
    num_bins: int = 15,
    *, title: str = "Reliability diagram",
) -> Path:
    """Accuracy per equal-width confidence bin against the diagonal, with the ECE in the title.

    Args:
        confidences: ``[N]`` top-label confidence in [0, 1].
        correct: ``[N]`` whether the top label was right.
        path: where to write the PNG.
        num_bins: equal-width bins, as in ``uncertainty.calibration_bins``.
        title: figure title; ``(ECE = ...)`` is appended.
    """
    confidences = torch.as_tensor(_to_numpy(confidences), dtype=torch.float64)
    bins = calibration_bins(confidences, torch.as_tensor(_to_numpy(correct), dtype=torch.bool), num_bins)
    accuracy, filled = bins.accuracy.numpy(), bins.count.numpy() > 0
    edges = np.linspace(0.0, 1.0, num_bins + 1)

    figure = _new_figure(5.0, 5.0)
    axes = figure.add_subplot()
    axes.bar(
        edges[:-1][filled], accuracy[filled], width=1.0 / num_bins, align="edge", edgecolor="black", label="accuracy"
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    axes.set_title(f"{title} (ECE = {bins.calibration_error():.3f})")
    axes.legend(loc="upper left")
    return _save(figure, path)


def routing_heatmap(
    matrix: ArrayLike,
    group_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Mean responsibility by group",
) -> Path:
    """Group x member mean responsibilities on a fixed 0..1 colour scale, with each value written in its cell.

    Args:
        matrix: ``[G, K]`` mean responsibility of member k on examples of group g.
        group_names: G row labels.
        path: where to write the PNG.
        title: figure title.
    """
    values = _to_numpy(matrix).astype(float)
    if values.ndim != 2 or values.shape[0] != len(group_names):
        raise ValueError(
            f"matrix must be [G, K] with G = len(group_names) = {len(group_names)}; got shape {values.shape}"
        )
    num_groups, num_members = values.shape

    figure = _new_figure(1.2 * num_members + 2.5, 0.6 * num_groups + 1.8)
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for row in range(num_groups):
        for column in range(num_members):
            value = values[row, column]
            # viridis is dark at 0 and light at 1: flip the text colour for contrast.
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    axes.set_xticks(range(num_members), [f"member {k}" for k in range(num_members)])
    axes.set_yticks(range(num_groups), list(group_names))
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="responsibility")
    return _save(figure, path)


def mi_histogram(
    mi_by_group: dict[str, ArrayLike],
    path: str | os.PathLike[str],
    title: str = "Mutual information by group",
    num_bins: int = 30,
) -> Path:
    """Overlaid histograms of per-example mutual information (epistemic uncertainty, nats), one per group.

    All groups share the same bin edges so that their bars can be compared directly.

    Args:
        mi_by_group: group name -> ``[N_g]`` mutual information of each example of the group.
        path: where to write the PNG.
        title: figure title.
        num_bins: number of shared bins.
    """
    if not mi_by_group:
        raise ValueError("mi_by_group is empty; pass at least one group name -> values")
    groups = {name: _to_numpy(values).astype(float).ravel() for name, values in mi_by_group.items()}
    everything = np.concatenate(list(groups.values()))
    upper = float(everything.max()) if everything.size and everything.max() > 0 else 1.0
    edges = np.linspace(0.0, upper, num_bins + 1)

    figure = _new_figure()
    axes = figure.add_subplot()
    for name, values in groups.items():
        axes.hist(values, bins=edges, alpha=0.5, label=f"{name} (n = {values.size})")
    axes.set(xlabel="mutual information (nats)", ylabel="examples", title=title)
    axes.legend()
    return _save(figure, path)


def bar_chart(
    series: dict[str, ArrayLike],
    labels: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
    *, ylabel: str = "",
) -> Path:
    """Grouped bars: one group of bars per label, one bar per series (e.g. MI on conflicting vs consistent).

    Args:
        series: series name -> ``[L]`` values, one per label.
        labels: L x-axis labels.
        path: where to write the PNG.
    """
    values = {name: _to_numpy(v).astype(float).ravel() for name, v in series.items()}
    if not values or any(v.size != len(labels) for v in values.values()):
        raise ValueError(f"every series needs one value per label ({len(labels)})")
    width = 0.8 / len(values)
    positions = np.arange(len(labels))
    figure = _new_figure(max(6.0, 1.6 * len(labels)), 4.5)
    axes = figure.add_subplot()
    for i, (name, v) in enumerate(values.items()):
        axes.bar(positions + (i - (len(values) - 1) / 2) * width, v, width, label=name)
    axes.set_xticks(positions, list(labels), rotation=15)
    axes.set(ylabel=ylabel, title=title)
    axes.legend()
    return _save(figure, path)


def risk_coverage_plot(
    curves: dict[str, tuple[ArrayLike, ArrayLike]],
    path: str | os.PathLike[str],
    title: str = "Selective prediction",
) -> Path:
    """Risk (error rate among the kept examples) against coverage, one line per predictor; lower is better.

    Args:
        curves: name -> ``(coverage [N], risk [N])``, e.g. from ``uncertainty.risk_coverage_curve``.
        path: where to write the PNG.
    """
    if not curves:
        raise ValueError("curves is empty; pass at least one name -> (coverage, risk)")
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, (coverage, risk) in curves.items():
        axes.plot(_to_numpy(coverage), _to_numpy(risk), label=name)
    axes.set(xlabel="coverage", ylabel="risk (error rate of kept examples)", xlim=(0, 1), title=title)
    axes.legend()
    return _save(figure, path)
