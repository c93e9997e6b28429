"""The rules of ARCHITECTURE.md, read from the modules' own source with ast: the floor table, the package
rules, no cycles, and records without side effects."""

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

# Floors, lowest first. A module imports project modules only from its own floor or the floors below it.
# A name is a module's dotted path ("pictures.views") or a whole package ("families", "methods"): the
# longest entry that a module's path starts with places it.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("records", ("errors", "attention_store", "records", "config", "utils", "study.manifest", "demo.data")),
    ("numbers", ("attention_processor", "analysis", "metrics", "visualization", "study.localization")),
    ("capture", ("families", "attention_extractor")),
    ("model", ("loading", "causal", "model_holder", "methods")),
    ("pictures", ("pictures",)),
    ("door", ("pipeline", "exports", "batch", "study", "notebook")),
    ("fixtures", ("testing", "demo")),
    ("ui", ("ui", "app")),
)
PACKAGES = ("ui", "causal", "methods", "notebook", "pictures", "study", "testing", "demo", "families")
# The one reference up the floors: a run displays itself in a notebook (`AttentionRun.show`, `.explore`),
# importing the notebook floor inside those methods when they are called, never when records is imported.
LATE_BOUND = {"records": {"notebook.inline", "notebook.explorer"}}


def _modules() -> dict[str, object]:
    """Every production module by dotted name: the top-level files and every file in the packages."""
    found = {path.stem: path for path in REPO.glob("*.py")}
    for package in PACKAGES:
        for path in (REPO / package).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


MODULES = _modules()


def _floor(name: str) -> int:
    matches = [
        (len(entry), index)
        for index, (_, entries) in enumerate(FLOORS)
        for entry in entries
        if name == entry or name.startswith(entry + ".")
    ]
    assert matches, f"{name} sits on no floor: add it to FLOORS in tests/test_architecture.py and ARCHITECTURE.md"
    return max(matches)[1]


