"""Typed defaults for the whole tool, in one frozen dataclass.

Only `app.py` reads the command line and the environment; it builds an `AppConfig` from them
and passes explicit values down.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from errors import InputError

REPO_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelRanges:
    """A model's recommended layer and head ranges (0-based inclusive), from a `ranges.json` that a study
    (`batch.py --manifest ... --per-head --val-fraction F`) or `bench/bench_localization.py` wrote."""

    model: str
    layers: tuple[int, int]
    heads: tuple[int, int]

    @classmethod
    def read(cls, path: str | Path) -> ModelRanges:
        """The model and ranges of a ranges.json, or InputError naming the field that is wrong. The file is
        held to a schema: a JSON object of at most a few KB and two levels, `model` a non-empty string,
        `layers` and `heads` each [lo, hi] of whole numbers with 0 <= lo <= hi <= 100000 (no floats, booleans,
        strings, NaN or Infinity)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise _ranges_error(path, f"it cannot be read ({err})") from err
        if len(text) > 64 * 1024 or _nesting(text) > 2:
            raise _ranges_error(path, "it is not a small JSON object of model, layers and heads")
        try:
            record = json.loads(text, parse_constant=_no_constant)
        except ValueError as err:
            raise _ranges_error(path, f"it is not valid JSON ({err})") from err
        if not isinstance(record, dict):
            raise _ranges_error(path, f"it holds a JSON {type(record).__name__}, not an object")
        model = record.get("model")
        if not isinstance(model, str) or not model.strip():
            raise _ranges_error(path, "'model' must be the model's id or folder, a non-empty string")
        return cls(model, _range_field(path, record, "layers"), _range_field(path, record, "heads"))

    def fits(self, model_id: str) -> bool:
        """Whether these ranges belong to `model_id`: the same id, or the same local folder."""
        if self.model == model_id:
            return True
        mine, theirs = Path(self.model).expanduser(), Path(model_id).expanduser()
        return mine.is_dir() and theirs.is_dir() and mine.resolve() == theirs.resolve()


def _ranges_error(path, what: str) -> InputError:
    return InputError(
        f"Could not read the ranges file {str(path)!r}: {what}. Give a ranges.json written by a study "
        "(batch.py --manifest ... --per-head) or by bench/bench_localization.py --write-ranges."
    )


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this file may hold")


def _nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings count too: an upper bound)."""
    depth = deepest = 0
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        deepest = max(deepest, depth)
    return deepest


def _range_field(path, record: dict, name: str) -> tuple[int, int]:
    """`record[name]` as an inclusive (lo, hi) of whole numbers, or InputError naming the field."""
    value = record.get(name)
    whole = isinstance(value, list) and all(type(v) is int for v in value)
    if not (whole and len(value) == 2 and 0 <= value[0] <= value[1] <= 100_000):
        raise _ranges_error(
            path, f"'{name}' must be [lo, hi], two whole numbers with 0 <= lo <= hi (0-based), got {value!r}"[:300]
        )
    return value[0], value[1]


MODEL_PRESETS: tuple[str, ...] = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "llava-hf/llava-1.5-7b-hf",
)
GPU_DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DEMO_MODEL_DIR = REPO_DIR / "demo_model"
# The demo model's recommended (layers, heads), 0-based inclusive: the ranges whose mean map points at the
# asked-about object most often on the validation seed of bench/bench_localization.py, which wrote them with
# `--write-ranges demo_model/ranges.json` (localization.choose_ranges, as a study chooses them).
_DEMO = ModelRanges.read(DEMO_MODEL_DIR / "ranges.json")
DEMO_RANGES: tuple[tuple[int, int], tuple[int, int]] = (_DEMO.layers, _DEMO.heads)
EXAMPLES_DIR = REPO_DIR / "examples"


@dataclass(frozen=True)
class AppConfig:
    """Defaults for loading, generation, capture, rendering and serving."""

    model: str | None = None  # hub id or local folder; None = pick by hardware
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    max_new_tokens: int = 64
    colormap: str = "jet"
    alpha: float = 0.5
    aggregation: str = "mean"  # mean | max | min
    normalization: str = "minmax"  # minmax | percentile | shared
    percentile: float = 99.0
    view: str = "overlay"  # overlay | side_by_side | heatmap
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    session_cache_mb: int = 2048  # captured attention kept for all sessions together
    store_device: str = "auto"  # auto | cpu | cuda: where a run's queries and keys stay (attention_store)
    store_budget_mb: float | None = None  # GPU memory all such stores may hold; None: half of what is free
    max_prompt_chars: int = 8000  # longer prompts are refused by the app
    max_upload: str = "50mb"  # largest file the server accepts
    max_gallery_maps: int = 64  # per-head gallery size limit (layers × heads)
    max_gradient_mb: int = 8192  # memory allowed for a gradient-weighted attention pass
    max_pixels_cap: int = 4096 * 4096  # largest image-token budget (Qwen max pixels) a request may ask
    max_image_pixels: int = 150_000_000  # pixels decoded per request, all images together (12000x9000 is 108 M)
    max_images: int = 8  # images in one prompt
    trust_remote_code: bool = False  # run a checkpoint's own Python code (off unless asked for)
    allow_model_loading: bool = True  # users may load other models from the page
    animation_max_side: int = 512  # px, longer side of the animation's frames
    animation_max_frames: int = 128  # a longer answer is animated every k-th token
    export_workers: int = 2  # exports written at once, beside the renders (each session one at a time)
    outputs_max_mb: int = 2048  # exports, pictures and pages kept in outputs/, oldest removed first
    cache_max_age_s: int = 3600  # Gradio's cache of uploads and pictures: files older than this go
    cache_max_mb: int = 1024  # and the oldest beyond this, checked every few minutes (exports.Janitor)
    cache_dir: Path = REPO_DIR / "cache"  # Gradio's cache of this app (unless GRADIO_TEMP_DIR says otherwise)
    ranges: ModelRanges | None = None  # a ranges.json's model and its default layer and head ranges
    presets: tuple[str, ...] = field(default=MODEL_PRESETS)
    outputs_dir: Path = REPO_DIR / "outputs"
