"""Does the attention matter? Knock out attention edges, heads or the image's residual stream, and read how
the probability of a generated token changes.

Every check is teacher-forced over the run's own prompt and the tokens it generated before the token, so
it explains the answer the model gave. Blocked entries are removed inside the recording attention function
(`causal.edits`); everything else is the plain SDPA forward. Forwards are batched: several knockouts of
the same token share one forward, one batch row each.
"""

from __future__ import annotations

import gc
import numbers
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from attention_extractor import recording
from causal.edits import ABLATION_MODES, AblationMode, AttentionEdits, RowEdit
from causal.positions import QueryKind, box_positions, image_positions, query_positions
from errors import GenerationOutOfMemoryError, InputError
from families import decoder_layers, softmax_layers
from records import AttentionRun

TOP_K = 5


@dataclass(frozen=True)
class Outcome:
    """One forward's answer at the token's position: the token's probability (0..1) and the five likeliest
    next tokens as (text, probability), most likely first."""

    p_token: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Knockout:
    """One causal check of generated token `step_idx` (0-based), `token` its text.

    p_before / p_after: the token's probability (0..1) in the teacher-forced replay without / with the
    change; relative_change: (p_after − p_before) / p_before; top_before / top_after: the five likeliest
    tokens as (text, probability). blocked: what was changed, in words. key_positions, query_positions:
    the blocked keys and queries, 0-based sequence positions; layers: the decoder layers the block applied
    in; heads: its query heads (None: all); ablated: (layer, head) pairs whose output was replaced, by
    `mode` ('zero' or 'mean' over the image positions)."""

    step_idx: int
    token: str
    p_before: float
    p_after: float
    relative_change: float
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]
    blocked: str
    key_positions: tuple[int, ...] = ()
    query_positions: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] | None = None
    ablated: tuple[tuple[int, int], ...] = ()
    mode: str = "zero"


def relative(p_after: float, p_before: float) -> float:
    """(p_after − p_before) / p_before: −1 when the token is gone, 0 when nothing changed."""
    return (p_after - p_before) / p_before if p_before > 0 else 0.0


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _whole_pair(values) -> bool:
    """Two whole numbers (not floats, booleans or strings), as a (lo, hi) range is given."""
    return isinstance(values, (tuple, list)) and len(values) == 2 and all(_whole(v) for v in values)


def layer_range(holder, layers) -> tuple[int, int]:
    """The inclusive decoder-layer range `layers` (None: all), checked against the model's depth."""
    num_layers = len(decoder_layers(holder.model))
    if layers is not None and not _whole_pair(layers):
        raise InputError(f"layers must be an inclusive (lo, hi) of two whole numbers, got {layers!r}.")
    lo, hi = (0, num_layers - 1) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= lo <= hi < num_layers:
        raise InputError(f"layers must be an inclusive range inside 0..{num_layers - 1}, got {layers}.")
    return lo, hi


def layer_window(holder, layers) -> tuple[int, ...]:
    """The softmax-attention decoder layers in the inclusive range `layers` (None: all)."""
    lo, hi = layer_range(holder, layers)
    chosen = tuple(idx for idx in softmax_layers(holder.model) if lo <= idx <= hi)
    if not chosen:
        raise InputError(f"Layers {lo}–{hi} have no softmax attention to block; pick a range with some.")
    return chosen


def head_set(num_heads: int, heads) -> tuple[int, ...] | None:
    """None for all heads; a (lo, hi) tuple or range is inclusive, a list names the heads."""
    if heads is None:
        return None
    if isinstance(heads, tuple) and not _whole_pair(heads):
        raise InputError(
            f"heads as a tuple is an inclusive (lo, hi) range of two whole numbers, got {heads!r}; name several "
            "heads as a list, e.g. [0, 1, 2]."
        )
    if not isinstance(heads, (tuple, list, range)) or not all(_whole(h) for h in heads):
        raise InputError(f"heads must be a (lo, hi) range or a list of whole numbers, got {heads!r}.")
    chosen = list(range(int(heads[0]), int(heads[1]) + 1)) if isinstance(heads, tuple) else [int(h) for h in heads]
    if not chosen or not all(0 <= head < num_heads for head in chosen):
        raise InputError(f"heads must lie in 0..{num_heads - 1}, got {heads}.")
    return tuple(sorted(set(chosen))) if len(set(chosen)) < num_heads else None


