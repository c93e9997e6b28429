"""The import rules of ARCHITECTURE.md, read from the modules' own source with ast."""

import ast
import subprocess
import sys

from conftest import REPO

MODULES = {path.stem: path for path in REPO.glob("*.py")}
PACKAGES = {path.parent.name: path.parent for path in REPO.glob("*/__init__.py") if path.parent.name != "tests"}
MODULES.update(PACKAGES)                                       # a package counts as one module: all its files
UI_MODULES = {"app", "handlers", "analysis_handlers", "components"}
DRAWING_AND_NUMBERS = {"views", "view_parts", "stored_run", "metrics", "report", "analysis", "attention_processor",
                       "visualization", "gallery", "localization", "study_plots"}


def _imports(name: str) -> set[str]:
    """Top-level names of every module `name` imports, wherever in the file the import stands."""
    found, path = set(), MODULES[name]
    sources = sorted(path.glob("*.py")) if path.is_dir() else [path]
    for node in (node for source in sources for node in ast.walk(ast.parse(source.read_text(encoding="utf-8")))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _project_imports(name: str) -> set[str]:
    return _imports(name) & set(MODULES)


def test_the_rules_see_the_project():
    assert {"records", "attention_store", "app", "views", "model_holder", "families"} <= set(MODULES)
    assert "gradio" in _imports("app") and "records" in _project_imports("views")


def test_only_the_ui_imports_gradio():
    assert {name for name in MODULES if "gradio" in _imports(name)} <= UI_MODULES


def test_records_stand_on_nothing_but_the_store_math():
    assert _project_imports("records") <= {"attention_store"}
    assert _project_imports("attention_store") == set()


def test_a_studys_manifest_and_range_choice_stand_on_nothing_of_the_project():
    assert _project_imports("manifest") == set() and _project_imports("localization") == set()


def test_analysis_computes_and_never_draws():
    assert not _imports("analysis") & {"PIL", "cv2", "visualization", "views", "gallery", "report"}


def test_drawing_and_numbers_never_reach_for_the_model():
    for name in DRAWING_AND_NUMBERS:
        assert not _project_imports(name) & {"attention_extractor", "model_holder", "pipeline", "explain"}, name


def test_nothing_imports_the_app_and_there_are_no_cycles():
    graph = {name: _project_imports(name) - {name} for name in MODULES}
    assert not [name for name, deps in graph.items() if "app" in deps]
    assert not [name for name, deps in graph.items() if deps & UI_MODULES and name not in UI_MODULES]
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
    watched = ("transformers", "gradio", "attention_extractor", "families")
    code = f"import sys, records, attention_store; print(sorted(m for m in {watched} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
