"""The one door from the UI to the model: the shared model slot and its lock, streaming generation,
every on-demand model pass, the bounded store of results, and exports.

`ui/handlers.py` turns component values into typed settings and calls one function here (or in
`pictures/views.py`) per event. Nothing here imports gradio, so scripts and tests use the same code paths
as the browser. Every pass that runs the model takes the slot's lock here, and only here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from attention_processor import RAW_ATTENTION
from causal.knockout import Knockout
from causal.positions import box_positions, checked_cells, grid_cell_positions, image_positions, top_cell_positions
from causal.sweep import KnockoutSweep, control_positions, knockout_sweep, knockout_with_control
from errors import EvictedError, InputError, ModelMismatchError, NotReadyError, SupersededError
from methods import MapRequest, MapSet, compute_maps, compute_prompt_maps, generic_baseline, method
from methods.faithfulness import Faithfulness, faithfulness
from methods.lens import run_logit_lens
from model_holder import ModelHolder
from pictures.report import lens_html
from pictures.stored_run import StoredRun, ViewSettings, method_key, raw_heatmap, token_map
from records import AttentionRun

logger = logging.getLogger(__name__)


class ModelSlot:
    """The one model the server holds. Loading and generating are serialised by `lock`."""

    def __init__(self):
        self.lock = threading.RLock()
        self._loading = threading.Lock()  # one load at a time, beside the model's lock
        self.holder: ModelHolder | None = None
        self.ready = threading.Event()  # cleared while a start-up load runs
        self.ready.set()
        self._generations: dict[str, threading.Event] = {}  # session -> its running generation's stop
        self.startup_failure: str | None = None  # why the start-up model did not load

    def begin(self, session: str | None) -> threading.Event:
        """The stop signal of a new generation for `session`; a generation the session still runs is
        told to stop (a user who asks again no longer wants the old answer)."""
        event = threading.Event()
        if session is not None:
            previous = self._generations.get(session)
            self._generations[session] = event
            if previous is not None:
                previous.set()
        return event

    def stop(self, session: str | None) -> bool:
        """Tell `session`'s running generation, if any, to stop at its next token."""
        event = self._generations.get(session) if session is not None else None
        if event is not None:
            event.set()
        return event is not None

    def end(self, session: str | None, event: threading.Event) -> None:
        if session is not None and self._generations.get(session) is event:
            del self._generations[session]

    def load(
        self,
        model_id: str,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_pixels_cap: int | None = None,
    ) -> ModelHolder:
        """Load a model for everyone; atomic: the current model stays, and keeps serving, until the new one
        has loaded (one load at a time; the model's lock is held only for the swap, so a slow or refused load
        never holds up anyone's generation)."""
        with self._loading:
            if self.holder is not None and self.holder.model_id == str(model_id):
                return self.holder
            holder = ModelHolder.load(
                model_id, device=device, dtype=dtype, trust_remote_code=trust_remote_code, max_pixels_cap=max_pixels_cap
            )
            with self.lock:
                self.holder = holder
            return holder

    def made(self, run: AttentionRun, what: str) -> ModelHolder:
        """The loaded model, if it is the one that made `run`; passes that replay a run need it."""
        holder = self.holder
        if holder is None or holder.model_id != run.model_id:
            raise ModelMismatchError(
                f"{what} needs the model that made this result ({run.model_id}). "
                "Load it again, or generate with the current model first."
            )
        return holder

    def get(self) -> ModelHolder:
        if self.holder is None and not self.ready.is_set():
            raise NotReadyError("The start-up model is still loading; try again in a moment.")
        if self.holder is None:
            raise NotReadyError("No model is loaded. Pick a model and press Load first.")
        return self.holder


