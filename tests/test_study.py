"""Dataset studies on the demo model: every map method, manifests in every layout, localisation heads."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from config import DEMO_MODEL_DIR, DEMO_RANGES
from conftest import noise_image
from demo import data as demo_data
from model_holder import ModelHolder
from study.items import StudySettings
from study.manifest import is_validation, read_manifest
from study.runner import run_study

SEED = 626_262  # neither training (string seeds) nor the benchmark's seeds
LAYERS, HEADS = DEMO_RANGES


@pytest.fixture(scope="module")
def holder() -> ModelHolder:
    return ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")


def write_manifest(folder: Path, n: int, seed: int = SEED, **extra) -> Path:
    """A JSONL manifest of `n` demo scenes, their images beside it; `extra` adds columns to every row."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, sample in enumerate(demo_data.make_samples(seed, n)):
        sample.image.save(folder / f"img{k}.png")
        rows.append(
            {
                "id": f"s{k}",
                "image": f"img{k}.png",
                "prompt": sample.question,
                "answer": sample.answer,
                "boxes": [list(sample.box_xyxy)],
                **extra,
            }
        )
    manifest = folder / "items.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def test_the_vit_and_relative_maps_are_scored_like_the_others(holder, tmp_path):
    manifest = write_manifest(tmp_path / "data", 3)
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2, methods=("attention", "vit"), relative=True)
    results, problems = run_study(holder, manifest, tmp_path / "out", settings)
    assert problems == []
    kinds = list(zip(results["method"], results["relative"], strict=True))
    assert kinds == [("attention", False), ("attention", True), ("vit", False)] * 3
    vit = results[results["method"] == "vit"]
    assert (vit["layers"] == f"{LAYERS[0]}-{LAYERS[1]}").all() and vit["iou"].between(0, 1).all()
    assert vit["pointing_hit"].mean() >= 2 / 3  # the patch map still points
    relative = results[results["relative"]]
    raw = results[(results["method"] == "attention") & ~results["relative"]]
    assert relative["attention_ratio"].gt(0).all()
    assert not np.allclose(relative["attention_ratio"].to_numpy(), raw["attention_ratio"].to_numpy())
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| attention, relative to a generic prompt |" in summary and "| vit |" in summary


def test_a_model_without_the_vit_map_says_so_per_item_and_keeps_the_other_methods(tmp_path):
    from testing.tiny_models import make_tiny_model

    model = ModelHolder.load(make_tiny_model("gemma3", tmp_path / "gemma3", seed=5), device="cpu", dtype="float32")
    for k in range(2):
        noise_image(120, 90, seed=k).save(tmp_path / f"n{k}.png")
    manifest = tmp_path / "items.csv"
    manifest.write_text(
        "id,image,prompt,boxes\n" + "".join(f'n{k},n{k}.png,What is this?,"[[0, 0, 60, 45]]"\n' for k in range(2))
    )
    settings = StudySettings(max_new_tokens=4, methods=("attention", "vit"))
    results, problems = run_study(model, manifest, tmp_path / "out", settings)
    assert list(results["method"]) == ["attention", "attention"]
    assert len(problems) == 2 and all("vit: The ViT-combined map is not available" in p for p in problems)
    assert "items.csv line 2 (n0)" in problems[0] and "the others scored" in problems[0]


