"""The knockout benchmark runs end to end on the committed demo model and prints finite figures."""

import math
import re

import pytest

from bench import bench_knockout
from config import DEMO_MODEL_DIR

NUMBER = re.compile(r"[+-]?(?:\d+\.\d+|\d+)(?:e[+-]?\d+)?|nan|inf", re.IGNORECASE)


def test_default_window():
    assert [bench_knockout.default_window(n) for n in (1, 2, 3, 4, 5, 12, 28)] == [1, 1, 3, 3, 5, 9, 9]


def test_one_scene_prints_the_table(capsys):
    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        pytest.skip("demo_model/ is absent; build it with `python -m demo.train` (about 20 minutes on 2 cores)")
    text = bench_knockout.main(["--scenes", "1", "--draws", "2"])
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if re.match(r"\| \d+–\d+ \|", line)]
    assert len(rows) == 4  # one window per layer of the 4-layer demo model
    assert "window 3 of 4 decoder layers" in text
    (all_layers,) = [line for line in text.splitlines() if line.startswith("all layers 0–3:")]
    for line in [*rows, all_layers]:
        values = [float(v) for v in NUMBER.findall(line)]
        assert values and all(math.isfinite(v) for v in values), line
    assert re.search(r"machine: .+; date \d{4}-\d\d-\d\d; commit \S+.*; 1 scenes; wall time [\d.]+ s", text)