def _imports(name: str) -> set[str]:
    """Dotted names of every module `name` imports, wherever in the file the import stands, resolved to the
    project modules they are (`from pictures.views import render` → pictures.views; `from methods import
    lens` → methods.lens)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return found


def _project_imports(name: str) -> set[str]:
    return {module for module in _imports(name) if module in MODULES} - {name} - LATE_BOUND.get(name, set())


def test_the_late_bound_imports_stand_only_inside_functions():
    for name, late in LATE_BOUND.items():
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        top = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.col_offset == 0 and node.module in late
        }
        inside = {
            node.module
            for func in ast.walk(tree)
            if isinstance(func, ast.FunctionDef)
            for node in ast.walk(func)
            if isinstance(node, ast.ImportFrom)
        }
        assert not top and late <= inside, (name, top, inside)


def _third_party(name: str) -> set[str]:
    return {module.split(".")[0] for module in _imports(name)}


def test_the_rules_see_the_project():
    assert {
        "records",
        "attention_store",
        "app",
        "pictures.views",
        "model_holder",
        "families",
        "methods",
        "ui.handlers",
        "study.runner",
        "testing.tiny_models",
    } <= set(MODULES)
    assert "gradio" in _third_party("app") and "records" in _project_imports("pictures.views")
    assert "methods.lens" in _project_imports("pipeline")  # `from methods import lens` resolves


def test_every_module_sits_on_a_floor_and_imports_only_downwards():
    upward = [
        f"{name} ({FLOORS[_floor(name)][0]}) imports {dep} ({FLOORS[_floor(dep)][0]})"
        for name in MODULES
        for dep in _project_imports(name)
        if _floor(dep) > _floor(name)
    ]
    assert not upward, upward


def test_the_top_level_holds_at_most_sixteen_modules():
    assert len(list(REPO.glob("*.py"))) <= 16


def test_only_the_ui_imports_gradio():
    assert {name for name in MODULES if "gradio" in _third_party(name)} <= {"app"} | {
        name for name in MODULES if name == "ui" or name.startswith("ui.")
    }


def test_pictures_never_reach_for_the_model():
    forbidden = {"attention_extractor", "model_holder", "pipeline", "loading"}
    for name in (name for name in MODULES if name.startswith("pictures")):
        deps = _project_imports(name)
        assert not deps & forbidden and not [dep for dep in deps if dep.split(".")[0] in ("methods", "causal")], name


def test_studies_never_import_the_ui_and_nothing_production_imports_the_fixtures():
    for name in MODULES:
        roots = {dep.split(".")[0] for dep in _project_imports(name)}
        if name.startswith("study"):
            assert "ui" not in roots and "app" not in roots, name
        if name.split(".")[0] not in ("testing", "demo"):
            allowed = {"demo.data"} if name in ("app", "ui.layout") else set()  # the page shows the demo's questions
            assert not {dep for dep in _project_imports(name) if dep.split(".")[0] in ("testing", "demo")} - allowed, (
                name
            )


def test_records_stand_on_nothing_but_the_store_math_and_the_errors():
    assert _project_imports("records") <= {"attention_store", "errors"}
    assert _project_imports("attention_store") <= {"errors"} and _project_imports("errors") == set()


def test_a_studys_manifest_and_range_choice_stand_on_nothing_but_the_errors():
    assert _project_imports("study.manifest") <= {"errors"} and _project_imports("study.localization") <= {"errors"}


def test_analysis_computes_and_never_draws():
    assert not _third_party("analysis") & {"PIL", "cv2", "visualization", "pictures"}


def test_nothing_imports_the_app_and_there_are_no_cycles():
    graph = {name: _project_imports(name) for name in MODULES}
    assert not [name for name, deps in graph.items() if "app" in deps]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name not in done:
            for dep in graph[name]:
                visit(dep, path + (name,))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_importing_records_has_no_side_effects():
    watched = ("transformers", "gradio", "attention_extractor", "families", "notebook", "pictures")
    code = f"import sys, records, attention_store; print(sorted(m for m in {watched} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _defined(name: str) -> set[str]:
    """The names a module defines itself: functions, classes and assignments at its top level."""
    tree, names = ast.parse(MODULES[name].read_text(encoding="utf-8")), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    return names


def test_every_name_is_imported_from_its_home():
    """No re-exports: `from X import name` finds `name` defined in X (or X.name is a module of the package)."""
    sources = {
        **MODULES,
        **{f"tests.{path.stem}": path for path in (REPO / "tests").glob("*.py")},
        **{f"bench.{path.stem}": path for path in (REPO / "bench").glob("*.py")},
    }
    wrong = []
    for name, path in sources.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
                wrong += [
                    f"{name}: from {node.module} import {alias.name}"
                    for alias in node.names
                    if alias.name not in _defined(node.module) and f"{node.module}.{alias.name}" not in MODULES
                ]
    assert not wrong, wrong


def test_the_package_declares_every_module():
    """`pip install .` installs what the top level and the packages hold (pyproject's lists)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setup["py-modules"]) == sorted(path.stem for path in REPO.glob("*.py"))
    assert sorted(setup["packages"]) == sorted(PACKAGES)


def _calls(name: str) -> set[str]:
    """Attribute names called in module `name` (`x.register_forward_hook(...)` → register_forward_hook)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    return {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def test_hooks_and_attention_implementations_are_switched_only_by_the_recorder():
    switching = {"register_forward_hook", "register_forward_pre_hook", "set_attn_implementation"}
    users = {name for name in MODULES if _calls(name) & switching and not name.startswith(("testing", "demo"))}
    assert users <= {"attention_extractor", "families"}, users  # `recording` and the context it uses


def test_handlers_never_take_locks_or_start_threads():
    for name in (name for name in MODULES if name.startswith("ui")):
        assert "threading" not in _third_party(name) and not _calls(name) & {"acquire", "Thread"}, name
        assert not re.search(r"\.lock\b", MODULES[name].read_text(encoding="utf-8")), name  # the model lock
