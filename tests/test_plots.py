"""Each figure is written as a real, non-blank PNG of the expected size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from renyi_lora.evaluation.plots import bar_chart, mi_histogram, reliability_diagram, routing_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path, expected_path):
    assert path == expected_path and path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 5_000
    pixels = imread(path)  # [H, W, 4] floats
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 300
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # drawn on, not a blank canvas


def test_reliability_diagram(tmp_path):
    generator = torch.Generator().manual_seed(0)
    confidences = 0.3 + 0.7 * torch.rand(500, generator=generator)
    correct = torch.rand(500, generator=generator) < confidences
    expected = tmp_path / "figures" / "reliability.png"  # parent folder is created
    assert_real_png(reliability_diagram(confidences, correct, expected, title="test"), expected)


def test_routing_heatmap(tmp_path):
    matrix = np.array([[0.97, 0.03], [0.10, 0.90], [0.5, 0.5]])
    expected = tmp_path / "routing.png"
    assert_real_png(routing_heatmap(matrix, ["formal", "casual", "mixed"], expected), expected)
    with pytest.raises(ValueError, match="group_names"):
        routing_heatmap(matrix, ["formal", "casual"], tmp_path / "bad.png")


def test_mi_histogram(tmp_path):
    rng = np.random.default_rng(0)
    mi_by_group = {"in-distribution": rng.exponential(0.02, 300), "out-of-distribution": torch.rand(200) * 0.5}
    expected = tmp_path / "mi.png"
    assert_real_png(mi_histogram(mi_by_group, str(expected)), expected)
    with pytest.raises(ValueError, match="empty"):
        mi_histogram({}, tmp_path / "empty.png")


def test_bar_chart_is_written_and_checks_lengths(tmp_path):
    path = bar_chart({"a": [0.1, 0.5], "b": [0.2, 0.01]}, ["x", "y"], tmp_path / "bars.png", title="t")
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="one value per label"):
        bar_chart({"a": [0.1]}, ["x", "y"], tmp_path / "bad.png")