def _imagefolder(root: Path, rows: dict[str, list[dict]]) -> Path:
    """An imagefolder: per subfolder ('' = the top) its images and metadata.jsonl with file_name rows."""
    for sub, entries in rows.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for k, entry in enumerate(entries):
            if entry.get("file_name", "").endswith(".png"):
                noise_image(56, 56, seed=k).save(root / sub / entry["file_name"])
        (root / sub / "metadata.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return root


def test_an_imagefolder_reads_like_a_manifest_with_file_name_for_the_image(tmp_path):
    box = [[0, 0, 28, 28]]
    root = _imagefolder(
        tmp_path / "flat",
        {
            "": [
                {"file_name": "a.png", "prompt": "Where?", "boxes": box, "split": "validation"},
                {"file_name": "b.png", "id": "second", "prompt": "What?", "boxes": box, "answer": "red"},
                {"prompt": "No image?", "boxes": box},
                {"file_name": "c.png", "id": "second", "prompt": "Again?", "boxes": box},
            ]
        },
    )
    items, problems = read_manifest(root)
    assert [(item.id, item.split, item.expected) for item in items] == [
        ("a.png", "validation", None),
        ("second", None, "red"),
    ]
    assert items[0].image == root / "a.png" and items[1].where == "metadata.jsonl line 2 (second)"
    assert problems == [
        "metadata.jsonl line 3: missing file_name; skipped",
        "metadata.jsonl line 4: the id 'second' is already used on metadata.jsonl line 2; skipped",
    ]
    root = _imagefolder(
        tmp_path / "splits",
        {
            "validation": [{"file_name": "a.png", "prompt": "Where?", "boxes": box}],
            "test": [{"file_name": "a.png", "prompt": "Where?", "boxes": box}],
        },
    )
    items, problems = read_manifest(root)  # split subfolders, sorted by name
    assert [(item.id, item.split) for item in items] == [("test/a.png", "test"), ("validation/a.png", "validation")]
    assert problems == [] and items[1].image == root / "validation" / "a.png"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        read_manifest(tmp_path / "empty")
    demo_data.write_imagefolder(str(tmp_path / "scenes" / "validation"), SEED, 2)  # the README's first study
    items, problems = read_manifest(tmp_path / "scenes")
    assert [item.id for item in items] == [f"validation/{SEED}_0000.png", f"validation/{SEED}_0001.png"]
    assert problems == [] and all(item.split == "validation" and item.boxes for item in items)


def test_the_validation_share_is_stable_and_a_split_column_wins(tmp_path):
    from study.manifest import Item, is_validation

    items = [Item(k, f"item-{k}", tmp_path, "p") for k in range(2000)]
    chosen = [is_validation(item, 0.25) for item in items]
    assert 0.22 < np.mean(chosen) < 0.28 and chosen == [is_validation(item, 0.25) for item in reversed(items)][::-1]
    assert not any(is_validation(item, 0.0) for item in items)
    assert is_validation(Item(1, "x", tmp_path, "p", split="val"), 0.0)
    assert not is_validation(Item(1, "x", tmp_path, "p", split="test"), 1.0)


def test_an_imagefolder_study_scores_what_the_same_jsonl_manifest_scores(holder, tmp_path):
    manifest = write_manifest(tmp_path / "data", 2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    metadata = [{"file_name": row.pop("image"), **row} for row in rows]
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metadata))
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2)
    from_jsonl, _ = run_study(holder, manifest, tmp_path / "a", settings)
    from_folder, problems = run_study(holder, tmp_path / "data", tmp_path / "b", settings)
    untimed = ["map_seconds"]  # the one column that differs between two runs
    assert problems == [] and from_folder.drop(columns=untimed).equals(from_jsonl.drop(columns=untimed))


def test_localisation_heads_and_ranges_chosen_on_validation_items(holder, tmp_path):
    from PIL import Image

    from attention_processor import token_heatmap
    from config import ModelRanges
    from metrics import pointing_hit, target_mask
    from study.localization import choose_ranges, contiguous_ranges

    manifest = write_manifest(tmp_path / "data", 10)
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2, per_head=True, val_fraction=0.5)
    run_study(holder, manifest, tmp_path / "out", settings)
    heads = pd.read_parquet(tmp_path / "out" / "heads.parquet")
    assert len(heads) == 10 * 4 * (1 + 4)  # per item: 4 layers x (their mean + 4 heads)
    assert heads["head_idx"].isna().sum() == 40 and set(heads["layer_idx"]) == {0, 1, 2, 3}
    assert heads["attention_ratio"].ge(0).all()
    # The chosen ranges are localization's choice over the same maps, made here from token_heatmap.
    items, _ = read_manifest(manifest)
    record = json.loads((tmp_path / "out" / "ranges.json").read_text())
    validation = [item for item in items if is_validation(item, 0.5)]
    assert record["validation"]["items"] == len(validation) and record["test"]["items"] == 10 - len(validation)
    pairs = contiguous_ranges(range(4))
    hits = []
    for item in validation:
        image = Image.open(item.image)
        run = holder.generate(image, item.prompt, max_new_tokens=2)
        region = target_mask(image.size, item.boxes)
        hits.append([[pointing_hit(token_heatmap(run, 0, lr, hr), run.vision, region) for hr in pairs] for lr in pairs])
    choice = choose_ranges(np.array(hits), pairs, pairs)
    assert (tuple(record["layers"]), tuple(record["heads"]), record["validation"]["pointing"]) == (
        choice.layers,
        choice.heads,
        choice.pointing,
    )
    assert ModelRanges.read(tmp_path / "out" / "ranges.json").model == str(DEMO_MODEL_DIR)
    for name in ("localization_heads.png", "localization_layers.png"):
        assert Image.open(tmp_path / "out" / name).size[0] >= 300
    assert "localization_heads.png" in (tmp_path / "out" / "summary.md").read_text()


