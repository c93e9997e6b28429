"""A study's items: image-question pairs with target regions, read and checked before any model work.

Three layouts hold the same columns:
- a JSONL file, one JSON object per line;
- a CSV file with a header row (`boxes` as a JSON string);
- a Hugging Face `imagefolder` folder: `metadata.jsonl` (or `metadata.csv`) whose `file_name` column
  names the image, relative to the metadata file; either at the folder's top, or one per split
  subfolder (`validation/metadata.jsonl`, `test/metadata.jsonl`), whose name becomes the item's split.
  The folder is read directly, offline, with the `datasets` library's rules for these two columns; the
  library itself is not needed.

Columns: `id` (unique; for an imagefolder the image's path inside the folder by default), `image`
(relative to the manifest or absolute), `prompt`, and optionally `answer`, `boxes` ([[x0, y0, x1, y1],
...] in the original image's pixels), `mask` (a mask image, non-zero = target), `target` (the generated
word to score) and `split` (`validation` or `val` marks an item for choosing ranges). A bad row is
reported with its file and line number and skipped; it never stops the study.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from errors import InputError

VALIDATION_SPLITS = ("validation", "val", "valid", "dev")


def spelling(text: str) -> str:
    """`text` without spaces, lower-cased: how a target word and generated tokens are compared."""
    return "".join(text.split()).lower()


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Item:
    """One manifest row, checked: paths resolved, boxes parsed. `line` is 1-based in `source`."""

    line: int
    id: str
    image: Path
    prompt: str
    expected: str | None = None
    boxes: list | None = None
    mask: Path | None = None
    target: str | None = None
    split: str | None = None
    source: str = ""

    @property
    def where(self) -> str:
        """How messages name the item: its file, line and id."""
        return f"{self.source} line {self.line} ({self.id})"


MAX_FIELD_CHARS = 128 * 1024  # one CSV field or JSONL line: a prompt, boxes, a path
MAX_NESTING = 16  # brackets deep in one JSONL row (boxes need 2)


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, raw row) of a JSONL or CSV file; a line that cannot be a row (not valid JSON, not a JSON
    object, nested too deep, a field over MAX_FIELD_CHARS) becomes an error row, and the next line is read."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return _csv_rows(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append((number, _json_row(line)))
    return rows


def _json_row(line: str) -> dict:
    """One JSONL line as a row, or an error row saying why it is not one."""
    if len(line) > MAX_FIELD_CHARS:
        return {"__error__": f"the line has {len(line)} characters, over {MAX_FIELD_CHARS}"}
    if _depth(line) > MAX_NESTING:
        return {"__error__": f"nested more than {MAX_NESTING} deep"}
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return {"__error__": f"not valid JSON ({err.msg})"}
    if not isinstance(row, dict):
        return {"__error__": f"a JSON object per line is needed, got {type(row).__name__}"}
    return row


def _depth(line: str) -> int:
    """The deepest bracket nesting in a line (an upper bound: brackets inside strings count too)."""
    depth = deepest = 0
    for char in line:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _csv_rows(text: str) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV text with a header; a row the reader refuses becomes an error row."""
    reader = csv.reader(text.splitlines())
    header = next(reader, None) or []
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:  # e.g. a field over the reader's limit
            rows.append((reader.line_num, {"__error__": f"not a CSV row ({err})"}))
            continue
        if any(len(value) > MAX_FIELD_CHARS for value in values):
            rows.append((reader.line_num, {"__error__": f"a field over {MAX_FIELD_CHARS} characters"}))
        elif values:
            rows.append((reader.line_num, dict(zip(header, values, strict=False))))


def _metadata(folder: Path) -> Path | None:
    return next((folder / name for name in METADATA_FILES if (folder / name).is_file()), None)


