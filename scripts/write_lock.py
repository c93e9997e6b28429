"""Write requirements-lock.txt: the exact version of every package that requirements.txt and
requirements-dev.txt bring in, as installed in the environment the tests passed in.

pip resolves the two files (without installing anything) to learn which packages they bring in; each is
then pinned at the version installed here, or, where it is not installed, at the version pip resolved.
The lock is used as constraints, so packages a machine does not need (CUDA libraries on a CPU install)
are never installed because of it.

    python scripts/write_lock.py        # in the venv the tests passed in
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = """\
# The versions CI installs and tests, used as constraints beside the ranges of requirements.txt:
#   pip install -r requirements.txt -r requirements-dev.txt -c requirements-lock.txt
# Written by scripts/write_lock.py from the environment the tests passed in; do not edit by hand.
"""


def resolved() -> dict[str, str]:
    """name -> version that pip would install for the two requirement files in an empty environment."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report)]
            + ["-r", str(REPO / "requirements.txt"), "-r", str(REPO / "requirements-dev.txt")],
            check=True,
        )
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in items}


def main() -> None:
    pins = []
    for name, version in sorted(resolved().items(), key=lambda item: item[0].lower()):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
        pins.append(f"{name}=={version.split('+')[0]}")  # a local label (+cpu, +cu130) is the machine's choice
    (REPO / "requirements-lock.txt").write_text(HEADER + "\n".join(pins) + "\n")
    print(f"wrote requirements-lock.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