def test_a_crashed_study_resumes_without_redoing_or_losing_an_item(holder, tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "data", 5)
    settings = StudySettings(LAYERS, HEADS, max_new_tokens=2, per_head=True)
    first, _ = run_study(holder, manifest, tmp_path / "out", settings)
    part = tmp_path / "out" / "parts" / "part-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:40])  # the crash: two items on disk, one half-written
    for name in ("results.csv", "results.parquet", "heads.parquet"):
        (tmp_path / "out" / name).unlink()
    calls = []
    generate = holder.generate
    monkeypatch.setattr(holder, "generate", lambda *args, **kwargs: calls.append(args[1]) or generate(*args, **kwargs))
    again, problems = run_study(holder, manifest, tmp_path / "out", settings)
    assert len(calls) == 3 and problems == []  # only the three unfinished items
    unchanged = first.iloc[:2].equals(again.iloc[:2])  # the two items on disk: read back as they were
    untimed = ["map_seconds"]  # the three items scored again took their own time
    assert unchanged and again.drop(columns=untimed).equals(first.drop(columns=untimed))
    assert list(again["item_id"]) == [f"s{k}" for k in range(5)]
    assert len(pd.read_parquet(tmp_path / "out" / "heads.parquet")) == 5 * 20
    assert len(part.read_text().splitlines()) == 5  # the half line was cut off
    with pytest.raises(ValueError, match="other settings"):
        run_study(holder, manifest, tmp_path / "out", StudySettings(LAYERS, HEADS, max_new_tokens=3))


def test_two_processes_share_the_items_and_merge_what_one_process_makes(holder, tmp_path):
    import subprocess
    import sys

    import torch

    from conftest import REPO

    manifest = write_manifest(tmp_path / "data", 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes below
    try:
        alone, _ = run_study(
            holder,
            manifest,
            tmp_path / "one",
            StudySettings(LAYERS, HEADS, max_new_tokens=2, per_head=True, val_fraction=0.5),
        )
    finally:
        torch.set_num_threads(threads)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "batch.py",
        "--model",
        str(DEMO_MODEL_DIR),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "two"),
        "--layers",
        f"{LAYERS[0]}-{LAYERS[1]}",
        "--heads",
        f"{HEADS[0]}-{HEADS[1]}",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
        "--threads",
        "1",
        "--val-fraction",
        "0.5",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 2 of 2: cpu, 1 torch threads" in done.stderr
    parts = sorted((tmp_path / "two" / "parts").glob("part-*.jsonl"))
    assert [len(part.read_text().splitlines()) for part in parts] == [3, 3]  # each process scored its share
    merged = pd.read_parquet(tmp_path / "two" / "results.parquet")
    assert list(merged["item_id"]) == list(alone["item_id"]) == [f"s{k}" for k in range(6)]
    for column in ("answer", "correct", "token", "pointing_hit", "attention_ratio", "iou"):
        assert list(merged[column]) == list(alone[column]), column
    assert (tmp_path / "two" / "ranges.json").read_text() == (tmp_path / "one" / "ranges.json").read_text()


