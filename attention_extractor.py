"""Capture the decoder attention that produced each generated token, during generation.

One registered attention function (`RECORD_IMPLEMENTATION`) computes every layer's output with
SDPA, exactly as plain generation does, and hands the layer's queries and keys to whichever
recorder is active. The generation recorder does only bookkeeping inside the decode loop: it
keeps a reference to each step's query and to the layer's keys, with no extra tensor operation,
no host-device synchronisation and no copy. After `generate` returns, `finish` rebuilds every
step's softmax row per layer in one batched pass (`attention_store`). The explanation passes
(rollout, the vision tower) use the same function and the same `recording` context manager.
The reference method ("eager") reads eager attention weights through forward hooks instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attention_store import (
    LayerRecord,
    RowStore,
    StoreDevice,
    StoreKind,
    build_store,
    choose_store,
    store_bytes,
)
from errors import CaptureError, InputError
from families import attention_implementation, decoder_layers, softmax_layers

logger = logging.getLogger(__name__)

RECORD_IMPLEMENTATION = "vlm_explorer_record"
CAPTURE_IMPLEMENTATION = RECORD_IMPLEMENTATION  # the decoder's implementation during a capture
CaptureMethod = Literal["sdpa", "eager"]
CAPTURE_METHODS: tuple[str, ...] = ("sdpa", "eager")


def attention_dims(model) -> dict[str, int]:
    """num_heads, num_kv_heads and head_dim of the decoder, read from its attention module."""
    attn = next(layer.self_attn for layer in decoder_layers(model) if hasattr(layer, "self_attn"))
    num_heads = int(model.config.get_text_config().num_attention_heads)
    return {
        "num_heads": num_heads,
        "num_kv_heads": num_heads // int(attn.num_key_value_groups),
        "head_dim": int(attn.head_dim),
    }


def estimate_capture_bytes(
    model, num_layers: int, prompt_len: int, max_new_tokens: int, num_prompt_rows: int = 0, store: StoreKind = "auto"
) -> int:
    """What a capture of up to `max_new_tokens` tokens keeps, in the store it would choose (an upper bound)."""
    dims = dict(
        attention_dims(model),
        num_layers=num_layers,
        prompt_len=prompt_len,
        num_steps=max_new_tokens,
        num_prompt_rows=num_prompt_rows,
        itemsize=model.get_input_embeddings().weight.element_size(),
    )
    return store_bytes(choose_store(store, **dims), **dims)


_active = None  # the recorder that receives attention calls, if any
_active_lock = threading.Lock()
_active_thread: int | None = None  # the thread inside `recording`, to refuse nesting


def _softcapped_attention(module, query, key, value, attention_mask, scaling: float, softcap: float):
    """(B, q, H, D) attention output with logit soft-capping (Gemma 2, PaliGemma 2), which SDPA cannot do:
    the model's own eager formula (cap · tanh(score / cap), then the mask, softmax in float32), for the
    boolean-or-None masks the recording implementation receives."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, H, K, D)
    value = value.repeat_interleave(groups, dim=1)  # (B, H, K, D)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, q, K)
    scores = softcap * torch.tanh(scores / softcap)
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None and q_len > 1:  # None means "causal" to SDPA
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None:
        scores = (
            scores.masked_fill(~attention_mask, float("-inf"))
            if attention_mask.dtype == torch.bool
            else scores + attention_mask
        )
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, q, H, D)


