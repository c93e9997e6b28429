"""Knockout studies on the demo model: the per-item columns, the layer-sweep table, the summary's sign test,
resuming, and the command line's checks."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import batch
from causal.positions import box_positions
from config import DEMO_MODEL_DIR, DEMO_RANGES
from model_holder import ModelHolder
from study.items import COLUMNS, StudySettings
from study.knockout import KNOCKOUT_COLUMNS, knockout_columns, topk_positions
from study.manifest import read_manifest
from study.runner import run_study
from test_study import write_manifest

LAYERS, HEADS = DEMO_RANGES
ALL = ("box", "topk", "random")
DRAWS = 2  # control regions per item: few, for speed


@pytest.fixture(scope="module")
def holder() -> ModelHolder:
    return ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")


def _manifest_with_a_mask_item(folder: Path) -> Path:
    """Two demo scenes with boxes, then one item whose target is a mask only."""
    manifest = write_manifest(folder, 2)
    size = Image.open(folder / "img0.png").size
    mask = np.zeros(size[::-1], dtype=np.uint8)  # (height, width)
    mask[: size[1] // 2, : size[0] // 2] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    row = {"id": "masked", "image": "img0.png", "prompt": "What shape is green?", "mask": "mask.png"}
    manifest.write_text(manifest.read_text() + json.dumps(row) + "\n")
    return manifest


def test_a_knockout_study_writes_its_columns_sweep_and_sign_test_and_resumes(holder, tmp_path, monkeypatch, capsys):
    manifest = _manifest_with_a_mask_item(tmp_path / "data")
    out = tmp_path / "out"
    code = batch.main(
        [
            *("--model", str(DEMO_MODEL_DIR), "--manifest", str(manifest), "--out", str(out)),
            *("--layers", f"{LAYERS[0]}-{LAYERS[1]}", "--heads", f"{HEADS[0]}-{HEADS[1]}"),
            *("--device", "cpu", "--max-new-tokens", "2"),
            *("--knockout", "box,topk,random", "--knockout-draws", str(DRAWS)),
        ]
    )
    assert code == 1  # the mask-only item's knockout is a problem
    results = pd.read_parquet(out / "results.parquet")
    assert list(results.columns) == list(COLUMNS + KNOCKOUT_COLUMNS)
    scored = results[results["item_id"] != "masked"]
    assert np.isfinite(scored[list(KNOCKOUT_COLUMNS)].to_numpy()).all()
    assert results.loc[results["item_id"] == "masked", list(KNOCKOUT_COLUMNS)].isna().all(axis=None)
    assert scored["ko_box_rel"].lt(scored["ko_random_rel"]).all()  # the demo model reads the box
    sweep = pd.read_parquet(out / "knockout.parquet")
    conditions = ["box_token", "box_question", "image_question", "control_mean"]
    assert list(sweep.columns) == ["item_id", "split", "layer", "lo", "hi", "condition", "relative_change"]
    assert len(sweep) == 2 * len(conditions) * holder.num_layers and "masked" not in set(sweep["item_id"])
    assert (sweep.groupby(["item_id", "condition"]).size() == holder.num_layers).all()
    assert list(sweep["condition"][: len(conditions)]) == conditions
    assert (sweep["lo"] == 0).all() and (sweep["hi"] == holder.num_layers - 1).all()  # 9 layers > the model's 4
    # With every window all layers, the sweep's box → token and control are the columns' knockouts.
    whole = sweep[sweep["layer"] == 0].pivot(index="item_id", columns="condition", values="relative_change")
    per_item = scored.drop_duplicates("item_id").set_index("item_id")
    np.testing.assert_allclose(whole["box_token"], per_item["ko_box_rel"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(whole["control_mean"], per_item["ko_random_rel"], rtol=1e-4, atol=1e-6)
    summary = (out / "summary.md").read_text()
    assert "## Knockout" in summary and "- top-k map cells: " in summary
    assert "the box lowers the token's probability more than the control in 2 of 2 items" in summary
    assert "one-sided sign test p = 0.25" in summary and "- box → token: layer " in summary
    assert "(masked): knockout needs a target box" in summary
    # Resumed after losing the merged files: nothing is generated again, every value comes back.
    for name in ("results.parquet", "results.csv", "knockout.parquet", "knockout.csv"):
        (out / name).unlink()
    calls = []
    monkeypatch.setattr(holder, "generate", lambda *args, **kwargs: calls.append(args) or None)
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2, knockout=ALL, knockout_draws=DRAWS)
    again, problems = run_study(holder, manifest, out, settings)
    assert calls == [] and len(problems) == 1
    pd.testing.assert_frame_equal(again, results)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "knockout.parquet"), sweep)
    with pytest.raises(ValueError, match="other settings .knockout_window differ"):
        run_study(holder, manifest, out, replace(settings, knockout_window=3))


def test_only_the_asked_knockouts_are_run_and_topk_blocks_the_maps_highest_cells(holder, tmp_path):
    from attention_processor import token_heatmap

    (item,), _ = read_manifest(write_manifest(tmp_path, 1))
    run = holder.generate(Image.open(item.image), item.prompt, max_new_tokens=2)
    found = knockout_columns(holder, run, 0, item.boxes, (LAYERS, HEADS), ("topk",), DRAWS)
    assert found["ko_box_rel"] is None and found["ko_random_rel"] is None and np.isfinite(found["ko_topk_rel"])
    heat = token_heatmap(run, 0, LAYERS, HEADS)  # (grid_h, grid_w)
    region = box_positions(run, item.boxes[0])
    top = topk_positions(run, heat, region)
    assert len(top) == len(region)  # one view: every region token is on it
    cells = np.searchsorted(run.vision.token_positions, top)
    assert heat.ravel()[cells].min() >= np.delete(heat.ravel(), cells).max()


def test_an_unknown_knockout_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"Unknown knockout\(s\) \['boxes'\]; choose from box, topk, random"):
        StudySettings(knockout=("box", "boxes")).check()
    manifest = write_manifest(tmp_path / "data", 1)
    argv = ["--model", "not-loaded", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        batch.main([*argv, "--knockout", "box,everything"])
    assert exit_info.value.code == 2
    assert "Unknown knockout(s) ['everything']; choose from box, topk, random" in capsys.readouterr().err


def test_a_study_older_than_the_knockout_settings_still_resumes(holder, tmp_path):
    manifest = write_manifest(tmp_path / "data", 1)
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2)
    first, _ = run_study(holder, manifest, tmp_path / "out", settings)
    assert list(first.columns) == list(COLUMNS)  # no knockout, no knockout columns
    path = tmp_path / "out" / "parts" / "settings.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({key: value for key, value in record.items() if not key.startswith("knockout")}))
    again, _ = run_study(holder, manifest, tmp_path / "out", settings)
    assert again.equals(first) and not (tmp_path / "out" / "knockout.csv").exists()
