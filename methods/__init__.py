"""Map methods, and the one registry of every method the app, the API and studies offer.

A method turns a run (and, for most, model passes over it) into one map per requested generated token,
on the run's token grid or, for the ViT map, on the vision encoder's patch grid over the same box.
`METHODS` is the only place a method is named: the app's radio, the API's `method` values, `batch.py
--methods` and the study list it, and `compute_maps` is how each of them calls one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis import GENERIC_PROMPT
from attention_processor import RAW_ATTENTION, token_heatmap
from errors import InputError, ModelMismatchError
from methods.explain import gradient_map, rollout_map, vit_combined_maps
from methods.lens import run_logit_lens
from methods.occlusion import knockout_maps
from methods.tam import tam_maps


class MapSet(list):
    """A method's maps, one per requested token, as a list; with `notes` (one short caption addition per
    map, e.g. TAM's α) and `parts` (name -> one map per token: what the method built its map from, drawn
    beside it on request)."""

    def __init__(self, maps=(), notes=None, parts=None):
        super().__init__(maps)
        self.notes: list[str] = list(notes) if notes is not None else [""] * len(self)
        self.parts: dict[str, list[np.ndarray]] = dict(parts or {})


@dataclass(frozen=True)
class MapRequest:
    """What a method needs for the maps of `steps` (0-based generated-token indices) of `run`.

    layers, heads: inclusive 0-based ranges; they apply to raw attention and to the map ViT starts from.
    attention_map: step -> (grid_h, grid_w) raw-attention map with the caller's own options (the app's
        aggregation and renormalisation); by default the mean over the ranges.
    track: wraps a loop over steps (a progress bar); max_gradient_mb caps the gradient pass's memory.
    """

    holder: object
    run: object
    steps: Sequence[int]
    layers: tuple[int, int]
    heads: tuple[int, int]
    attention_map: Callable[[int], np.ndarray] | None = None
    max_gradient_mb: float | None = None
    track: Callable = field(default=lambda steps, desc: steps)

    def raw(self, step_idx: int) -> np.ndarray:
        if self.attention_map is not None:
            return self.attention_map(step_idx)
        return token_heatmap(self.run, step_idx, self.layers, self.heads)


@dataclass(frozen=True)
class MapMethod:
    """One map method: its name, its one-line description (the UI's label), what a caption says it draws,
    whether it needs model passes beyond the stored rows, and whether the layer and head ranges apply."""

    name: str
    description: str
    caption: str
    compute: Callable[[MapRequest], list[np.ndarray]]
    needs_model: bool = True
    uses_ranges: bool = False
    prompt: Callable[[MapRequest, Sequence[int]], list[np.ndarray]] | None = None  # maps of prompt positions
    per_token: bool = False  # costly per token: the app computes only the tokens on show


def _attention(request: MapRequest) -> list[np.ndarray]:
    return [request.raw(t) for t in request.steps]


def _per_step(fn, name: str, request: MapRequest) -> list[np.ndarray]:
    return [fn(request.holder, request.run, t) for t in request.track(request.steps, f"{name} maps")]


def _gradient(request: MapRequest) -> list[np.ndarray]:
    fn = functools.partial(gradient_map, max_mb=request.max_gradient_mb)
    return _per_step(fn, "gradient", request)


def _vit(request: MapRequest) -> list[np.ndarray]:
    return vit_combined_maps(request.holder, request.run, [request.raw(t) for t in request.steps])


def _lens_of(request: MapRequest, ids: list[int]) -> list[np.ndarray]:
    """The image positions precede every token mapped, so one prompt pass gives every map: the
    probability of each of `ids` at each patch, averaged over the layers."""
    lens = run_logit_lens(request.holder, request.run, top_k=1, track_ids=ids)
    return [lens.token_map(i) for i in range(len(ids))]


def _lens(request: MapRequest) -> list[np.ndarray]:
    return _lens_of(request, [request.run.generated_ids[t] for t in request.steps])


def _lens_prompt(request: MapRequest, positions: Sequence[int]) -> list[np.ndarray]:
    return _lens_of(request, [request.run.prompt_ids[p] for p in positions])


ONE_CELL_TAM = (
    "; on a one-cell grid the removed context equals the map itself, so TAM is 0 there: use a larger image "
    "for TAM, or the raw attention"
)


def _tam_set(found) -> MapSet:
    return MapSet(
        [t.heat for t in found],
        [
            f"context removed: α = {t.alpha:.2f} over {t.context} earlier text tokens"
            + (ONE_CELL_TAM if t.heat.size == 1 else "")
            for t in found
        ],
        {"raw logit": [t.logit for t in found], "interference removed": [t.interference for t in found]},
    )


def _tam(request: MapRequest) -> MapSet:
    return _tam_set(tam_maps(request.holder, request.run, steps=request.steps))


def _tam_prompt(request: MapRequest, positions: Sequence[int]) -> MapSet:
    return _tam_set(tam_maps(request.holder, request.run, prompt_positions=positions))


METHODS: dict[str, MapMethod] = {
    method.name: method
    for method in (
        MapMethod(
            RAW_ATTENTION,
            "raw attention of the decoder on the image tokens (the ranges apply)",
            "raw attention",
            _attention,
            needs_model=False,
            uses_ranges=True,
        ),
        MapMethod(
            "rollout",
            "attention rollout through every layer, heads averaged",
            "attention rollout through all layers (heads averaged, residual mixed in)",
            functools.partial(_per_step, rollout_map, "rollout"),
        ),
        MapMethod(
            "gradient",
            "gradient-weighted attention over every layer (Chefer et al.)",
            "gradient-weighted attention, all layers (Chefer et al.)",
            _gradient,
        ),
        MapMethod(
            "vit",
            "the raw-attention map pushed back through the vision encoder, on its patches",
            "the raw-attention map pushed back through the vision encoder's attention (patch grid)",
            _vit,
            uses_ranges=True,
        ),
        MapMethod(
            "lens",
            "logit lens: each image patch's probability of the token, averaged over the layers",
            "logit lens: each patch's probability of this token, mean over layers",
            _lens,
            prompt=_lens_prompt,
        ),
        MapMethod(
            "tam",
            "Token Activation Map: the last layer's logit of the token at each patch, earlier words' "
            "interference removed, rank-Gaussian filtered (Li et al.)",
            "Token Activation Map (last-layer logit, context interference removed, rank Gaussian filter)",
            _tam,
            prompt=_tam_prompt,
        ),
        MapMethod(
            "cell_knockout",
            "cell knockout: the drop in the token's probability when its attention to each cell is blocked",
            "cell knockout: the drop in the token's probability with its attention to each cell blocked in every "
            "layer (blocks of k×k cells when the grid has over 256)",
            knockout_maps,
            per_token=True,
        ),
    )
}


def method(name: str) -> MapMethod:
    """The registered method `name`, or an error naming every method."""
    if name not in METHODS:
        raise InputError(f"Unknown map method {name!r}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]


def compute_maps(name: str, request: MapRequest) -> MapSet:
    """The maps of `request.steps` by method `name`: one float32 array per step, (grid_h, grid_w) or the
    encoder's patch grid over the same box (the ViT map), as a MapSet. A model pass needs the model that
    made the run: another one is refused (its maps would describe a different network)."""
    _same_model(request)
    return _as_set(method(name).compute(request))


def _same_model(request: MapRequest) -> None:
    holder, made_by = request.holder, getattr(request.run, "model_id", None)
    if holder is not None and made_by is not None and getattr(holder, "model_id", made_by) != made_by:
        raise ModelMismatchError(
            f"This run was made by {made_by}, and the model given is {holder.model_id}. Pass the model that "
            "made the run (or generate with this one first)."
        )


def _as_set(maps) -> MapSet:
    return maps if isinstance(maps, MapSet) else MapSet(maps)


def compute_prompt_maps(name: str, request: MapRequest, positions: Sequence[int]) -> MapSet:
    """The maps of the prompt tokens at sequence `positions` (text after the image) by method `name`;
    `request.steps` is not used. Raw attention reads its prompt rows elsewhere
    (`attention_processor.prompt_token_heatmap`); among the others, only some map prompt tokens."""
    entry = method(name)
    _same_model(request)
    if entry.prompt is None:
        able = [m.name for m in METHODS.values() if m.prompt is not None]
        raise InputError(
            f"The {name} map is for generated tokens; for a prompt token choose {RAW_ATTENTION} or "
            f"{' or '.join(able)}, or pick a generated token."
        )
    return _as_set(entry.prompt(request, positions))


def generic_baseline(holder, run, prompt: str = GENERIC_PROMPT):
    """The run's images under the generic prompt (or `prompt`), one token, with the run's own pixel budget:
    what a map "relative to a generic prompt" is divided by, or a contrast subtracts. A model pass; the
    caller holds the model lock."""
    made = run.settings
    return holder.generate(
        run.images,
        prompt,
        max_new_tokens=1,
        prompt_rows="none",
        min_pixels=made.min_pixels,
        max_pixels=made.max_pixels,
    )
