"""The page wired by name: the API's parameter names, a new view control that follows into the wiring,
the API and the outputs a new result resets, and one registry of map methods everywhere."""

import ast
import re
from dataclasses import make_dataclass

import gradio as gr

import app
from config import AppConfig
from conftest import REPO
from methods import METHODS
from pipeline import ModelSlot, RunStore
from study.items import StudySettings
from ui.controls import DerivedViews, ViewControls, control, generate_outputs, names, redraws, resets
from ui.handlers import Handlers

VIEW = [
    "token",
    "layer_lo",
    "layer_hi",
    "head_lo",
    "head_hi",
    "aggregation",
    "normalization",
    "colormap",
    "alpha",
    "view",
    "grid",
    "renormalize",
    "mask_sinks",
    "relative",
    "prompt_token",
    "exclude_system",
    "method",
    "target_box",
    "smooth",
    "tokens",
    "combine",
    "contrast_token",
    "contrast_prompt",
    "parts",
]
# The parameter names gradio_client saw before the page was wired by name; clients depend on them.
API_NAMES = {
    "/load_model": ["model_id"],
    "/generate": [
        "image",
        "prompt",
        "max_new_tokens",
        "sample",
        "temperature",
        "top_p",
        "min_pixels",
        "max_pixels",
        *VIEW,
    ],
    "/render": VIEW,
    "/method": VIEW,
    "/analysis": ["metric", *VIEW],
    "/logit_lens": [],
    "/verify": VIEW,
    "/gallery_zip": VIEW,
    "/download_png": VIEW,
    "/download_animation": VIEW,
    "/export_attention": [],
    "/knockout": ["target", "top_k", "in_ranges", *VIEW],
    "/knockout_sweep": ["window", "in_ranges", *VIEW],
    "/contrast": VIEW,
    "/compare_keep": [],
    "/compare": ["match", *VIEW],
}


def _api(demo) -> dict[str, list[str]]:
    return {
        name: [p["parameter_name"] for p in endpoint["parameters"]]
        for name, endpoint in demo.get_api_info()["named_endpoints"].items()
    }


def _build(record=ViewControls, tmp_path=None):
    cfg = AppConfig(outputs_dir=tmp_path) if tmp_path else AppConfig()
    return app.build_ui(cfg, ModelSlot(), RunStore(16), record)


def test_the_api_keeps_its_parameter_names_and_only_the_image_and_prompt_are_required():
    demo = _build()
    assert _api(demo) == API_NAMES
    assert names(ViewControls) == tuple(VIEW)
    required = {
        name: [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
        for name, endpoint in demo.get_api_info()["named_endpoints"].items()
    }
    assert required.pop("/generate") == ["image", "prompt"] and not any(required.values()), required


def test_a_new_view_control_follows_into_the_page_the_api_and_the_resets(tmp_path):
    extended = make_dataclass(
        "Extended",
        [("dummy", object, control(7, reset=3, make=lambda: gr.Number(7, label="dummy", elem_id="dummy-control")))],
        bases=(ViewControls,),
        frozen=True,
    )
    demo = _build(extended, tmp_path)
    api = _api(demo)
    for endpoint in ("/render", "/method", "/verify", "/download_png", "/generate", "/analysis"):
        assert api[endpoint][-1] == "dummy", endpoint  # named in every view endpoint, last
    assert api["/load_model"] == ["model_id"] and api["/export_attention"] == []
    dummy_id = next(block._id for block in demo.blocks.values() if getattr(block, "elem_id", None) == "dummy-control")
    config = demo.get_config_file()
    render = [dep for dep in config["dependencies"] if dep.get("api_name") == "render"]
    assert [dummy_id, "input"] in [list(target) for target in render[0]["targets"]]  # its change redraws
    assert all(dep["inputs"][-1] == dummy_id for dep in render)
    assert "dummy" in redraws(extended) and resets(extended)["dummy"] == 3
    outputs = generate_outputs(extended)
    assert "dummy" in outputs and outputs[-len(names(DerivedViews)) - 2 :] == (*names(DerivedViews), "files", "word")
    generate = next(dep for dep in config["dependencies"] if dep.get("api_name") == "generate")
    assert dummy_id in generate["outputs"] and len(generate["outputs"]) == len(outputs)
    h = Handlers(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(16), extended)
    assert h.generate_outputs == outputs and h._view((0,) * len(VIEW) + (9,))["dummy"] == 9
    assert h._view(())["dummy"] == 7  # left out: the API's default


def test_the_registry_is_the_one_list_of_map_methods():
    demo = _build()
    radio = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "method")
    assert [value for _, value in radio.choices] == list(METHODS)
    StudySettings(methods=tuple(METHODS)).check()  # the study takes every method
    batch_help = (REPO / "batch.py").read_text()
    assert "', '.join(METHODS)" in batch_help and 'tuple(METHODS) if methods == ("all",)' in batch_help
    # No module but the registry spells out a method's name.
    names_of_methods = [name for name in METHODS if name != "attention"]
    for path in [
        *REPO.glob("*.py"),
        *(REPO / "ui").glob("*.py"),
        *(REPO / "pictures").glob("*.py"),
        *(REPO / "study").glob("*.py"),
    ]:
        strings = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not strings & set(names_of_methods), path


def test_no_output_tuple_is_counted_by_hand():
    for path in [REPO / "app.py", *(REPO / "ui").glob("*.py")]:
        source = path.read_text()
        assert not re.search(r"\(gr\.skip\(\),\)\s*\*", source), path  # (gr.skip(),) * n
        assert "CLEARED_VIEWS" not in source and "DERIVED_VIEWS" not in source, path