def release_memory() -> bool:
    """Give memory no longer needed back to the system after a large request: Python's garbage, PyTorch's
    cached GPU blocks, and the C allocator's free pages (`malloc_trim`, where the C library has it, which
    glibc otherwise keeps for reuse, so a process that once peaked stays at its peak). Returns whether the
    C allocator was trimmed."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # not glibc (macOS, Windows): nothing to trim
        return None


class _Cancelled(StoppingCriteria):
    """Stops generation at the next token once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_generation(
    slot: ModelSlot,
    images: list,
    prompt: str,
    max_new_tokens: int,
    video: list | None = None,
    max_capture_mb: float | None = None,
    cancel: threading.Event | None = None,
    **options,
) -> Iterator[str | AttentionRun]:
    """Generate under the slot's lock on a worker thread: yields the answer's text each time it grows,
    then the finished `AttentionRun`. Errors of the generation are raised here, in the caller's thread.

    Closing the iterator early (a client that cancelled or went away) stops the generation at its
    next token and frees the model for everyone else, and so does setting `cancel`.
    """
    holder = slot.get()
    streamer = TextIteratorStreamer(holder.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled, outcome = cancel or threading.Event(), {}

    def work():
        try:
            with slot.lock:
                if cancelled.is_set():  # replaced (or abandoned) while it waited for the model
                    raise SupersededError(
                        "A newer generation from this session replaced this one before it started; its "
                        "result is the one that counts."
                    )
                outcome["run"] = holder.generate(
                    images or None,
                    prompt,
                    max_new_tokens=max_new_tokens,
                    video=video,
                    streamer=streamer,
                    max_capture_mb=max_capture_mb,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                    **options,
                )
        except Exception as err:  # raised in the caller's thread below
            outcome["error"] = err
            streamer.end()

    worker = threading.Thread(target=work, daemon=True, name="generate")
    worker.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancelled.set()  # only matters when closed early
    worker.join()  # the streamer ends before the run is built
    release_memory()  # the inputs, the processor's pixels and the generation's cache are gone now
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["run"]


def relative_baseline(slot: ModelSlot, stored: StoredRun) -> AttentionRun:
    """The same image with a generic prompt and the run's own pixel budget (one token), kept on `stored`."""
    if stored.baseline is None:
        holder = slot.made(stored.run, "The generic-prompt baseline")
        with slot.lock:
            stored.baseline = generic_baseline(holder, stored.run)
    return stored.baseline


MAX_CONTRASTS = 4  # other prompts kept per result; the oldest goes first


def contrast_baseline(slot: ModelSlot, stored: StoredRun, prompt: str) -> AttentionRun:
    """The same image under another prompt, with the run's own pixel budget (one token), kept on `stored`
    (the contrast's other map); at most MAX_CONTRASTS prompts are kept per result."""
    if prompt not in stored.contrasts:
        holder = slot.made(stored.run, "The other prompt's map")
        with slot.lock:
            other = generic_baseline(holder, stored.run, prompt)
        while len(stored.contrasts) >= MAX_CONTRASTS:
            stored.contrasts.pop(next(iter(stored.contrasts)))
        stored.contrasts[prompt] = other
    return stored.contrasts[prompt]


def single_token(settings: ViewSettings, what: str) -> None:
    """Refuse several combined tokens for a pass that measures one token's probability."""
    if len(settings.steps) > 1:
        raise InputError(f"{what} measures one token's probability; clear 'Combine tokens' and pick a single token.")


def method_maps(
    slot: ModelSlot,
    stored: StoredRun,
    settings: ViewSettings,
    max_gradient_mb: float | None = None,
    track=lambda steps, desc: steps,
) -> list[np.ndarray]:
    """Every generated token's map by `settings.method` (model passes, from the registry), kept on `stored`;
    with a prompt token picked, every listed prompt token's map (`run.prompt_positions`) instead, for the
    methods that map prompt tokens.

    track: wraps the loop over steps, e.g. a progress bar."""
    entry = method(settings.method)
    key = method_key(settings, entry.uses_ranges)
    raw = replace(settings.one_token(0), method=RAW_ATTENTION, relative=False, mask_sinks=False)

    def request(steps) -> MapRequest:
        holder = slot.made(stored.run, f"The {entry.name} map") if entry.needs_model else None
        return MapRequest(
            holder,
            stored.run,
            steps,
            settings.layers,
            settings.heads,
            attention_map=lambda t: token_map(stored, raw.one_token(t)),
            max_gradient_mb=max_gradient_mb,
            track=track,
        )

    if key not in stored.method_maps:
        if entry.per_token and settings.prompt_pos is None:  # only the tokens on show, filled in below
            stored.method_maps[key] = MapSet([None] * stored.run.num_steps)
        elif settings.prompt_pos is not None:
            with slot.lock:
                maps = compute_prompt_maps(
                    entry.name, request(range(stored.run.num_steps)), stored.run.prompt_positions
                )
            stored.method_maps[key] = maps
        else:
            stored.method_maps[key] = _in_turns(slot, entry.name, request, list(range(stored.run.num_steps)))
        stored.method_captions[entry.name] = entry.caption
    maps = stored.method_maps[key]
    missing = [t for t in settings.tokens if settings.prompt_pos is None and maps[t] is None]
    if missing:
        found = _in_turns(slot, entry.name, request, missing)
        for t, heat, note in zip(missing, found, found.notes, strict=True):
            maps[t], maps.notes[t] = heat, note
    return maps


MAPS_PER_TURN = 4  # tokens whose maps one hold of the model's lock computes (model passes for each)


def _in_turns(slot: ModelSlot, name: str, request, steps: list[int]) -> MapSet:
    """The maps of `steps` by method `name`, MAPS_PER_TURN tokens per hold of the model's lock, so other
    users' generations and passes run between the turns of a long computation (64 tokens' cell knockouts,
    a whole answer's gradient maps)."""
    found = MapSet()
    for start in range(0, len(steps), MAPS_PER_TURN):
        with slot.lock:
            part = compute_maps(name, request(steps[start : start + MAPS_PER_TURN]))
        found.extend(part)
        found.notes.extend(part.notes)
        for kind, maps in part.parts.items():
            found.parts.setdefault(kind, []).extend(maps)
    return found


def lens_page(slot: ModelSlot, stored: StoredRun) -> str:
    """The logit-lens page of a run's image over the run's own token grid (a model pass)."""
    holder = slot.made(stored.run, "The logit lens")
    with slot.lock:
        lens = run_logit_lens(holder, stored.run)
    return lens_html(lens, stored.image, special_tokens=tuple(holder.processor.tokenizer.all_special_tokens))


def verify_map(slot: ModelSlot, stored: StoredRun, settings: ViewSettings) -> Faithfulness:
    """Deletion and insertion curves of the map these settings draw, against a random order (model passes)."""
    holder = slot.made(stored.run, "Verifying")
    if settings.prompt_pos is not None:
        raise InputError("Verify works on generated tokens; pick one from the token list.")
    single_token(settings, "Verify")
    with slot.lock:
        return faithfulness(holder, stored.run, settings.step_idx, raw_heatmap(stored, settings))


KNOCKOUT_TARGETS: tuple[str, ...] = ("box", "topk", "image")  # the drawn box or region, the map's top k, all


def _knockout_keys(holder, stored: StoredRun, settings: ViewSettings, target: str, top_k: int, region, draws: int):
    """(keys to block, control position sets or None for random tokens, the keys in words)."""
    run = stored.run
    if target == "box" and settings.target_box is not None:
        box = settings.target_box
        keys = box_positions(run, box)
        try:
            controls = control_positions(holder, run, box, draws)
        except InputError:  # a box over most of the image: no region of its size fits elsewhere
            controls = []
        return keys, controls, f"the target box's {len(keys)} image tokens"
    if target == "box" and region:
        keys = grid_cell_positions(run, region)
        return keys, None, f"the region's {len(region)} cells ({len(keys)} image tokens, every view)"
    if target == "box":
        raise InputError(
            "There is no box or region to knock out. Type a target box (or tick 'Clicks draw it' and click "
            "two corners), or click cells on the picture for a region, then try again."
        )
    if target == "topk":
        heat = raw_heatmap(stored, settings)  # the map on show, (grid_h, grid_w)
        if heat.shape != tuple(run.vision.grid_hw):
            raise InputError(f"The {settings.method} map is not on the token grid; pick a token-grid map for top-k.")
        if not 1 <= top_k < heat.size:
            raise InputError(f"k must be a whole number from 1 to {heat.size - 1} (the grid has {heat.size} cells).")
        keys = top_cell_positions(run, heat, top_k)
        return keys, None, f"the map's top {top_k} cells ({len(keys)} image tokens, every view)"
    if target == "image":
        keys = image_positions(holder, run)
        return keys, [], f"the whole image ({len(keys)} tokens)"
    raise InputError(f"Knock out one of {', '.join(KNOCKOUT_TARGETS)}, not {target!r}.")


def _knockout_holder(slot: ModelSlot, stored: StoredRun, settings: ViewSettings, what: str) -> ModelHolder:
    """The model that made the run, for a knockout of a generated token (prompt tokens are refused)."""
    holder = slot.made(stored.run, what)
    if settings.prompt_pos is not None:
        raise InputError("Knockouts test generated tokens; pick one from the token list.")
    single_token(settings, "A knockout")
    return holder


def knockout_check(
    slot: ModelSlot,
    stored: StoredRun,
    settings: ViewSettings,
    target: str,
    top_k: int = 8,
    in_ranges: bool = False,
    region=(),
    draws: int = 8,
) -> tuple[Knockout, np.ndarray, str]:
    """Block `target` ('box': the target box, else the region's cells; 'topk': the map's top k cells;
    'image': every image token) from the selected token's query, in every layer and head or, with
    `in_ranges`, in the settings' ranges only; with the same knockout of `draws` random controls of the
    same size. Returns (the knockout, (n,) the controls' relative changes, the blocked keys in words)."""
    holder = _knockout_holder(slot, stored, settings, "A knockout")
    layers, heads = (settings.layers, settings.heads) if in_ranges else (None, None)
    with slot.lock:
        keys, controls, what = _knockout_keys(holder, stored, settings, target, top_k, region, draws)
        found, control = knockout_with_control(
            holder, stored.run, settings.step_idx, keys, controls, layers, heads, draws
        )
    return found, control, what


def knockout_layers(
    slot: ModelSlot,
    stored: StoredRun,
    settings: ViewSettings,
    window: int = 9,
    in_ranges: bool = False,
    region=(),
    progress=None,
) -> KnockoutSweep:
    """The layer sweep of the selected token for the target box (else the bounding box of the region's
    cells): `causal.sweep.knockout_sweep`, heads from the settings' range with `in_ranges`. The model lock
    is taken per forward, so a long sweep never holds the model from everyone else; progress(done, total)."""
    holder = _knockout_holder(slot, stored, settings, "The layer sweep")
    box = settings.target_box
    if box is None and region:
        layout = stored.run.vision
        boxes = np.array([layout.cell_box_xyxy(r, c) for r, c in checked_cells(stored.run, region)])  # (n, 4)
        box = (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))
    if box is None:
        raise InputError("The layer sweep needs a target box or a region: draw one first, then sweep.")
    heads = settings.heads if in_ranges else None

    @contextmanager
    def guard():  # the lock per forward: other users' passes run between the sweep's many forwards
        with slot.lock:
            if slot.holder is not holder:
                raise ModelMismatchError("The model was changed during the layer sweep; sweep again.")
            yield

    return knockout_sweep(
        holder, stored.run, settings.step_idx, box, int(window), heads=heads, guard=guard, progress=progress
    )


