"""Every registered map method on the demo model's held-out scenes, scored as a study scores them.

The localization benchmark's test scenes (`demo_data`, its TEST_SEED, never trained on) are written as
an imagefolder manifest with their target boxes into a temporary folder, and run through the study code
that `batch.py --manifest` runs (`study.runner.run_study`) with every method of `methods.METHODS`. The
table printed is the study's own method table (`study.outputs.method_table`, as in its summary.md):
per method the pointing game, attention ratio and Otsu IoU as means over the scenes with their 95%
bootstrap intervals, and the mean ms per map; then the machine, the date and the wall time. The same
table comes from

    python -m demo.data --imagefolder DIR/test 31337 N
    python batch.py --model demo_model --manifest DIR --out OUT --methods all --max-new-tokens 2 \\
        --layers 1-3 --heads 0-3 --device cpu --dtype float32

    nice -n 15 python bench/bench_methods.py [--scenes 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from batch import parse_range  # noqa: E402
from bench.bench_knockout import commit, machine  # noqa: E402
from bench.bench_localization import TEST_SEED  # noqa: E402
from config import DEMO_MODEL_DIR, DEMO_RANGES  # noqa: E402
from demo import data as demo_data  # noqa: E402
from methods import METHODS  # noqa: E402
from model_holder import ModelHolder  # noqa: E402
from study.items import StudySettings  # noqa: E402
from study.outputs import method_table  # noqa: E402
from study.runner import run_study  # noqa: E402

MAX_NEW_TOKENS = 2  # the answer word and the end of the turn: step 0 is scored


def methods_study(holder: ModelHolder, scenes: int, out: Path, seed: int = TEST_SEED, layers=None, heads=None):
    """The scenes of `seed` as `out`/data (an imagefolder with one test split) and every method's study of
    them in `out`/study; returns run_study's (results, problems)."""
    demo_data.write_imagefolder(str(out / "data" / "test"), seed, scenes)
    settings = StudySettings(layers=layers, heads=heads, max_new_tokens=MAX_NEW_TOKENS, methods=tuple(METHODS))
    return run_study(holder, out / "data", out / "study", settings)


def report(results, problems, scenes: int, seed: int, model: str, wall: float) -> str:
    lines = [
        "## Map methods on the demo model's held-out scenes",
        "",
        f"model {model}; {scenes} scenes of seed {seed}{' (the localization test seed)' if seed == TEST_SEED else ''}, "
        f"the answer token (step 0) scored against the target object's box; every method of methods.METHODS "
        f"through study.runner.run_study (what `batch.py --manifest ... --methods all` runs)",
        "",
        *method_table(results),
    ]
    if problems:
        lines += ["", f"{len(problems)} problems:", *[f"- {problem}" for problem in problems]]
    lines += [
        "",
        f"machine: {machine()}; date {datetime.date.today().isoformat()}; commit {commit()}; "
        f"{scenes} scenes; wall time {wall:.1f} s (model load, scene writing and the study; imports excluded)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--scenes", type=int, default=200, help="held-out scenes (test seed)")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="scene seed (default: the localization test seed)")
    p.add_argument("--layers", type=parse_range, default=DEMO_RANGES[0], help="raw attention's layers, LO-HI")
    p.add_argument("--heads", type=parse_range, default=DEMO_RANGES[1], help="raw attention's heads, LO-HI")
    p.add_argument("--out", type=Path, help="keep the scenes and the study here (default: a temporary folder)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    holder = ModelHolder.load(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        results, problems = methods_study(holder, args.scenes, out, args.seed, args.layers, args.heads)
    text = report(results, problems, args.scenes, args.seed, args.model, time.perf_counter() - start)
    print(text)
    return text


if __name__ == "__main__":
    main()
