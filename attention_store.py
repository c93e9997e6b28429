"""How a run's captured attention is kept once generation is over, and the one softmax that makes it.

The capture records, per decoder layer, the queries whose rows are wanted and the layer's keys
(see `attention_extractor`). After generation, `build_store` turns them into one of two stores:

- `RowStore` keeps the float16 softmax rows themselves: L·H·(S+t) values per token.
- `QueryKeyStore` keeps the queries and keys in the model's dtype (L·H·D per token plus L·KV·K·D)
  and computes a token's rows when they are asked for, keeping the last few.

Both answer the same questions with the same `softmax_rows`, so both are exact. `build_store`
keeps whichever is smaller for this model and length: rows for multi-head models with short
answers, queries and keys for grouped-query models, long prompts and long answers. Per-step
attention mass on named key segments (the image tokens, the system prefix) is reduced on the
model's device at the end of generation, so share plots never need every row.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch

from errors import InputError

StoreKind = Literal["auto", "rows", "qk"]
STORE_KINDS: tuple[str, ...] = ("auto", "rows", "qk")
_CHUNK_ELEMENTS = 2**25  # float32 scores per chunk at the end of generation (128 MB)


def softmax_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention rows of some queries of one layer, in float32.

    queries: (H, n, D) post-RoPE queries; keys: (KV, K, D) post-RoPE keys of positions 0..K-1,
    before any grouped-query repeat (head h reads KV head h // (H // KV)).
    query_pos: (n,) int64, the absolute position of each query: key j is seen only when j <= pos.
    allowed: (n, K) bool, the model's own mask where it had one (padding, windows), else None.
    softcap: the layer's logit soft-capping (cap * tanh(score / cap)), if any.
    Returns (H, n, K) float32; each row sums to 1 over its visible keys.
    """
    num_heads, n, head_dim = queries.shape
    num_kv, kv_len = keys.shape[0], keys.shape[1]
    grouped = queries.float().reshape(num_kv, (num_heads // num_kv) * n, head_dim)  # (KV, G*n, D)
    scores = torch.matmul(grouped, keys.float().transpose(1, 2)) * scaling  # (KV, G*n, K)
    scores = scores.view(num_heads, n, kv_len)  # (H, n, K)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    hidden = torch.arange(kv_len, device=keys.device)[None, :] > query_pos[:, None]  # (n, K) future keys
    if allowed is not None:
        hidden = hidden | ~allowed
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)  # (H, n, K)


@dataclass
class LayerRecord:
    """What one decoder layer's capture left after generation, on the layer's device.

    queries: (H, n_q, D): rows 0..n_p-1 are the kept prompt positions, row n_p + t made token t.
    keys: (KV, K, D), K = prompt_len + num_steps - 1 (the last token is never fed back).
    allowed: (n_q, K) bool or None, as in `softmax_rows`.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    scaling: float
    allowed: torch.Tensor | None = None
    softcap: float | None = None

    def rows(self, query_pos: torch.Tensor, select: slice = slice(None), kv_len: int | None = None) -> torch.Tensor:
        """(H, n, kv_len) float32 rows of the selected queries over the first kv_len keys."""
        keys = self.keys[:, :kv_len]  # (KV, kv_len, D)
        allowed = None if self.allowed is None else self.allowed[select, :kv_len]
        return softmax_rows(self.queries[:, select], keys, query_pos[select], self.scaling, allowed, self.softcap)


def store_bytes(
    kind: str,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    prompt_len: int,
    num_steps: int,
    num_prompt_rows: int,
    itemsize: int,
    num_segments: int = 2,
) -> int:
    """Bytes a store keeps right after generation (`QueryKeyStore` grows by the rows it caches)."""
    n_q, kv_len = num_prompt_rows + num_steps, prompt_len + num_steps - 1
    shares = 4 * num_segments * num_steps * num_layers * num_heads
    if kind == "rows":
        return 2 * num_layers * num_heads * n_q * kv_len + shares
    return itemsize * num_layers * head_dim * (num_heads * n_q + num_kv_heads * kv_len) + shares


def choose_store(kind: StoreKind, **dims) -> str:
    """'rows' or 'qk': the one asked for, or for 'auto' the one that keeps fewer bytes."""
    if kind not in STORE_KINDS:
        raise InputError(f"Unknown store {kind!r}; choose one of {STORE_KINDS}.")
    if kind != "auto":
        return kind
    return "rows" if store_bytes("rows", **dims) <= store_bytes("qk", **dims) else "qk"


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind some tensors (views of one block count once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


class RowStore:
    """Float16 rows: step t is (L, H, prompt_len + t), prompt row i is (L, H, prompt_len)."""

    kind = "rows"

    def __init__(
        self,
        step_rows: list[torch.Tensor],
        prompt_rows: torch.Tensor | None,
        shares: dict[str, torch.Tensor] | None = None,
    ):
        self.step_rows = step_rows
        self.prompt_rows = prompt_rows  # (L, H, n_p, prompt_len) or None
        self.shares = shares or {}  # segment -> (T, L, H) float32

    def step(self, step_idx: int) -> torch.Tensor:
        return self.step_rows[step_idx]

    def prompt(self, row_idx: int) -> torch.Tensor:
        return self.prompt_rows[:, :, row_idx]  # (L, H, prompt_len)

    @property
    def nbytes(self) -> int:
        return _storage_bytes([*self.step_rows, self.prompt_rows, *self.shares.values()])


class QueryKeyStore:
    """Queries and keys on the CPU, in the model's dtype; rows are computed when asked for.

    layers: one `LayerRecord` per captured layer (on the CPU); query_pos: (n_q,) int64.
    The last `cache_tokens` tokens' rows are kept, so moving a slider does not recompute them.
    """

    kind = "qk"

    def __init__(
        self,
        layers: list[LayerRecord],
        query_pos: torch.Tensor,
        num_prompt_rows: int,
        prompt_len: int,
        shares: dict[str, torch.Tensor],
        cache_tokens: int = 4,
    ):
        self.layers, self.query_pos = layers, query_pos
        self.num_prompt_rows, self.prompt_len = num_prompt_rows, prompt_len
        self.shares = shares
        self.cache_tokens = cache_tokens
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _rows(self, row_idx: int, kv_len: int) -> torch.Tensor:
        """(L, H, kv_len) float16 rows of query row `row_idx`, cached."""
        if row_idx in self._cache:
            self._cache.move_to_end(row_idx)
            return self._cache[row_idx]
        select = slice(row_idx, row_idx + 1)
        rows = torch.stack([layer.rows(self.query_pos, select, kv_len)[:, 0] for layer in self.layers])  # (L, H, kv)
        self._cache[row_idx] = rows.to(torch.float16)
        while len(self._cache) > self.cache_tokens:
            self._cache.popitem(last=False)
        return self._cache[row_idx]

    def step(self, step_idx: int) -> torch.Tensor:
        return self._rows(self.num_prompt_rows + step_idx, self.prompt_len + step_idx)

    def prompt(self, row_idx: int) -> torch.Tensor:
        return self._rows(row_idx, self.prompt_len)

    @property
    def nbytes(self) -> int:
        kept = [t for layer in self.layers for t in (layer.queries, layer.keys, layer.allowed)]
        return _storage_bytes([*kept, *self._cache.values(), *self.shares.values()])


def _segment_masses(
    record: LayerRecord, query_pos: torch.Tensor, first: int, segments: dict[str, torch.Tensor], keep_rows: bool
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Rows from query row `first` on, in chunks: ({segment: (H, n) mass}, [(H, chunk, K) float16 rows],
    the rows only when `keep_rows`)."""
    num_heads, n_q, _ = record.queries.shape
    kv_len = record.keys.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // (num_heads * kv_len))
    masses: dict[str, list[torch.Tensor]] = {name: [] for name in segments}
    halves = []
    for start in range(first, n_q, chunk):
        probs = record.rows(query_pos, slice(start, min(start + chunk, n_q)))  # (H, c, K)
        for name, index in segments.items():
            masses[name].append(probs[:, :, index].sum(-1))  # (H, c)
        if keep_rows:
            halves.append(probs.to(torch.float16))
    return {name: torch.cat(parts, dim=1) for name, parts in masses.items()}, halves


def build_store(
    records: list[LayerRecord],
    query_pos: torch.Tensor,
    num_prompt_rows: int,
    prompt_len: int,
    segments: dict[str, torch.Tensor],
    kind: str,
):
    """A `RowStore` or `QueryKeyStore` ('rows' / 'qk') from the layers' records, on the CPU.

    query_pos: (n_q,) int64 on the CPU. segments: name -> key positions (int64, CPU) whose per-step
    mass to keep, e.g. the image tokens. Work runs on each layer's own device, every layer queued
    before the first copy back; the copies to the host wait for their own device only.
    """
    keep_rows = kind == "rows"
    first = 0 if keep_rows else num_prompt_rows  # 'qk' reduces only the steps
    on_device: dict[torch.device, tuple] = {}  # indices copied once per device
    masses, halves = [], []
    for record in records:
        device = record.keys.device
        if device not in on_device:
            on_device[device] = (query_pos.to(device), {name: index.to(device) for name, index in segments.items()})
        positions, indices = on_device[device]
        mass, half = _segment_masses(record, positions, first, indices, keep_rows)
        masses.append(mass)
        halves.append(torch.cat(half, dim=1) if keep_rows else None)  # (H, n_q, K) float16
    shares = {
        name: torch.stack([m[name][:, -(len(query_pos) - num_prompt_rows) :].cpu() for m in masses])
        .permute(2, 0, 1)
        .contiguous()
        for name in segments
    }  # (T, L, H) float32
    if kind == "qk":
        cpu = [
            LayerRecord(
                r.queries.cpu(), r.keys.cpu(), r.scaling, None if r.allowed is None else r.allowed.cpu(), r.softcap
            )
            for r in records
        ]
        return QueryKeyStore(cpu, query_pos, num_prompt_rows, prompt_len, shares)
    block = torch.empty((len(records), *halves[0].shape), dtype=torch.float16)  # (L, H, n_q, K)
    for layer_idx, half in enumerate(halves):
        block[layer_idx].copy_(half)
    steps = [block[:, :, num_prompt_rows + t, : prompt_len + t] for t in range(len(query_pos) - num_prompt_rows)]
    prompt = block[:, :, :num_prompt_rows, :prompt_len] if num_prompt_rows else None
    return RowStore(steps, prompt, shares)