class RunStore:
    """Results of all sessions, least recently used evicted first beyond `cap_mb`."""

    def __init__(self, cap_mb: float):
        self.cap_bytes = int(cap_mb * 2**20)
        self._runs: OrderedDict[str, StoredRun] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: StoredRun) -> str:
        if stored.nbytes > self.cap_bytes:
            raise MemoryError(
                f"This result needs {stored.nbytes / 2**20:.0f} MB, more than the "
                f"{self.cap_bytes / 2**20:.0f} MB kept for all sessions. Generate fewer tokens, "
                "use a smaller image budget, or start the app with a larger --session-cache-mb."
            )
        run_id = uuid.uuid4().hex
        if hasattr(stored.run.attention, "prefetch"):
            stored.run.attention.prefetch = True  # a result being browsed: the next tokens' rows while idle
        with self._lock:
            self._runs[run_id] = stored
            while self.total_bytes > self.cap_bytes:
                evicted, _ = self._runs.popitem(last=False)
                logger.info("evicted run %s to stay under %d MB", evicted, self.cap_bytes // 2**20)
        return run_id

    def get(self, run_id: str | None) -> StoredRun:
        with self._lock:
            if not run_id:
                raise NotReadyError("Nothing generated yet. Upload an image, type a prompt and press Generate.")
            if run_id not in self._runs:
                raise EvictedError(
                    "This result was removed to free memory for other sessions. Press Generate again to recompute it."
                )
            self._runs.move_to_end(run_id)
            return self._runs[run_id]

    @property
    def total_bytes(self) -> int:
        return sum(stored.nbytes for stored in self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)