def _recording_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA output, exactly as plain generation; the active recorder also sees the layer's q and k.
    A soft-capped layer's output is computed with the model's eager formula instead (SDPA has no cap).
    A recorder that `edits` (the causal checks, `causal.edits`) may change the layer's mask first; the
    generation recorder edits nothing."""
    recorder = _active
    editing = getattr(recorder, "edits", False)  # a plain attribute read: no tensor work in the decode loop
    if editing:
        attention_mask = recorder.edit_mask(module, query, key, attention_mask)
    if kwargs.get("softcap") is not None:
        output = _softcapped_attention(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling if scaling is not None else query.shape[-1] ** -0.5,
            kwargs["softcap"],
        )
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )  # (B, q, H, D)
    if recorder is not None:
        recorder.on_attention(
            module, query, key, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5, kwargs
        )
    return output, None


AttentionInterface.register(RECORD_IMPLEMENTATION, _recording_sdpa)
# Without a mask function under the same name the decoder gets no mask and ignores padding.
AttentionMaskInterface.register(RECORD_IMPLEMENTATION, sdpa_mask)


@contextmanager
def recording(
    model,
    recorder=None,
    text: str | None = RECORD_IMPLEMENTATION,
    vision: str | None = None,
    hooks=(),
    pre_hooks=(),
) -> Iterator:
    """The one way to watch attention: for the block, set the decoder's (`text`) and/or the vision
    tower's (`vision`) attention implementation (None leaves it), route the recording function's
    calls to `recorder`, and add `hooks`, (module, forward hook) pairs, and `pre_hooks`, (module,
    forward pre-hook) pairs. One recording at a time; implementations and hooks are restored on exit,
    also after an exception."""
    global _active, _active_thread
    if _active_thread == threading.get_ident():
        raise CaptureError(
            "A recording is already active in this thread; recordings do not nest. Finish the "
            "first `capture_attention` / `recording` block before starting another."
        )
    with _active_lock, attention_implementation(model, text=text, vision=vision):
        handles = []
        try:
            _active_thread = threading.get_ident()
            handles = [module.register_forward_hook(hook) for module, hook in hooks]
            handles += [module.register_forward_pre_hook(hook) for module, hook in pre_hooks]
            _active = recorder
            yield recorder
        finally:
            _active, _active_thread = None, None
            for handle in handles:
                handle.remove()


class _LayerCalls:
    """One decoder layer's calls during generation: references only, no tensor work."""

    def __init__(self):
        self.queries: list[torch.Tensor] = []  # prefill (B,H,n_p+1,D), then (B,H,1,D) each
        self.masks: list[torch.Tensor | None] = []  # the mask each call used, same order
        self.keys: torch.Tensor | None = None  # (B, KV, K, D) of the latest call
        self.scaling, self.softcap, self.batch, self.multi_query = 1.0, None, 1, False


