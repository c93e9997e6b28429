"""Every manifest row is checked on its own: a malformed one is reported with its line number and skipped,
never a traceback; fields and masks are bounded; an imagefolder's paths stay inside it; the CSV a
spreadsheet opens runs no formula, while the Parquet file keeps the exact text."""

import json

import pandas as pd
import pytest
from PIL import Image

from config import DEMO_MODEL_DIR
from conftest import noise_image
from model_holder import ModelHolder
from study.items import StudySettings
from study.manifest import MAX_FIELD_CHARS, read_manifest
from study.outputs import spreadsheet_safe
from study.runner import run_study

GOOD = {"id": "ok", "image": "a.png", "prompt": "Where is it?", "boxes": [[1, 1, 20, 20]]}


@pytest.fixture
def folder(tmp_path):
    noise_image(40, 30).save(tmp_path / "a.png")
    return tmp_path


def test_malformed_jsonl_lines_are_skipped_with_their_line_numbers(folder):
    lines = [
        json.dumps(GOOD),
        json.dumps([1, 2, 3]),  # an array
        json.dumps("just a string"),
        "[" * 5000 + "]" * 5000,  # nested past the JSON reader's recursion limit
        json.dumps({**GOOD, "id": "long", "prompt": "x" * (MAX_FIELD_CHARS + 1)}),
        json.dumps({**GOOD, "id": "deepbox", "boxes": json.dumps([[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]])}),
        json.dumps({**GOOD, "id": "ok2"}),
    ]
    manifest = folder / "items.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    items, problems = read_manifest(manifest)
    assert [item.id for item in items] == ["ok", "ok2"]
    assert [p.split(":")[0] for p in problems] == [f"items.jsonl line {n}" for n in (2, 3, 4, 5, 6)]
    assert "JSON object per line" in problems[0] and "nested more than" in problems[2]
    assert "characters, over" in problems[3] and "nested more than" in problems[4]


def test_a_csv_field_over_the_limit_skips_its_row_only(folder):
    manifest = folder / "items.csv"
    huge = "y" * (200 * 1024)  # over Python's csv field limit too
    manifest.write_text(
        "id,image,prompt,boxes\n"
        'a,a.png,Where?,"[[1, 1, 20, 20]]"\n'
        f'b,a.png,{huge},"[[1, 1, 20, 20]]"\n'
        'c,a.png,Where?,"[[1, 1, 20, 20]]"\n'
        f'd,a.png,Where?,"{"[" * 5000 + "]" * 5000}"\n'
    )
    items, problems = read_manifest(manifest)
    assert [item.id for item in items] == ["a", "c"]
    assert [p.split(":")[0] for p in problems] == ["items.csv line 3", "items.csv line 5"]
    assert "boxes must be a list" in problems[1]


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_an_imagefolder_file_name_must_stay_inside_the_folder(tmp_path, name):
    folder = tmp_path / "data"
    folder.mkdir()
    noise_image(40, 30).save(folder / "a.png")
    noise_image(40, 30).save(tmp_path / "outside.png")
    rows = [{"file_name": "a.png", "prompt": "Where?", "boxes": [[1, 1, 20, 20]]}]
    rows.append({"file_name": name, "prompt": "Where?", "boxes": [[1, 1, 20, 20]]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items, problems = read_manifest(folder)
    assert [item.id for item in items] == ["a.png"]
    assert len(problems) == 1 and "outside the imagefolder" in problems[0] and "line 2" in problems[0]


def test_formulas_are_escaped_in_the_csv_and_kept_in_the_parquet():
    frame = pd.DataFrame({"prompt": ["=HYPERLINK(1)", "+1", "-2+3", "@SUM(A1)", "plain", None], "score": range(6)})
    safe = spreadsheet_safe(frame)
    assert list(safe["prompt"][:5]) == ["'=HYPERLINK(1)", "'+1", "'-2+3", "'@SUM(A1)", "plain"]
    assert pd.isna(safe["prompt"][5]) and list(safe["score"]) == list(range(6))  # numbers untouched
    assert frame["prompt"][0] == "=HYPERLINK(1)"  # the original (what Parquet gets) is not changed


def test_a_study_with_bad_rows_and_a_mask_bomb_scores_the_rest(tmp_path):
    holder = ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    folder = tmp_path / "data"
    folder.mkdir()
    noise_image(64, 48).save(folder / "a.png")
    bomb = folder / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # ~100 KB on disk, 900 M pixels decoded
    rows = [
        json.dumps({**GOOD, "id": "=cmd|' /C calc'!A0"}),
        json.dumps({**GOOD, "id": "bomb", "boxes": None, "mask": "bomb.png"}),
        json.dumps(["not", "an", "object"]),
    ]
    (folder / "items.jsonl").write_text("\n".join(rows) + "\n")
    results, problems = run_study(
        holder, folder / "items.jsonl", tmp_path / "out", StudySettings(methods=("attention",))
    )
    assert set(results["item_id"]) == {"=cmd|' /C calc'!A0"}
    assert any("line 3" in p and "JSON object per line" in p for p in problems)
    assert any("bomb" in p and "megapixels" in p for p in problems)
    written = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(written["item_id"]) == {"'=cmd|' /C calc'!A0"}  # a spreadsheet shows it as text
    exact = tmp_path / "out" / "results.parquet"
    if exact.exists():
        assert set(pd.read_parquet(exact)["item_id"]) == {"=cmd|' /C calc'!A0"}


def test_nonsense_study_settings_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import batch
    from model_holder import ModelHolder as Holder

    monkeypatch.setattr(Holder, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps(GOOD) + "\n")
    for flags in (["--max-new-tokens", "0"], ["--knockout-window", "0"], ["--val-fraction", "1.5"]):
        with pytest.raises(SystemExit):
            batch.main(["--model", "m", "--manifest", str(manifest), "--out", str(tmp_path / "o"), *flags])