def _describe(row: RowEdit, num_queries_kind: str, where_keys: str) -> str:
    parts = []
    if row.blocks:
        layers = sorted(row.layers)
        span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"
        heads = "all heads" if row.heads is None else f"heads {', '.join(map(str, row.heads))}"
        parts.append(
            f"blocked {where_keys} ({len(row.keys)} keys) from {num_queries_kind} ({len(row.queries)} "
            f"queries) in {span}, {heads}"
        )
    if row.ablate:
        pairs = ", ".join(f"L{layer}H{head}" for layer, head in row.ablate)
        parts.append(f"{'zeroed' if row.mode == 'zero' else 'mean-ablated'} heads {pairs}")
    return "; ".join(parts) or "nothing (an empty knockout)"


def _batched(inputs, copies: int) -> dict:
    """The replay's inputs repeated `copies` times along the batch. Every family's processor stacks or
    concatenates its tensors along dim 0 across a batch (patches, tiles, grids, sizes), so a repeat along
    dim 0 is the batch of `copies` identical samples."""
    return {key: torch.cat([value] * copies) if torch.is_tensor(value) else value for key, value in inputs.items()}


def _outcomes(holder, probs: torch.Tensor, token_id: int) -> list[Outcome]:
    """probs: (B, vocab) float32 -> one Outcome per row."""
    top_probs, top_ids = probs.topk(TOP_K, dim=-1)  # (B, k)
    decode = holder.processor.tokenizer.decode
    return [
        Outcome(
            float(row[token_id]),
            [(decode([int(i)]), float(p)) for i, p in zip(ids.tolist(), values.tolist(), strict=True)],
        )
        for row, ids, values in zip(probs.cpu(), top_ids.cpu(), top_probs.cpu(), strict=True)
    ]