def _cells(summary: str, name: str) -> list[str]:
    (line,) = [line for line in summary.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def _interval(cell: str) -> tuple[float, float, float]:
    mean, lo, hi = re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups()
    return float(mean), float(lo), float(hi)


def test_the_method_table_has_bootstrap_intervals_and_times_and_an_older_study_still_resumes(holder, tmp_path, capsys):
    import batch
    from study.items import COLUMNS

    manifest = write_manifest(tmp_path / "data", 4)
    out = tmp_path / "out"
    argv = ["--model", str(DEMO_MODEL_DIR), "--manifest", str(manifest), "--out", str(out), "--device", "cpu"]
    assert batch.main([*argv, "--max-new-tokens", "2", "--methods", "attention,rollout"]) == 0
    printed = capsys.readouterr().out
    first = pd.read_parquet(out / "results.parquet")
    assert list(first.columns) == list(COLUMNS) and first["map_seconds"].gt(0).all()
    summary = (out / "summary.md").read_text()
    assert "95% percentile-bootstrap intervals" in summary and "| ms per map |" in summary
    for name in ("attention", "rollout"):
        rows = first[first["method"] == name]
        cells = _cells(summary, name)
        assert cells[3] == "4" and cells == _cells(printed, name)  # batch.py prints the same table
        for cell, column in zip(cells[4:7], ("pointing_hit", "attention_ratio", "iou"), strict=True):
            mean, lo, hi = _interval(cell)
            assert mean == pytest.approx(rows[column].astype(float).mean(), abs=5e-4) and lo <= mean <= hi
        assert float(cells[7]) == pytest.approx(rows["map_seconds"].mean() * 1000, abs=0.05)
    # A study scored before map_seconds existed: its part lines have no time; two items are still to do.
    part = out / "parts" / "part-0.jsonl"
    records = [json.loads(line) for line in part.read_text().splitlines()[:2]]
    for record in records:
        for row in record["rows"]:
            del row["map_seconds"]
    part.write_text("".join(json.dumps(record) + "\n" for record in records))
    settings = StudySettings(max_new_tokens=2, methods=("attention", "rollout"))
    again, problems = run_study(holder, manifest, out, settings)
    assert problems == [] and list(again.columns) == list(COLUMNS)
    assert again["map_seconds"].isna().tolist() == [True] * 4 + [False] * 4
    untimed = ["map_seconds"]
    assert again.drop(columns=untimed).equals(first.drop(columns=untimed))
    cells = _cells((out / "summary.md").read_text(), "rollout")
    timed = again[(again["method"] == "rollout") & again["map_seconds"].notna()]
    assert float(cells[7]) == pytest.approx(timed["map_seconds"].mean() * 1000, abs=0.05)
    assert pd.read_parquet(out / "results.parquet")["map_seconds"].isna().sum() == 4


def test_a_target_word_is_the_first_run_of_tokens_that_spells_it():
    from study.items import scored_steps

    assert scored_steps(["Ap", "ple", " is", " red"], "apple") == [0, 1]
    assert scored_steps([" The", " red"], " Red ") == [1]  # one token, as before
    assert scored_steps(["ap", "ap", "ple"], "apple") == [1, 2]  # a false start gives way
    assert scored_steps(["x", " ", "ice", " ", "cream", "ice", "cream"], "ice cream") == [2, 3, 4]  # spaces ignored
    assert scored_steps(["?", " ", "Blue"], None) == [2]  # no target: the first word, one token
    with pytest.raises(ValueError, match="spells 'pear'"):
        scored_steps(["pe", "a"], "pear")
    with pytest.raises(ValueError, match="no word to score"):
        scored_steps(["?", "!"], None)


def test_a_target_split_into_two_tokens_scores_the_sum_of_their_maps(load_holder, tmp_path):
    from attention_processor import combine_maps
    from methods import MapRequest, compute_maps
    from metrics import attention_ratio, otsu_iou, pointing_hit, target_mask

    holder = load_holder("qwen2_vl")
    image = noise_image(120, 90, seed=2)
    image.save(tmp_path / "n.png")
    run = holder.generate(image, "What is this?", max_new_tokens=8)
    assert run.generated_tokens[3:6] == ["þ", "E", "gle"]  # read off this tiny model: "Egle" is two tokens
    box = [0, 0, 60, 45]
    row = {"id": "n", "image": "n.png", "prompt": "What is this?", "target": "egle", "boxes": [box]}
    (tmp_path / "items.jsonl").write_text(json.dumps(row) + "\n")
    settings = StudySettings(max_new_tokens=8, methods=("attention", "rollout", "tam"), per_head=True)
    results, problems = run_study(holder, tmp_path / "items.jsonl", tmp_path / "out", settings)
    assert problems == [] and list(results["token"]) == ["Egle"] * 3  # the joined word
    region = target_mask(image.size, [box])
    everything = (0, holder.num_layers - 1), (0, holder.num_heads - 1)
    for name, found in zip(results["method"], results.itertuples(), strict=True):
        maps = compute_maps(name, MapRequest(holder, run, [4, 5], *everything))
        heat = combine_maps(maps, "sum")  # (grid_h, grid_w)
        assert not np.allclose(heat, maps[0]), name  # the second token adds to the first's map
        assert found.pointing_hit == pointing_hit(heat, run.vision, region), name
        assert found.attention_ratio == pytest.approx(attention_ratio(heat, run.vision, region), rel=1e-5), name
        assert found.iou == pytest.approx(otsu_iou(heat, run.vision, region), rel=1e-5), name
    heads = pd.read_parquet(tmp_path / "out" / "heads.parquet")
    assert len(heads) == holder.num_layers * (1 + holder.num_heads)


def test_function_words_are_scored_per_method_with_the_object_score_and_their_f1(
    load_holder, tiny_model_dirs, tmp_path
):
    import batch
    from methods import MapRequest, compute_maps
    from metrics import off_share
    from study.function_words import FUNCTION_COLUMNS, f1

    holder = load_holder("qwen2_vl")
    rows = []
    for k, (seed, prompt) in enumerate([(3, "Describe the image."), (2, "What is this?")]):
        noise_image(120, 90, seed=seed).save(tmp_path / f"n{k}.png")
        rows.append({"id": f"n{k}", "image": f"n{k}.png", "prompt": prompt, "boxes": [[0, 0, 60, 45]]})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model_dirs["qwen2_vl"]), "--manifest", str(tmp_path / "items.jsonl")]
    argv += ["--out", str(out), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"]
    assert batch.main([*argv, "--methods", "attention,rollout", "--function-words"]) == 0
    words = pd.read_parquet(out / "function_words.parquet")
    assert list(words.columns) == list(FUNCTION_COLUMNS)
    # read off this tiny model: ' a' is the fourth token of the first answer and the seventh of the second
    assert list(zip(words["item_id"], words["method"], words["step_idx"], words["token"], strict=True)) == [
        ("n0", "attention", 3, " a"),
        ("n0", "rollout", 3, " a"),
        ("n1", "attention", 6, " a"),
        ("n1", "rollout", 6, " a"),
    ]
    run = holder.generate(noise_image(120, 90, seed=2), "What is this?", max_new_tokens=8)
    everything = (0, holder.num_layers - 1), (0, holder.num_heads - 1)
    (heat,) = compute_maps("rollout", MapRequest(holder, run, [6], *everything))
    assert words["function_score"].iloc[3] == pytest.approx(off_share(heat, run.vision), abs=1e-6)
    assert words["function_score"].between(0, 1).all()
    results = pd.read_parquet(out / "results.parquet")
    summary = (out / "summary.md").read_text()
    assert "## Function words" in summary
    for method in ("attention", "rollout"):
        o = results.loc[results["method"] == method, "iou"].mean()
        f = words.loc[words["method"] == method, "function_score"].mean()
        assert f"| {method} | 2 | {o:.3f} | 2 | {f:.3f} | {f1(o, f):.3f} |" in summary
    assert f1(0.5, 1.0) == pytest.approx(2 / 3) and f1(0.0, 0.0) == 0.0 and np.isnan(f1(0.5, np.nan))
    # Without the option: no table, no section, and the setting is part of what a resume compares.
    again, _ = run_study(holder, tmp_path / "items.jsonl", tmp_path / "plain", StudySettings(max_new_tokens=8))
    assert not (tmp_path / "plain" / "function_words.csv").exists()
    assert "Function words" not in (tmp_path / "plain" / "summary.md").read_text()
    with pytest.raises(ValueError, match="function_words differ"):
        run_study(
            holder, tmp_path / "items.jsonl", tmp_path / "plain", StudySettings(max_new_tokens=8, function_words=True)
        )