class GenerationRecorder:
    """Records, per wanted decoder layer, what rebuilds the row of every query that made a token.

    prompt_positions: prompt positions whose rows to keep too (taken from the prefill call).
    Call `finish` after generation to get the store.
    """

    def __init__(self, model, layer_indices: list[int], prompt_positions: list[int] | None = None):
        self.layer_indices = layer_indices
        self.prompt_positions = sorted(set(prompt_positions or []))
        self.calls = {idx: _LayerCalls() for idx in layer_indices}
        # Index tensors for the prefill call, made before generation (making them then would block the host).
        devices = {next(decoder_layers(model)[idx].self_attn.parameters()).device for idx in layer_indices}
        self._picks = {device: torch.tensor(self.prompt_positions, dtype=torch.long).to(device) for device in devices}

    def on_attention(self, module, query, key, attention_mask, scaling, kwargs) -> None:
        calls = self.calls.get(getattr(module, "layer_idx", None))
        if calls is None:
            return
        if not calls.queries:  # prefill: keep the wanted rows only
            calls.scaling, calls.softcap, calls.batch = scaling, kwargs.get("softcap"), query.shape[0]
            pick = self._picks.get(query.device)
            if pick is None:  # a device the parameters did not name
                pick = self._picks[query.device] = torch.tensor(
                    self.prompt_positions, dtype=torch.long, device=query.device
                )
            # Copies, not views: a view would keep the whole prefill query (and mask) alive until the end.
            rows = torch.cat([pick, torch.full_like(pick[:1], query.shape[2] - 1)]) if len(pick) else None
            calls.queries.append(
                query.index_select(2, rows) if rows is not None else query[:, :, -1:].clone()
            )  # (B, H, n_p + 1, D): last made token 0
            if attention_mask is not None:
                attention_mask = (
                    attention_mask.index_select(2, rows) if rows is not None else attention_mask[:, :, -1:].clone()
                )  # (B, 1 or H, n_p + 1, kv)
        else:  # decode step: references only
            calls.multi_query |= query.shape[2] != 1
            calls.queries.append(query)  # (B, H, 1, D)
        calls.masks.append(attention_mask)
        calls.keys = key  # (B, KV, K, D)

    def _record(self, layer_idx: int, calls: _LayerCalls, prompt_len: int, num_steps: int) -> LayerRecord:
        """One layer's calls as a LayerRecord; checks they are what the rows' positions assume."""
        kv_len = prompt_len + num_steps - 1
        if len(calls.queries) != num_steps or calls.batch != 1 or calls.multi_query:
            raise CaptureError(
                f"Layer {layer_idx} saw {len(calls.queries)} attention calls (batch {calls.batch}) "
                f"for {num_steps} generated tokens. Capture needs a batch of one and a standard "
                "decoding loop: one prompt, no beam search, one new token per step."
            )
        if calls.keys.shape[2] < kv_len:
            raise CaptureError(
                f"Layer {layer_idx} holds {calls.keys.shape[2]} keys, expected {kv_len} "
                f"(prompt {prompt_len} + {num_steps - 1} fed-back tokens). Caches that drop keys "
                "(sliding windows, quantised or offloaded caches) are not supported."
            )
        queries = torch.cat(calls.queries, dim=2)[0]  # (H, n_q, D)
        keys = calls.keys[0, :, :kv_len]  # (KV, K, D); a static cache is longer
        rows_per_call = [query.shape[2] for query in calls.queries]
        return LayerRecord(queries, keys, calls.scaling, _allowed(calls.masks, rows_per_call, kv_len), calls.softcap)

    def finish(
        self,
        prompt_len: int,
        num_steps: int,
        segments: dict[str, np.ndarray],
        store: StoreKind = "auto",
        store_device: StoreDevice = "cpu",
        store_budget_mb: float | None = None,
    ):
        """The store of this generation's attention, after `generate` returned `num_steps` tokens; a
        query-key store stays on the model's device when `store_device` and the budget allow
        (`attention_store.placement`)."""
        if num_steps < 1:
            raise CaptureError("No token was generated, so there is no attention to show.")
        records = [self._record(idx, self.calls[idx], prompt_len, num_steps) for idx in self.layer_indices]
        self.calls = {}  # drop the references as soon as used
        first = records[0]
        dims = dict(
            num_layers=len(records),
            num_heads=first.queries.shape[0],
            num_kv_heads=first.keys.shape[0],
            head_dim=first.queries.shape[2],
            prompt_len=prompt_len,
            num_steps=num_steps,
            num_prompt_rows=len(self.prompt_positions),
            itemsize=first.keys.element_size(),
        )
        query_pos = torch.tensor(self.prompt_positions + [prompt_len - 1 + t for t in range(num_steps)])  # (n_q,)
        return build_store(
            records,
            query_pos,
            len(self.prompt_positions),
            prompt_len,
            {name: torch.from_numpy(index) for name, index in segments.items()},
            choose_store(store, **dims),
            store_device,
            store_budget_mb,
        )


def _allowed(masks: list, rows_per_call: list[int], kv_len: int) -> torch.Tensor | None:
    """(n_q, kv_len) bool: where the model's own masks let each recorded query see a key; None when the
    model used none (SDPA's causal rule, which `softmax_rows` applies by position).
    masks: per call, its mask rows (B, 1 or H, n, k_call) or None; rows_per_call: n of each call."""
    if all(mask is None for mask in masks):
        return None
    device = next(mask.device for mask in masks if mask is not None)
    rows = []
    for mask, n in zip(masks, rows_per_call, strict=True):
        allowed = torch.ones(n, kv_len, dtype=torch.bool, device=device)  # (n, kv_len)
        if mask is not None:
            mask = mask[0, 0, :, :kv_len]  # (n, k): same for all heads
            allowed[:, : mask.shape[1]] = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        rows.append(allowed)
    return torch.cat(rows)  # (n_q, kv_len)


