"""The batch CLI on a tiny model: file names and counts, the JSON log, bad files and bad arguments."""

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime

import pytest
from PIL import Image

import batch
from conftest import REPO, noise_image
from model_holder import ModelHolder

FAMILY = "qwen2_5_vl"  # tiny: 3 layers × 4 heads


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A PNG, a corrupt file in the middle, and a JPEG."""
    folder = tmp_path_factory.mktemp("batch_images")
    noise_image(150, 100, seed=1).save(folder / "first.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a picture")
    noise_image(100, 150, seed=2).save(folder / "third.jpg")
    return [str(folder / name) for name in ("first.png", "broken.png", "third.jpg")]


@pytest.fixture(scope="module")
def per_head_batch(tiny_model_dirs, images, tmp_path_factory):
    """One in-process run with --aggregate none over 3 images × 2 prompts; the middle image is broken."""
    out = tmp_path_factory.mktemp("batch_out")
    argv = [
        "--model",
        str(tiny_model_dirs[FAMILY]),
        "--images",
        *images,
        "--prompts",
        "What is this?",
        'Describe <the> "image" & more',
        "--out",
        str(out),
        "--aggregate",
        "none",
        "--layers",
        "1-2",
        "--heads",
        "0-1",
        "--steps",
        "0,2",
        "--max-new-tokens",
        "3",
        "--min-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    return out, batch.main(argv)


def test_file_labels_are_one_based():
    assert batch.file_stem(0, 0, 0) == "S1_L1_H1"
    assert batch.file_stem(4, 2, 3) == "S5_L3_H4"
    assert batch.file_stem(9) == "S10"


def test_step_and_range_specs():
    assert batch.parse_steps("all") is None
    assert batch.parse_steps("0,1,5") == (0, 1, 5)
    assert batch.parse_steps("0-3") == (0, 1, 2, 3)
    assert batch.parse_steps("5, 0-2,1") == (0, 1, 2, 5)
    assert batch.parse_range("2") == (2, 2)
    for bad in ("3-1", "x", "-1", "1-", "", "0,,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="step spec"):
            batch.parse_steps(bad)


def test_per_head_files_composites_and_counts(per_head_batch):
    out, code = per_head_batch
    folders = sorted(path.name for path in out.iterdir())
    assert folders == ["001_first__prompt01", "001_first__prompt02", "003_third__prompt01", "003_third__prompt02"]
    expected = {f"S{s}_L{layer}_H{h}.png" for s in (1, 3) for layer in (2, 3) for h in (1, 2)}  # 1-based names
    expected |= {"composite_S1.png", "composite_S3.png", "run.json"}
    for name in folders:
        assert {path.name for path in (out / name).iterdir()} == expected
    composite = Image.open(out / folders[0] / "composite_S1.png")
    assert composite.size[0] >= 150 and composite.size[1] > 100  # the label strip under the picture
    assert Image.open(out / folders[0] / "S3_L3_H2.png").size == (150, 100)


def test_json_log(per_head_batch, images, tiny_model_dirs):
    out, _ = per_head_batch
    log = json.loads((out / "003_third__prompt02" / "run.json").read_text(encoding="utf-8"))
    datetime.fromisoformat(log["timestamp"])
    assert log["model_id"] == str(tiny_model_dirs[FAMILY]) and log["family"] == FAMILY
    assert log["image_path"] == images[2] and log["prompt"] == 'Describe <the> "image" & more'
    params = log["parameters"]
    assert params["layers"] == [1, 2] and params["heads"] == [0, 1] and params["steps"] == [0, 2]
    assert params["aggregate"] == "none" and params["max_new_tokens"] == 3 and params["colormap"] == "jet"
    assert isinstance(log["output_text"], str)
    assert [t["step_idx"] for t in log["tokens"]] == [0, 1, 2]
    assert [t["file_label"] for t in log["tokens"]] == ["S1", "S2", "S3"]
    assert all(
        isinstance(t["id"], int) and isinstance(t["token"], str) and 0 <= t["image_share"] <= 1 for t in log["tokens"]
    )
    grid_h, grid_w = log["vision"]["grid_hw"]
    assert grid_h * grid_w == len(log["vision"]["token_positions"])
    assert log["vision"]["image_size"] == [100, 150]
    pngs = [path.name for path in (out / "003_third__prompt02").iterdir() if path.suffix == ".png"]
    assert sorted(log["files"]) == sorted(pngs)


def test_bad_file_in_the_middle_does_not_stop_the_others(per_head_batch):
    out, code = per_head_batch
    assert code == 1
    assert not any("broken" in path.name for path in out.iterdir())
    assert len(list(out.glob("*/run.json"))) == 4


def test_failures_listed_at_the_end(tiny_model_dirs, images, tmp_path, capsys, monkeypatch):
    original = ModelHolder.generate

    def generate(self, image, prompt, *args, **kwargs):
        if prompt == "boom":
            raise RuntimeError("generation exploded")
        return original(self, image, prompt, *args, **kwargs)

    monkeypatch.setattr(ModelHolder, "generate", generate)
    code = batch.main(
        [
            "--model",
            str(tiny_model_dirs[FAMILY]),
            "--images",
            *images,
            "--prompts",
            "boom",
            "ok",
            "--out",
            str(tmp_path),
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "4 of 6 pairs failed" in err
    assert err.count("generation exploded") == 2 and err.count("ImageLoadError") == 2
    assert "broken.png" in err
    assert len(list(tmp_path.glob("*/run.json"))) == 2  # the 'ok' prompt on both good images


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "0-3"], "outside the model, which has 3 layers"),
        (["--heads", "2-9"], "outside the model, which has 4 heads"),
        (["--steps", "0-4", "--max-new-tokens", "3"], "raise --max-new-tokens"),
        (["--steps", "two"], "Bad step spec"),
        (["--layers", "2-1"], "inverted"),
        (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    ],
)
def test_bad_arguments_stop_before_any_work(tiny_model_dirs, images, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        batch.main(
            [
                "--model",
                str(tiny_model_dirs[FAMILY]),
                "--images",
                images[0],
                "--prompts",
                "Hi",
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                *extra,
            ]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_prompts_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit):
        batch.main(
            [
                "--model",
                "unused",
                "--images",
                "a.png",
                "--prompts-file",
                str(tmp_path / "empty.txt"),
                "--out",
                str(tmp_path),
            ]
        )
    assert "No prompts given" in capsys.readouterr().err


def test_cli_subprocess_all_fine(tiny_model_dirs, images, tmp_path):
    (tmp_path / "prompts.txt").write_text("What is this?\n\nWhere is the cat?\n", encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "batch.py"),
            "--model",
            str(tiny_model_dirs[FAMILY]),
            "--images",
            images[0],
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "all",
            "--max-new-tokens",
            "2",
            "--min-new-tokens",
            "2",
            "--device",
            "cpu",
            "--report",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All 2 pairs written" in result.stdout
    assert "2/2" in result.stderr  # the tqdm bar
    for folder in ("001_first__prompt01", "001_first__prompt02"):
        names = {path.name for path in (tmp_path / "out" / folder).iterdir()}
        assert names == {"composite_S1.png", "composite_S2.png", "report.html", "run.json"}
    log = json.loads((tmp_path / "out" / "001_first__prompt02" / "run.json").read_text(encoding="utf-8"))
    assert log["prompt"] == "Where is the cat?" and log["parameters"]["layers"] == [0, 2]
