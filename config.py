"""Typed defaults for the whole tool, in one frozen dataclass.

Only `app.py` reads the command line and the environment; it builds an `AppConfig` from them
and passes explicit values down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent

MODEL_PRESETS: tuple[str, ...] = (
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct",
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2-VL-7B-Instruct",
    "llava-hf/llava-1.5-7b-hf",
)
GPU_DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DEMO_MODEL_DIR = REPO_DIR / "demo_model"
# The demo model's recommended (layers, heads), 0-based inclusive, chosen by bench/bench_localization.py
# on its validation seed: the ranges whose mean map points at the asked-about object most often.
DEMO_RANGES: tuple[tuple[int, int], tuple[int, int]] = ((1, 3), (0, 3))
EXAMPLES_DIR = REPO_DIR / "examples"


@dataclass(frozen=True)
class AppConfig:
    """Defaults for loading, generation, capture, rendering and serving."""

    model: str | None = None                  # hub id or local folder; None = pick by hardware
    device: str = "auto"                      # auto | cuda | cpu
    dtype: str = "auto"                       # auto | bfloat16 | float16 | float32
    max_new_tokens: int = 64
    colormap: str = "jet"
    alpha: float = 0.5
    aggregation: str = "mean"                 # mean | max | min
    normalization: str = "minmax"             # minmax | percentile | shared
    percentile: float = 99.0
    view: str = "overlay"                     # overlay | side_by_side | heatmap
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    session_cache_mb: int = 2048              # captured attention kept for all sessions together
    max_prompt_chars: int = 8000              # longer prompts are refused by the app
    max_upload: str = "50mb"                  # largest file the server accepts
    max_gallery_maps: int = 64                # per-head gallery size limit (layers × heads)
    max_gradient_mb: int = 8192               # memory allowed for a gradient-weighted attention pass
    max_pixels_cap: int = 4096 * 4096         # largest image-token budget (Qwen max pixels) a request may ask
    max_image_pixels: int = 150_000_000       # largest decoded image accepted (a 12000x9000 photo is 108 M)
    trust_remote_code: bool = False           # run a checkpoint's own Python code (off unless asked for)
    allow_model_loading: bool = True          # users may load other models from the page
    animation_max_side: int = 512            # px, longer side of the animation's frames
    outputs_max_mb: int = 2048                # exports, pictures and pages kept in outputs/, oldest removed first
    cache_max_age_s: int = 3600               # Gradio's cache of uploads and pictures, cleaned hourly
    presets: tuple[str, ...] = field(default=MODEL_PRESETS)
    outputs_dir: Path = REPO_DIR / "outputs"
