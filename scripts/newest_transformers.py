"""Install the newest transformers release inside the project's range into a folder of its own, beside
the environment's packages, so the exactness tests can run against it without touching the environment.

Only what that release needs and the environment lacks goes into the folder too (a newer tokenizers, say).
Prints the version installed; run the tests with the folder first on PYTHONPATH:

    python scripts/newest_transformers.py .newest-transformers
    PYTHONPATH=.newest-transformers python -m pytest -q tests/test_capture.py
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from families import TRANSFORMERS  # noqa: E402  (the range the loader checks)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", *args], check=True)


def unmet(folder: Path) -> list[str]:
    """The requirements of the release in `folder` that the environment does not satisfy."""
    (dist,) = metadata.distributions(path=[str(folder)], name="transformers")
    needed = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or not requirement.specifier.contains(have, prereleases=True):
            needed.append(str(requirement))
    return needed


def main(folder: str) -> None:
    target = Path(folder).resolve()
    pip("--target", str(target), "--no-deps", f"transformers{TRANSFORMERS}")
    needed = unmet(target)
    if needed:
        pip("--target", str(target), "--no-deps", *needed)
    (dist,) = metadata.distributions(path=[str(target)], name="transformers")
    print(dist.version)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".newest-transformers")
