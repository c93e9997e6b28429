"""The methods benchmark runs every registered method through the study code and prints its table."""

import math
import re

import pytest

from bench import bench_methods
from config import DEMO_MODEL_DIR
from methods import METHODS

INTERVAL = re.compile(r"([\d.]+) \[([\d.]+), ([\d.]+)\]")


def test_three_scenes_print_the_studys_own_table_for_every_method(tmp_path, capsys):
    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        pytest.skip("demo_model/ is absent; build it with `python -m demo.train` (about 20 minutes on 2 cores)")
    text = bench_methods.main(["--scenes", "3", "--out", str(tmp_path)])
    assert text in capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)  # every method, none failed
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert all(row in summary for row in rows)  # the study's summary.md holds the same table
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[3] == "3"
        for cell in cells[4:7]:
            mean, lo, hi = (float(v) for v in INTERVAL.fullmatch(cell).groups())
            assert lo <= mean <= hi
        assert math.isfinite(float(cells[7])) and float(cells[7]) >= 0
    assert len(list((tmp_path / "data" / "test").glob("*.png"))) == 3
    assert re.search(r"machine: .+ cores visible.+; date \d{4}-\d\d-\d\d; commit \S+.*; 3 scenes; wall time", text)
