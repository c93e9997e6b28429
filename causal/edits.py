"""What a causal check changes inside the decoder: blocked (query, key) entries in chosen layers and heads,
set inside the recording attention function, and heads whose output, the slice of `o_proj`'s input, is
zeroed or replaced by its mean over the image positions (a forward pre-hook on `o_proj`).

One `AttentionEdits` serves one batched, teacher-forced forward: batch row b gets `rows[b]`. A layer that
no row edits keeps the model's own mask untouched, so it runs exactly the plain SDPA path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from errors import CaptureError, InputError
from families import decoder_layers

AblationMode = Literal["zero", "mean"]
ABLATION_MODES: tuple[str, ...] = ("zero", "mean")


@dataclass(frozen=True)
class RowEdit:
    """What one batch row changes; positions are 0-based sequence positions, heads 0-based query heads.

    layers: decoder layers where the block applies; heads: the query heads blocked (None: all);
    queries, keys: the blocked entries are every (query, key) pair of these positions;
    ablate: (layer, head) pairs whose output is replaced, by zeros or by its mean over the image
    positions (`mode`)."""

    layers: frozenset[int] = frozenset()
    heads: tuple[int, ...] | None = None
    queries: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()
    ablate: tuple[tuple[int, int], ...] = ()
    mode: AblationMode = "zero"

    @property
    def blocks(self) -> bool:
        return bool(self.layers and self.queries and self.keys)

    @property
    def empty(self) -> bool:
        """Whether this row changes nothing (its forward is the plain one)."""
        return not self.blocks and not self.ablate


def _allowed(mask: torch.Tensor | None, shape: tuple[int, int, int, int], device) -> torch.Tensor:
    """(B, H, q, kv) bool, a writable copy: where the layer's own mask lets each query see each key.
    None is SDPA's causal rule; an additive mask allows where it is above half the dtype's minimum."""
    batch, heads, q_len, kv_len = shape
    if mask is None:
        base = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)  # (q, kv)
    elif mask.dtype == torch.bool:
        base = mask[..., :kv_len]  # (B or 1, 1 or H, q, kv)
    else:
        base = mask[..., :kv_len] > torch.finfo(mask.dtype).min / 2
    return base.expand(batch, heads, q_len, kv_len).clone()


class AttentionEdits:
    """The recorder a causal forward runs under (`attention_extractor.recording`): it edits masks and
    head outputs and records nothing. After the forward, `check` raises if a blocked query was left
    with no key at all (SDPA would have returned NaN for it)."""

    edits = True

    def __init__(self, rows: Sequence[RowEdit], image_positions: Sequence[int]):
        self.rows = list(rows)
        self.image_positions = [int(pos) for pos in image_positions]
        self._index: dict[tuple[int, str, torch.device], torch.Tensor] = {}
        self._sightless: list[tuple[int, int, torch.Tensor]] = []  # (row, layer, bool: some query sees nothing)
        self._seen: set = set()  # the layers whose attention ran through the recording function

    def _tensor(self, row: int, what: str, values: Sequence[int], device) -> torch.Tensor:
        key = (row, what, device)
        if key not in self._index:
            self._index[key] = torch.tensor(list(values), dtype=torch.long, device=device)
        return self._index[key]

    def edit_mask(self, module, query, key, attention_mask):
        """The mask for this layer: the model's own, with every row's blocked entries set to False."""
        layer = getattr(module, "layer_idx", None)
        self._seen.add(layer)
        blocking = [(b, row) for b, row in enumerate(self.rows) if row.blocks and layer in row.layers]
        if not blocking:
            return attention_mask
        batch, num_heads, q_len, _ = query.shape  # (B, H, q, D)
        kv_len = key.shape[2]
        if q_len != kv_len:
            raise InputError("Causal edits run on one whole teacher-forced forward, without a cache.")
        per_head = any(row.heads is not None for _, row in blocking)  # else one mask row serves every head
        shape = (batch, num_heads if per_head else 1, q_len, kv_len)
        allowed = _allowed(attention_mask, shape, query.device)  # (B, H or 1, q, kv)
        for b, row in blocking:
            every = range(num_heads if per_head else 1)
            heads = self._tensor(b, f"heads{per_head}", every if row.heads is None else row.heads, query.device)
            queries = self._tensor(b, "queries", row.queries, query.device)
            keys = self._tensor(b, "keys", row.keys, query.device)
            allowed[b, heads[:, None, None], queries[None, :, None], keys[None, None, :]] = False
            seen = allowed[b, heads[:, None], queries[None, :]].any(-1)  # (h, n_q)
            self._sightless.append((b, layer, ~seen.all()))  # checked after the forward: no sync here
        return allowed

    def ablation_hooks(self, model) -> list[tuple]:
        """(o_proj, forward pre-hook) pairs that replace the ablated heads' slices of each layer's o_proj
        input (B, q, H * D), row by row: zeros, or the slice's mean over the image positions."""
        hooks = []
        for layer in sorted({at for row in self.rows for at, _ in row.ablate}):
            attention = decoder_layers(model)[layer].self_attn
            hooks.append((attention.o_proj, self._ablate(layer, int(attention.head_dim))))
        return hooks

    def _ablate(self, layer: int, head_dim: int):
        def hook(module, args):
            flat = args[0].clone()  # (B, q, H * D)
            for b, row in enumerate(self.rows):
                for at, head in row.ablate:
                    if at != layer:
                        continue
                    cols = slice(head * head_dim, (head + 1) * head_dim)
                    if row.mode == "zero":
                        flat[b, :, cols] = 0
                    else:
                        image = self._tensor(b, "image", self.image_positions, flat.device)  # (n_img,)
                        flat[b, :, cols] = flat[b, image, cols].mean(dim=0)  # (D,) at every position
            return (flat, *args[1:])

        return hook

    def on_attention(self, module, query, key, attention_mask, scaling, kwargs) -> None:
        pass  # nothing is recorded

    def check(self) -> None:
        """Raise if some row's blocked query could see no key in some layer, or if a layer to block never
        reached the recording function (a knockout there would silently change nothing)."""
        missed = sorted({layer for row in self.rows if row.blocks for layer in row.layers} - self._seen)
        if missed:
            raise CaptureError(
                f"Layers {missed} never ran through the recording attention function, so nothing could be "
                "blocked there. This model's decoder attention does not support knockouts."
            )
        for b, layer, sightless in self._sightless:
            if bool(sightless):
                row = self.rows[b]
                raise InputError(
                    f"Blocking {len(row.keys)} keys leaves a query with no key at all to attend to in layer "
                    f"{layer}, so its attention is undefined. Block fewer positions (keep the first token, "
                    "which every query can see), or pick other queries."
                )
