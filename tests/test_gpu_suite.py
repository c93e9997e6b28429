"""bench/gpu_suite.py runs whole on the CPU at scaled-down dimensions, so the one command meant for a GPU
is known to work before a GPU is at hand."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_suite  # noqa: E402


def test_the_gpu_suite_runs_on_the_cpu_and_writes_every_case(tmp_path, capsys):
    out = tmp_path / "suite.json"
    result = gpu_suite.main(["--cpu-check", "--out", str(out), "--repeats", "1", "--pause-s", "0.2"])
    written = json.loads(out.read_text())
    assert written["capture"] == result["capture"] and written["device"] == "cpu"
    planned = [(side, tokens) for cases in gpu_suite.CPU_PLAN.values() for side, tokens in cases]
    assert [(row["side"], row["tokens"]) for row in written["capture"]] == planned and not written["skipped"]
    for row in written["capture"]:
        assert row["plain_s"] > 0 and row["ours_s"] > 0 and row["time_ratio"] == row["ours_s"] / row["plain_s"]
        assert row["prompt_tokens"] > 0
    switched = [row for row in written["switch"]]
    assert len(switched) == sum(tokens == gpu_suite.SWITCH_TOKENS["cpu"] for _, tokens in planned)
    for row in switched:
        assert row["placement"] == "queries and keys on the host"
        assert row["frames"] == row["tokens"] and row["animation_ms"] > 0
        assert 0 < row["cached_ms"] and 0 < row["next_ms"] and 0 < row["jump_ms"]
    assert written["tests"]["returncode"] == 0 and "skipped" in written["tests"]["summary"]  # no CUDA here
    printed = capsys.readouterr().out
    assert "| dims | image | prompt tokens |" in printed and "| tiny | 224² |" in printed
