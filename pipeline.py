"""What the app does, without the app: the shared model slot, the bounded store of results, exports.

`app.py` validates input and calls one function here (or in `views.py`) per event. Nothing here
imports gradio, so scripts and tests use the same code paths as the browser.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from analysis import gallery_zip
from model_holder import ModelHolder, check_loadable
from views import StoredRun

logger = logging.getLogger(__name__)


class EvictedError(LookupError):
    """A session's result was dropped to keep memory bounded."""


class ModelSlot:
    """The one model the server holds. Loading and generating are serialised by `lock`."""

    def __init__(self):
        self.lock = threading.RLock()
        self.holder: ModelHolder | None = None
        self.ready = threading.Event()                                  # cleared while a start-up load runs
        self.ready.set()

    def load(self, model_id: str, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False) -> ModelHolder:
        with self.lock:
            if self.holder is not None and self.holder.model_id == str(model_id):
                return self.holder
            check_loadable(str(model_id), trust_remote_code)            # a typo keeps the current model
            self.holder = None                                          # free the old weights first
            self.holder = ModelHolder.load(model_id, device=device, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
            return self.holder

    def get(self) -> ModelHolder:
        if self.holder is None and not self.ready.is_set():
            raise LookupError("The start-up model is still loading; try again in a moment.")
        if self.holder is None:
            raise LookupError("No model is loaded. Pick a model and press Load first.")
        return self.holder


class RunStore:
    """Results of all sessions, least recently used evicted first beyond `cap_mb`."""

    def __init__(self, cap_mb: float):
        self.cap_bytes = int(cap_mb * 2**20)
        self._runs: OrderedDict[str, StoredRun] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: StoredRun) -> str:
        if stored.nbytes > self.cap_bytes:
            raise MemoryError(f"This result needs {stored.nbytes / 2**20:.0f} MB, more than the "
                              f"{self.cap_bytes / 2**20:.0f} MB kept for all sessions. Generate fewer tokens, "
                              "use a smaller image budget, or start the app with a larger --session-cache-mb.")
        run_id = uuid.uuid4().hex
        with self._lock:
            self._runs[run_id] = stored
            while self.total_bytes > self.cap_bytes:
                evicted, _ = self._runs.popitem(last=False)
                logger.info("evicted run %s to stay under %d MB", evicted, self.cap_bytes // 2**20)
        return run_id

    def get(self, run_id: str | None) -> StoredRun:
        with self._lock:
            if not run_id:
                raise LookupError("Nothing generated yet. Upload an image, type a prompt and press Generate.")
            if run_id not in self._runs:
                raise EvictedError("This result was removed to free memory for other sessions. "
                                   "Press Generate again to recompute it.")
            self._runs.move_to_end(run_id)
            return self._runs[run_id]

    @property
    def total_bytes(self) -> int:
        return sum(stored.nbytes for stored in self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)


def export_run(stored: StoredRun, out_dir: Path) -> tuple[Path, Path]:
    """Write the raw captured attention (safetensors) and its metadata (JSON) to a new folder.

    Tensor `step_{t}` has shape (num_layers, num_heads, len(prompt_ids) + t), float16.
    """
    run = stored.run
    folder = Path(out_dir) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=False)                          # never overwrite anyone's files
    tensors_path, meta_path = folder / "attention.safetensors", folder / "attention.json"
    tensors = {f"step_{t}": run.step_attention(t).contiguous() for t in range(run.num_steps)}
    prompt_rows = run.prompt_rows
    if prompt_rows is not None:
        tensors["prompt_rows"] = prompt_rows.contiguous()
    save_file(tensors, str(tensors_path))
    meta = {"model_id": run.model_id, "family": run.family, "prompt_ids": run.prompt_ids,
            "prompt_tokens": run.prompt_tokens, "prompt_positions": run.prompt_positions,
            "generated_ids": run.generated_ids, "generated_tokens": run.generated_tokens,
            "layer_indices": run.layer_indices, "num_heads": run.num_heads,
            "visions": [layout.to_dict() for layout in run.visions], "settings": run.settings.to_dict(),
            "tensors": "step_{t}: float16 (num_layers, num_heads, len(prompt_ids) + t), softmax row of the "
                       "query that produced generated token t; prompt_rows: float16 (num_layers, num_heads, "
                       "len(prompt_positions), len(prompt_ids)), row i for prompt position prompt_positions[i]; "
                       "indices 0-based"}
    meta_path.write_text(json.dumps(meta, indent=1))
    return tensors_path, meta_path


def _fresh_path(out_dir: Path, stem: str, suffix: str) -> Path:
    """A new, uniquely named file path in `out_dir` (created if needed), so no one's file is overwritten."""
    path = Path(out_dir) / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_picture(picture: Image.Image, out_dir: Path, step_idx: int) -> Path:
    """The current picture as a PNG in a fresh, uniquely named file."""
    path = _fresh_path(out_dir, f"attention-token{step_idx}", ".png")
    picture.save(path, format="PNG")
    return path


def save_gallery_zip(tiles: list[tuple[str, Image.Image]], out_dir: Path, step_idx: int) -> Path:
    """The per-head gallery as a ZIP of `S{step}_L{layer}_H{head}.png` in a fresh, uniquely named file."""
    path = _fresh_path(out_dir, f"heads-token{step_idx}", ".zip")
    path.write_bytes(gallery_zip(tiles))
    return path


def save_page(page: str, out_dir: Path, stem: str) -> Path:
    """A self-contained HTML page in a fresh, uniquely named file."""
    path = _fresh_path(out_dir, stem, ".html")
    path.write_text(page, encoding="utf-8")
    return path