def _sources(path: Path) -> list[tuple[Path, str, str | None]]:
    """(rows file, its name in messages, the split its folder names) for a manifest file or imagefolder."""
    if path.is_file():
        return [(path, path.name, None)]
    if not path.is_dir():
        raise FileNotFoundError(
            f"No manifest {str(path)!r}: give a JSONL or CSV file, or a folder with "
            "metadata.jsonl (a Hugging Face imagefolder)."
        )
    top = _metadata(path)
    if top is not None:
        return [(top, top.name, None)]
    splits = [
        (meta, f"{sub.name}/{meta.name}", sub.name)
        for sub in sorted(path.iterdir())
        if sub.is_dir() and (meta := _metadata(sub)) is not None
    ]
    if not splits:
        raise FileNotFoundError(
            f"The folder {str(path)!r} has no metadata.jsonl or metadata.csv, at its top or in "
            "split subfolders; an imagefolder manifest needs one beside its images."
        )
    return splits


def _item(number: int, row: dict, base: Path, source: str, folder_split: str | None) -> Item:
    """One raw row checked into an Item, or ValueError naming what is wrong."""
    if "__error__" in row:
        raise InputError(row["__error__"])
    if source.endswith(METADATA_FILES):  # imagefolder: the image is `file_name`
        name = str(row.get("file_name") or "").strip()
        if not name:
            raise InputError("missing file_name")
        default_id = f"{folder_split}/{name}" if folder_split else name  # the image's path in the folder
        row = {**row, "image": name, "id": row.get("id") or default_id}
    missing = [key for key in ("id", "image", "prompt") if not str(row.get(key) or "").strip()]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    image = Path(row["image"]) if Path(row["image"]).is_absolute() else base / row["image"]
    if source.endswith(METADATA_FILES) and base.resolve() not in image.resolve().parents:
        raise InputError(f"file_name {row['image']!r} is outside the imagefolder; name an image inside it")
    if not image.is_file():
        raise InputError(f"no image file {str(image)!r}")
    boxes = row.get("boxes") or None
    boxes = json.loads(boxes) if isinstance(boxes, str) and _depth(boxes) <= MAX_NESTING else boxes
    if boxes is not None and not (isinstance(boxes, list) and all(_is_box(b) for b in boxes)):
        raise InputError("boxes must be a list of [x0, y0, x1, y1]: four finite numbers with x0 < x1 and y0 < y1")
    mask = row.get("mask") or None
    mask = (Path(mask) if Path(mask).is_absolute() else base / mask) if mask else None
    if mask is not None and source.endswith(METADATA_FILES) and base.resolve() not in mask.resolve().parents:
        raise InputError(f"mask {str(row['mask'])!r} is outside the imagefolder; name a mask inside it")
    if not boxes and mask is None:
        raise InputError("no target: give boxes or a mask")
    split = str(row.get("split") or "").strip() or folder_split
    return Item(
        number,
        str(row["id"]),
        image,
        str(row["prompt"]),
        row.get("answer") or None,
        boxes,
        mask,
        row.get("target") or None,
        split,
        source,
    )


def read_manifest(path: str | Path) -> tuple[list[Item], list[str]]:
    """(the usable items, in file order; one message per bad row naming its file and line)."""
    path = Path(path)
    items, problems, seen = [], [], {}
    for rows_file, source, folder_split in _sources(path):
        for number, row in _rows(rows_file):
            try:
                item = _item(number, row, rows_file.parent, source, folder_split)
                if item.id in seen:
                    raise InputError(f"the id {item.id!r} is already used on {seen[item.id]}")
            except (ValueError, TypeError, json.JSONDecodeError) as err:
                problems.append(f"{source} line {number}: {err}; skipped")
                continue
            seen[item.id] = f"{source} line {number}"
            items.append(item)
    return items, problems


def is_validation(item: Item, val_fraction: float) -> bool:
    """Whether an item is one of those that choose the ranges: its split says validation, or it has no
    split and its id falls in a stable share `val_fraction` of ids (a hash of the id, so every process
    and every rerun agrees, whatever the order of the items)."""
    if item.split is not None:
        return item.split.lower() in VALIDATION_SPLITS
    draw = int.from_bytes(hashlib.sha256(item.id.encode("utf-8")).digest()[:8], "big") / 2**64  # in [0, 1)
    return draw < val_fraction


def _is_box(box) -> bool:
    """Four finite numbers (not booleans) with x0 < x1 and y0 < y1."""
    if not (isinstance(box, list) and len(box) == 4):
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    return box[0] < box[2] and box[1] < box[3]