class EagerRecorder:
    """The reference: rows read from eager attention weights by forward hooks, kept as float16 rows.

    The hooks keep float16 copies on the layer's device (no host sync inside the decode loop, and no
    view that would keep a whole prefill weight matrix alive); `finish` moves them to the host."""

    def __init__(self, layer_indices: list[int], prompt_positions: list[int] | None = None):
        self.layer_indices = layer_indices
        self.prompt_positions = sorted(set(prompt_positions or []))
        self.rows: dict[int, list[torch.Tensor]] = {idx: [] for idx in layer_indices}
        self.prompt_rows: dict[int, torch.Tensor] = {}  # layer -> (H, n_p, prompt_len)

    def hook(self, layer_idx: int):
        def keep(module, args, output):
            weights = output[1]  # (B, H, q, kv)
            if weights is None:
                raise CaptureError("Eager attention returned no weights; cannot use the eager reference.")
            self.rows[layer_idx].append(weights[0, :, -1, :].to(torch.float16, copy=True))  # (H, kv)
            if self.prompt_positions and layer_idx not in self.prompt_rows:
                self.prompt_rows[layer_idx] = weights[0][:, self.prompt_positions, :].to(torch.float16, copy=True)

        return keep

    def finish(self, prompt_len: int, num_steps: int, segments: dict[str, np.ndarray], store="auto", **placement):
        """Float16 rows on the host, whatever the store and placement asked for (the reference)."""
        counts = {idx: len(rows) for idx, rows in self.rows.items()}
        if any(count != num_steps for count in counts.values()):
            raise CaptureError(
                f"Captured {counts} rows per layer for {num_steps} generated tokens. "
                "Was the model run with a batch of one and a standard decoding loop?"
            )
        steps = [torch.stack([self.rows[idx][t].cpu() for idx in self.layer_indices]) for t in range(num_steps)]
        prompt = (
            torch.stack([self.prompt_rows[idx].cpu() for idx in self.layer_indices]) if self.prompt_positions else None
        )
        return RowStore(steps, prompt)


@contextmanager
def capture_attention(
    model,
    method: CaptureMethod = "sdpa",
    capture_layers: list[int] | None = None,
    prompt_positions: list[int] | None = None,
) -> Iterator[GenerationRecorder | EagerRecorder]:
    """Install attention capture on the decoder for the duration of the block.

    Yields a recorder; after `model.generate(...)` inside the block, call
    `recorder.finish(prompt_len, num_generated, segment_positions(layouts))` for the store.
    `prompt_positions`: positions of the prompt whose rows to keep from prefill as well.
    The model's attention implementation and hooks are restored on exit, also when generation
    raises. Only one recording runs at a time.
    """
    if method not in CAPTURE_METHODS:
        raise InputError(f"Unknown capture method {method!r}; choose one of {CAPTURE_METHODS}.")
    num_layers, attending = len(decoder_layers(model)), softmax_layers(model)
    layer_indices = sorted(set(attending if capture_layers is None else capture_layers))
    if not layer_indices or not all(0 <= idx < num_layers for idx in layer_indices):
        raise InputError(f"capture_layers must be indices in 0..{num_layers - 1}, got {capture_layers}.")
    if set(layer_indices) - set(attending):
        raise InputError(
            f"Layers {sorted(set(layer_indices) - set(attending))} have no softmax attention (linear "
            f"attention), so they have no attention map; capture some of {attending}."
        )
    if method == "sdpa":
        with recording(model, GenerationRecorder(model, layer_indices, prompt_positions)) as recorder:
            yield recorder
        return
    recorder = EagerRecorder(layer_indices, prompt_positions)
    hooks = [(decoder_layers(model)[idx].self_attn, recorder.hook(idx)) for idx in layer_indices]
    with recording(model, recorder, text="eager", hooks=hooks):
        yield recorder