def forward_outcomes(
    holder,
    run: AttentionRun,
    step_idx: int,
    rows: Sequence[RowEdit],
    batch_size: int = 8,
    hooks=(),
    inputs=None,
    guard: Callable[[], AbstractContextManager] = nullcontext,
    progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """One Outcome per RowEdit for generated token `step_idx`, `batch_size` rows per forward (halved, and
    halved again, when a forward runs out of memory). An empty row is the plain forward. hooks: (module,
    forward hook) pairs for the forwards (patching); inputs: the replay's inputs with other images (the
    run's own by default); guard: a context entered around each forward (the model lock, taken per
    forward so that other users' passes run between a long sweep's); progress(done, total) after each."""
    if not 0 <= step_idx < run.num_steps:
        raise InputError(
            f"step_idx {step_idx} is out of range: this run generated {run.num_steps} tokens, so pick "
            f"0..{run.num_steps - 1}."
        )
    inputs = holder.replay_inputs(run, step_idx) if inputs is None else inputs
    replayed = inputs["input_ids"][0, : len(run.prompt_ids)].tolist()
    if replayed != run.prompt_ids or inputs["input_ids"].shape[1] != len(run.prompt_ids) + step_idx:
        raise InputError(
            "The replay of this run does not rebuild its prompt token for token (the processor or its pixel "
            "budget changed since it was generated), so positions would not line up. Generate again."
        )
    image = image_positions(holder, run)
    token_id = run.generated_ids[step_idx]
    found: list[Outcome] = []
    size = max(1, int(batch_size))
    while len(found) < len(rows):
        chunk = list(rows[len(found) : len(found) + size])
        try:
            with guard():
                found += _forward_chunk(holder, inputs, chunk, image, token_id, hooks)
            if progress is not None:
                progress(len(found), len(rows))
        except torch.OutOfMemoryError:
            if size == 1:
                raise GenerationOutOfMemoryError(
                    "Out of memory replaying one knockout. Lower the image-token budget (max pixels) of the "
                    "run, or pick an earlier token (a shorter replay), then try again."
                ) from None
            size = max(1, size // 2)  # fewer rows per forward, then go on where it stopped
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return found


def _forward_chunk(holder, inputs, chunk: list[RowEdit], image, token_id: int, hooks) -> list[Outcome]:
    """One batched forward, one row per RowEdit of `chunk`."""
    edits = AttentionEdits(chunk, image)
    pre_hooks = edits.ablation_hooks(holder.model)
    with torch.inference_mode(), recording(holder.model, edits, hooks=hooks, pre_hooks=pre_hooks):
        out = holder.model(**_batched(inputs, len(chunk)), use_cache=False, logits_to_keep=1)
    edits.check()
    return _outcomes(holder, torch.softmax(out.logits[:, -1].float(), dim=-1), token_id)  # (B, vocab)


def plan_knockout(
    holder,
    run: AttentionRun,
    step_idx: int,
    key_positions: Sequence[int] | None = None,
    box=None,
    queries: QueryKind = "token",
    layers=None,
    heads=None,
    ablate_heads: Sequence[tuple[int, int]] | None = None,
    mode: AblationMode = "zero",
    image_idx: int = 0,
) -> tuple[RowEdit, str]:
    """The RowEdit of one knockout (see `knockout`) and its description in words."""
    if mode not in ABLATION_MODES:
        raise InputError(f"mode must be one of {', '.join(ABLATION_MODES)}, got {mode!r}.")
    query_pos = len(run.prompt_ids) - 1 + step_idx
    keys = np.zeros(0, dtype=np.int64) if key_positions is None else np.asarray(list(key_positions), dtype=np.int64)
    if len(keys) and not (keys.min() >= 0 and keys.max() <= query_pos):
        raise InputError(f"key_positions must lie in 0..{query_pos} (the replay's positions), got {keys.tolist()}.")
    where = "positions" if box is None else "the box's image tokens"
    if box is not None:
        keys = np.union1d(keys, box_positions(run, box, image_idx))
    asked = query_positions(run, step_idx, queries, image_positions(holder, run))
    window = layer_window(holder, layers)
    num_layers, num_heads = len(decoder_layers(holder.model)), holder.num_heads
    ablate = tuple(sorted({(int(layer), int(head)) for layer, head in (ablate_heads or ())}))
    bad = [pair for pair in ablate if not (0 <= pair[0] < num_layers and 0 <= pair[1] < num_heads)]
    if bad or any(layer not in softmax_layers(holder.model) for layer, _ in ablate):
        raise InputError(
            f"ablate_heads must be (layer, head) pairs of softmax layers in 0..{num_layers - 1} and heads in "
            f"0..{num_heads - 1}; {bad or 'a linear-attention layer'} is not."
        )
    row = RowEdit(
        frozenset(window) if len(keys) and len(asked) else frozenset(),
        head_set(num_heads, heads),
        tuple(int(p) for p in asked),
        tuple(int(p) for p in keys),
        ablate,
        mode,
    )
    kind = {"token": "the token's query", "question": "the question", "after_image": "every later position"}
    return row, _describe(row, kind[queries], where)


def knockout(holder, run: AttentionRun, step_idx: int, batch_size: int = 8, **plan) -> Knockout:
    """Generated token `step_idx`'s probability with and without blocking attention edges and/or ablating
    heads (the arguments of `plan_knockout`):

    key_positions: keys to block (0-based positions); box: (x0, y0, x1, y1) in original-image pixels, whose
    overlapping image tokens are blocked on every view; queries: 'token', 'question' or 'after_image';
    layers: inclusive (lo, hi), default all; heads: a list, or an inclusive (lo, hi) tuple, default all;
    ablate_heads: (layer, head) pairs whose output before o_proj is zeroed (mode='zero') or replaced by
    its mean over the image positions (mode='mean'). An empty knockout returns p_after == p_before.
    Two teacher-forced forwards (one when empty); the caller holds the model lock."""
    row, words = plan_knockout(holder, run, step_idx, **plan)
    (before,) = forward_outcomes(holder, run, step_idx, [RowEdit()])  # alone: exactly the plain forward
    (after,) = [before] if row.empty else forward_outcomes(holder, run, step_idx, [row], batch_size)
    return Knockout(
        step_idx=step_idx,
        token=run.generated_tokens[step_idx],
        p_before=before.p_token,
        p_after=after.p_token,
        relative_change=relative(after.p_token, before.p_token),
        top_before=before.top,
        top_after=after.top,
        blocked=words,
        key_positions=row.keys,
        query_positions=row.queries,
        layers=tuple(sorted(row.layers)),
        heads=row.heads,
        ablated=row.ablate,
        mode=row.mode,
    )
