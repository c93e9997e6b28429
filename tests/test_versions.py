"""The package ranges, the lock CI installs, and the refusal of a transformers release outside the range
a family works with."""

import dataclasses
import re

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

import families
from conftest import REPO
from errors import UnsupportedModelError
from model_holder import ModelHolder


def _requirements(name: str) -> list[Requirement]:
    lines = (REPO / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements-lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_requirements_declare_ranges_and_the_loader_checks_the_same_transformers_range():
    declared = {req.name: req for req in _requirements("requirements.txt")}
    assert str(declared["transformers"].specifier) == str(Requirement(f"transformers{families.TRANSFORMERS}").specifier)
    pinned = [name for name, req in declared.items() if any(spec.operator == "==" for spec in req.specifier)]
    assert pinned == [], f"pinned in requirements.txt (keep exact versions in the lock): {pinned}"


def test_the_lock_pins_every_requirement_inside_its_range():
    lock = _lock()
    for req in _requirements("requirements.txt") + _requirements("requirements-dev.txt"):
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        assert key in lock, f"{req.name} is not in requirements-lock.txt; run scripts/write_lock.py"
        assert req.specifier.contains(lock[key], prereleases=True), f"{req.name}=={lock[key]} is outside {req}"
    assert Version(lock["transformers"]) in Requirement(f"transformers{families.TRANSFORMERS}").specifier


def test_the_cpu_requirements_take_the_locked_torch_from_the_cpu_index():
    lock = _lock()
    cpu = (REPO / "requirements-cpu.txt").read_text().splitlines()
    assert "-r requirements.txt" in cpu and "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    assert {f"torch=={lock['torch']}+cpu", f"torchvision=={lock['torchvision']}+cpu"} <= set(cpu)
    readme = (REPO / "README.md").read_text()
    assert "pip install -r requirements-cpu.txt -r requirements-dev.txt -c requirements-lock.txt" in readme


def test_the_readme_and_ci_install_with_the_lock():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert "-c requirements-lock.txt" in first_block
    assert "-c requirements-lock.txt" in (REPO / ".ci" / "run").read_text()
    assert f"transformers{families.TRANSFORMERS}" in readme or "transformers `>=5.23,<6`" in readme


@pytest.mark.parametrize("version", ["5.22.2", "6.0.0", "4.57.6"])
def test_a_release_outside_the_range_is_refused_with_the_working_range(version):
    with pytest.raises(UnsupportedModelError, match=rf"transformers {re.escape(version)}.*>=5.23,<6"):
        families.check_transformers("qwen2_5_vl", version)


def test_the_installed_release_is_inside_the_range():
    families.check_transformers("qwen2_5_vl")  # raises if not
    assert Version(transformers.__version__) >= Version("5.23")


def test_a_family_narrowed_by_its_spec_is_refused_only_where_it_breaks(monkeypatch):
    narrowed = dataclasses.replace(families.SPECS["llava"], transformers="!=5.24.0")
    monkeypatch.setitem(families.SPECS, "llava", narrowed)
    with pytest.raises(
        UnsupportedModelError, match=r"LLaVA-1\.5 is not supported on transformers 5\.24\.0.*!=5\.24\.0"
    ):
        families.check_transformers("llava", "5.24.0")
    families.check_transformers("llava", "5.25.0")
    families.check_transformers("qwen2_5_vl", "5.24.0")  # the other families are not narrowed


def test_loading_refuses_a_family_on_a_release_it_breaks_before_the_weights(monkeypatch, tiny_model_dirs):
    """Through the real loading path: the refusal comes before the processor or the weights are read."""
    narrowed = dataclasses.replace(families.SPECS["qwen2_5_vl"], transformers=f"<{transformers.__version__}")
    monkeypatch.setitem(families.SPECS, "qwen2_5_vl", narrowed)
    with pytest.raises(
        UnsupportedModelError, match=rf"not supported on transformers {re.escape(transformers.__version__)}"
    ):
        ModelHolder.load(tiny_model_dirs["qwen2_5_vl"], device="cpu", dtype="float32")
