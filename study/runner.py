"""A dataset study: a manifest of image-question pairs with target regions in, scored maps out;
resumable after a crash, and shared between processes.

    python batch.py --model M --manifest items.jsonl --out DIR [--layers 1-3] [--heads 0-3] [--methods ...]
    accelerate launch --num_processes N batch.py --model M --manifest items.jsonl --out DIR ...

The manifest (a JSONL or CSV file, or a Hugging Face imagefolder; see `manifest.py`) lists the items;
`study_items.score_item` scores one. Each process scores its share of the items not finished yet
(`accelerate.PartialState.split_between_processes`) and appends one JSON line per finished item to
`DIR/parts/part-<rank>.jsonl`, flushed to disk before the next item starts, so a crash loses at most
the items in hand: a rerun with the same settings skips every finished id. When all processes are
done, the main process merges the parts into DIR's results (`study_outputs.write_outputs`).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from errors import InputError
from model_holder import ModelHolder
from study.items import COLUMNS, StudySettings, score_item
from study.manifest import Item, read_manifest
from study.outputs import write_outputs

logger = logging.getLogger(__name__)
PARTS = "parts"  # DIR/parts/: one part file per process, and the settings they share
SETTINGS_FILE = "settings.json"
DEFAULTS = json.loads(json.dumps(asdict(StudySettings())))  # what a settings file older than a field meant


class OneProcess:
    """What `run_study` uses of `accelerate.PartialState`, for a study in this process alone."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass

    @contextmanager
    def split_between_processes(self, items: list):
        yield items


def read_parts(parts: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(finished records by item id, the last failure by item id) from every part file. A line cut off
    by a crash is ignored; an item found twice keeps its first record."""
    finished, failed = {}, {}
    for path in sorted(parts.glob("part-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written line of a crash
            if "failed" in record:
                failed[record["item_id"]] = record["failed"]
            else:
                finished.setdefault(record["item_id"], record)
    return finished, {item_id: why for item_id, why in failed.items() if item_id not in finished}


def _open_part(path: Path):
    """The part file for appending, after cutting off a last line that a crash left unfinished."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as part:
                part.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def _append(part, record: dict) -> None:
    """One item's line, on disk before the next item starts."""
    part.write(json.dumps(record, ensure_ascii=False) + "\n")
    part.flush()
    os.fsync(part.fileno())


def _check_settings(parts: Path, record: dict, state) -> None:
    """The settings of this run, written by the main process on the first run and compared by every
    process on a rerun: finished items are only skipped when they were scored the same way. A setting
    that a study's file lacks (the study is older than it) counts as its default."""
    path = parts / SETTINGS_FILE
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    state.wait_for_everyone()
    before = {**DEFAULTS, **json.loads(path.read_text(encoding="utf-8"))}
    if before != record:
        changed = ", ".join(key for key in record if before.get(key) != record[key])
        raise InputError(
            f"{parts.parent} holds a study made with other settings ({changed} differ). Rerun with "
            f"the same settings to resume it, or give another --out (or delete {parts}) to start anew."
        )


def _score_share(holder: ModelHolder, mine: list[Item], settings: StudySettings, part_path: Path, state) -> None:
    """Score this process's items, appending each to its part file; the main process shows progress."""
    desc = "items" if state.num_processes == 1 else f"items (process 0's share of {state.num_processes})"
    with (
        _open_part(part_path) as part,
        logging_redirect_tqdm(),
        tqdm(mine, desc=desc, unit="item", disable=not state.is_main_process) as bar,
    ):
        for item in bar:
            try:
                scores = score_item(holder, item, settings)
            except (ValueError, OSError, TypeError, RuntimeError, LookupError, ArithmeticError) as err:
                # a bad item never stops the study (out of memory does: it is a MemoryError)
                logger.warning("%s: %s; skipped", item.where, err)
                _append(part, {"item_id": item.id, "failed": f"{item.where}: {err}; skipped"})
                continue
            _append(part, {"item_id": item.id, **asdict(scores)})
            logger.debug("scored %s", item.where)


def run_study(
    holder: ModelHolder, manifest: str | Path, out: str | Path, settings: StudySettings | None = None, state=None
) -> tuple[pd.DataFrame, list[str]]:
    """Score every usable item that is not finished yet; then the main process writes the results to
    `out`. state: an `accelerate.PartialState` to share the items between processes (None: this one).
    Returns (results, problems) on the main process, and (no rows, []) on the others."""
    settings = settings or StudySettings()
    settings.check()
    state = state or OneProcess()
    out = Path(out)
    parts = out / PARTS
    items, problems = read_manifest(manifest)
    layers = settings.layers or (0, holder.num_layers - 1)
    heads = settings.heads or (0, holder.num_heads - 1)
    record = {
        "model": holder.model_id,
        "manifest": str(Path(manifest).resolve()),
        **asdict(settings),
        "layers": list(layers),
        "heads": list(heads),
    }
    _check_settings(parts, json.loads(json.dumps(record)), state)
    finished, _ = read_parts(parts)
    state.wait_for_everyone()  # all have read before anyone appends
    todo = [item for item in items if item.id not in finished]
    if finished and state.is_main_process:
        logger.info(
            "%d of %d items are already scored in %s; %d to go", len(items) - len(todo), len(items), out, len(todo)
        )
    with state.split_between_processes(todo) as mine:
        _score_share(holder, list(mine), settings, parts / f"part-{state.process_index}.jsonl", state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return pd.DataFrame(columns=list(COLUMNS)), []
    finished, failed = read_parts(parts)
    problems += [failed[item.id] for item in items if item.id in failed]
    return write_outputs(out, items, finished, problems, holder.model_id, settings)
