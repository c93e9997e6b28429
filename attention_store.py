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

import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

import torch

from errors import InputError

logger = logging.getLogger(__name__)

StoreKind = Literal["auto", "rows", "qk"]
STORE_KINDS: tuple[str, ...] = ("auto", "rows", "qk")
StoreDevice = Literal["auto", "cpu", "cuda"]
STORE_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
_CHUNK_ELEMENTS = 2**25  # float32 scores per chunk at the end of generation (128 MB)
_MAP_CHUNK = 2**22  # float32 scores per layer when many tokens are mapped at once (16 MB: stays in cache)


def softmax_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pos: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    softcap: float | None = None,
    causal: bool = True,
    key_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention rows of some queries of one layer, in float32.

    queries: (H, n, D) post-RoPE queries; keys: (KV, K, D) post-RoPE keys of positions 0..K-1,
    before any grouped-query repeat (head h reads KV head h // (H // KV)).
    query_pos: (n,) int64, the absolute position of each query: key j is seen only when j <= pos.
    allowed: (n, K) bool, the model's own mask where it had one (padding, windows), else None.
    softcap: the layer's logit soft-capping (cap * tanh(score / cap)), if any.
    causal: False when the caller knows every query sees every key (pos >= K - 1 for all), which
        skips building the causal mask.
    key_buffer: float32 scratch on the keys' device with room for KV * K * D values: keys in another
        dtype are converted into it, so no float32 copy of the keys is allocated per call.
    Returns (H, n, K) float32; each row sums to 1 over its visible keys.
    """
    num_heads, n, head_dim = queries.shape
    num_kv, kv_len = keys.shape[0], keys.shape[1]
    if keys.dtype != torch.float32:
        if key_buffer is not None:
            keys = key_buffer[: num_kv * kv_len * head_dim].view(num_kv, kv_len, head_dim).copy_(keys)
        else:
            keys = keys.float()
    grouped = queries.float().reshape(num_kv, (num_heads // num_kv) * n, head_dim)  # (KV, G*n, D)
    scores = torch.matmul(grouped, keys.transpose(1, 2)).mul_(scaling)  # (KV, G*n, K)
    scores = scores.view(num_heads, n, kv_len)  # (H, n, K)
    if softcap:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    hidden = None
    if causal:
        hidden = torch.arange(kv_len, device=keys.device)[None, :] > query_pos[:, None]  # (n, K) future keys
    if allowed is not None:
        hidden = ~allowed if hidden is None else hidden | ~allowed
    if hidden is not None:
        scores = scores.masked_fill_(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1)  # (H, n, K)


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


class Reduction:
    """Several (layer, head) maps reduced to one per query, fed a block of maps at a time, so the maps of
    many layers and tokens never sit in memory together: their mean, max or min, each map first rescaled to
    sum to 1 when `renormalize` (the reductions of `attention_processor`)."""

    def __init__(self, how: str, renormalize: bool):
        if how not in ("mean", "max", "min"):
            raise InputError(f"Unknown aggregation {how!r}; choose one of ('mean', 'max', 'min').")
        self.how, self.renormalize = how, renormalize
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        """values: (m, n, P) float32, m maps of n queries over P keys."""
        if self.renormalize:
            values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        part = values.sum(0) if self.how == "mean" else values.amax(0) if self.how == "max" else values.amin(0)
        if self.total is None:
            self.total = part
        elif self.how == "mean":
            self.total += part
        else:
            self.total = torch.maximum(self.total, part) if self.how == "max" else torch.minimum(self.total, part)
        self.count += values.shape[0]

    def result(self) -> torch.Tensor:
        """(n, P) float32."""
        if self.total is None:
            raise InputError("The layer and head ranges select no attention map; widen them.")
        return self.total / self.count if self.how == "mean" else self.total


def _rows_maps(rows: torch.Tensor, keys, layer_sel: slice, head_sel: slice, how: str, renormalize: bool):
    """(P,) float32: one token's rows (L, H, S) at key positions `keys`, reduced over the selected maps."""
    values = rows[layer_sel, head_sel][:, :, _on(keys, rows.device)]  # (l, h, P) float16
    if values.shape[0] * values.shape[1] == 0:
        raise InputError("The layer and head ranges select no attention map; widen them.")
    reduction = Reduction(how, renormalize)
    for layer_values in values:  # a layer at a time: small float32 blocks stay in the CPU's cache
        reduction.add(layer_values.float()[:, None])  # (h, 1, P)
    return reduction.result()[0]


def _on(index, device):
    """A slice as it is, an index tensor on `device`."""
    return index if isinstance(index, slice) else index.to(device)


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


class DeviceLedger:
    """Bytes of the stores left on accelerators, for the whole process, against one budget: a store is
    counted from `reserve` until it is garbage-collected."""

    def __init__(self):
        self._lock = threading.Lock()
        self.held = 0

    def budget(self, device: torch.device, budget_mb: float | None) -> int:
        """The bytes all device stores together may hold: `budget_mb`, or by default half of what is free
        on the device plus what the stores hold already (the rest stays for generation)."""
        if budget_mb is not None:
            return int(budget_mb * 2**20)
        free, _ = torch.cuda.mem_get_info(device)
        return (free + self.held) // 2

    def reserve(self, nbytes: int, budget: int) -> bool:
        with self._lock:
            if self.held + nbytes > budget:
                return False
            self.held += nbytes
            return True

    def track(self, store, nbytes: int) -> None:
        """Release `nbytes` when `store` is collected."""
        weakref.finalize(store, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


LEDGER = DeviceLedger()


def placement(
    requested: str, device: torch.device, nbytes: int, budget_mb: float | None, ledger: DeviceLedger = LEDGER
) -> tuple[bool, str]:
    """Whether a query-key store of `nbytes`, whose layers ran on `device`, stays there, and what the run's
    summary says about where it is. requested: 'auto' (on an accelerator when it fits the budget),
    'cpu' (on the host) or 'cuda' (on the GPU the model ran on, within the budget)."""
    if requested not in STORE_DEVICES:
        raise InputError(f"Unknown store device {requested!r}; choose one of {STORE_DEVICES}.")
    host = "queries and keys on the host"
    if requested == "cpu":
        return False, host
    if device.type != "cuda":
        if requested == "cuda":
            raise InputError(
                f"The store cannot stay on a GPU: this model runs on {device}. Use store device auto or cpu, or "
                "load the model on a GPU."
            )
        return False, host
    budget = ledger.budget(device, budget_mb)
    if ledger.reserve(nbytes, budget):
        return True, f"queries and keys on {device} ({nbytes / 2**20:.0f} MB; rows computed there)"
    return False, (
        f"{host}: {nbytes / 2**20:.0f} MB more would pass the {budget / 2**20:.0f} MB allowed for stores on "
        f"{device} (raise --store-budget-mb, or drop older results)"
    )


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind some tensors (views of one block count once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(seen.values())


class IdlePrefetch:
    """One background thread that computes the rows of tokens next to the last one viewed, while no view
    asks a store for rows: it starts `quiet_s` after the last such request and abandons its block between
    layers when another one comes, so a view never waits behind it for more than one layer's rows."""

    def __init__(self, quiet_s: float = 0.15):
        self.quiet_s = quiet_s
        self._last = 0.0  # time.monotonic() of the last view's request
        self._job: tuple | None = None  # (weak reference to the store, query rows)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.done = 0  # blocks kept, for tests and benchmarks

    def active(self) -> None:
        """A view is computing rows now."""
        self._last = time.monotonic()

    def ask(self, store, rows: list[int]) -> None:
        """Prefetch `rows` of `store` when idle; a newer request replaces an older one not started."""
        with self._lock:
            self._job = (weakref.ref(store), list(rows))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="rows-prefetch")
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while time.monotonic() - self._last < self.quiet_s:
                time.sleep(self.quiet_s)
            with self._lock:
                job, self._job = self._job, None
            store = job[0]() if job else None
            if store is None:
                continue
            started = time.monotonic()
            try:
                if store.prefetch_rows(job[1], stop=lambda since=started: self._last > since or self._job is not None):
                    self.done += 1
            except Exception:  # a prefetch only saves time; the view computes what it needs itself
                logger.exception("prefetching rows failed")
            del store


PREFETCH = IdlePrefetch()


class RowStore:
    """Float16 rows on the host: step t is (L, H, prompt_len + t), prompt row i is (L, H, prompt_len)."""

    kind = "rows"
    device = torch.device("cpu")
    placement = "float16 rows on the host"

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

    def maps(self, steps, keys, layer_sel: slice, head_sel: slice, how: str, renormalize: bool) -> torch.Tensor:
        """(n, P) float32 on the host: each step's attention on key positions `keys` (a slice or index
        tensor, in the prompt), reduced over the selected layers and heads (`Reduction`)."""
        steps = [int(t) for t in steps]
        if len(steps) == 1:
            return _rows_maps(self.step_rows[steps[0]], keys, layer_sel, head_sel, how, renormalize)[None]
        first = self.step_rows[steps[0]][layer_sel, head_sel][:, :, keys]  # (l, h, P)
        size = max(1, _MAP_CHUNK // max(1, first.numel()))
        out = []
        for start in range(0, len(steps), size):
            part = steps[start : start + size]
            values = torch.stack([self.step_rows[t][layer_sel, head_sel][:, :, keys] for t in part])  # (c, l, h, P)
            reduction = Reduction(how, renormalize)
            reduction.add(values.float().flatten(1, 2).transpose(0, 1))  # (l*h, c, P)
            out.append(reduction.result())
        return torch.cat(out)

    def masses(self, steps, keys) -> torch.Tensor:
        """(n, L, H) float32 on the host: each step's attention mass, per layer and head, on key positions
        `keys` (a slice or index tensor, in the prompt)."""
        return torch.stack([self.step_rows[t][:, :, keys].float().sum(-1) for t in steps])

    @property
    def nbytes(self) -> int:
        return _storage_bytes([*self.step_rows, self.prompt_rows, *self.shares.values()])


class QueryKeyStore:
    """Queries and keys in the model's dtype; rows are computed when asked for, where the store lives.

    layers: one `LayerRecord` per captured layer, on the host, or left on the devices the layers ran on
    (`placement` says which). query_pos: (n_q,) int64. The last `cache_tokens` tokens' rows are kept,
    so moving a slider does not recompute them; `maps` computes many tokens' maps in one pass per layer.
    Keys in a narrower dtype are converted into one reused float32 buffer per device, never copied whole
    per view. Safe to use from several threads.
    """

    kind = "qk"

    def __init__(
        self,
        layers: list[LayerRecord],
        query_pos: torch.Tensor,
        num_prompt_rows: int,
        prompt_len: int,
        shares: dict[str, torch.Tensor],
        cache_tokens: int = 8,
        placement: str = "queries and keys on the host",
    ):
        self.layers, self.query_pos = layers, query_pos.cpu()
        self.num_prompt_rows, self.prompt_len = num_prompt_rows, prompt_len
        self.shares = shares
        self.cache_tokens = cache_tokens
        self.placement = placement
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # row -> (L, H, kv) float16, on `device`
        self._buffers: dict[torch.device, torch.Tensor] = {}  # float32 key scratch per device
        self._positions: dict[torch.device, torch.Tensor] = {}  # query_pos per device
        self._lock = threading.RLock()
        self._viewed: int | None = None  # the row a view asked for last
        self.prefetch = False  # compute the next tokens' rows on an idle thread after a view (the app's choice)

    @property
    def device(self) -> torch.device:
        """Where the rows are computed (the first layer's device; a split model keeps each on its own)."""
        return self.layers[0].keys.device

    def _scratch(self, layer: LayerRecord) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(float32 key buffer or None when the keys are float32 already, query positions) on the layer's device."""
        device = layer.keys.device
        if device not in self._positions:
            self._positions[device] = self.query_pos.to(device)
        if layer.keys.dtype == torch.float32:
            return None, self._positions[device]
        if device not in self._buffers:
            size = max(r.keys[0].numel() * r.keys.shape[0] for r in self.layers if r.keys.device == device)
            self._buffers[device] = torch.empty(size, dtype=torch.float32, device=device)
        return self._buffers[device], self._positions[device]

    def _layer_rows(
        self,
        layer: LayerRecord,
        rows: slice | list[int],
        kv_len: int,
        heads: slice = slice(None),
        float_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(h, n, kv_len) float32 on the layer's device: the rows of query rows `rows` (a slice or a list)
        over the first kv_len keys, for the heads `heads` (a slice of the query heads). float_keys: the
        layer's first kv_len keys already in float32 (`_float_keys`), when several calls share them."""
        buffer, positions = self._scratch(layer)
        num_heads, num_kv = layer.queries.shape[0], layer.keys.shape[0]
        group = num_heads // num_kv
        first, stop, _ = heads.indices(num_heads)
        kv_first, kv_stop = first // group, -(-stop // group)  # the KV heads the selected heads read
        pick = rows if isinstance(rows, slice) else torch.tensor(rows, dtype=torch.long, device=positions.device)
        seen = self.query_pos[rows if isinstance(rows, slice) else torch.tensor(rows, dtype=torch.long)]
        allowed = None if layer.allowed is None else layer.allowed[pick, :kv_len]
        probs = softmax_rows(
            layer.queries[kv_first * group : kv_stop * group, pick],
            layer.keys[kv_first:kv_stop, :kv_len] if float_keys is None else float_keys[kv_first:kv_stop],
            positions[pick],
            layer.scaling,
            allowed,
            layer.softcap,
            causal=bool((seen < kv_len - 1).any()),  # some row does not see every key
            key_buffer=buffer,
        )  # (KV' * G, n, kv_len)
        return probs[first - kv_first * group : stop - kv_first * group]

    def _float_keys(self, layer: LayerRecord, kv_len: int) -> torch.Tensor:
        """(KV, kv_len, D) float32: the layer's first kv_len keys, converted into the reused buffer (valid
        until the next layer's conversion) unless they are float32 already."""
        if layer.keys.dtype == torch.float32:
            return layer.keys[:, :kv_len]
        buffer, _ = self._scratch(layer)
        num_kv, _, head_dim = layer.keys.shape
        return buffer[: num_kv * kv_len * head_dim].view(num_kv, kv_len, head_dim).copy_(layer.keys[:, :kv_len])

    def _kv_len(self, row_idx: int) -> int:
        """Keys row `row_idx`'s rows span: the prompt for a prompt row, the prompt and the tokens before
        for a generated token's."""
        return self.prompt_len + max(0, row_idx - self.num_prompt_rows)

    def _rows(self, row_idx: int, also=None) -> torch.Tensor:
        """(L, H, kv) float16 rows of query row `row_idx` on the store's device, cached. When computed,
        `also(i, probs)` sees each layer's float32 rows (H, 1, kv) on the way (a map made in the same pass)."""
        PREFETCH.active()  # before waiting for the lock, so a prefetch gives way at its next layer
        with self._lock:
            if row_idx in self._cache:
                self._cache.move_to_end(row_idx)
                self._viewed = row_idx
                return self._cache[row_idx]
            select, kv_len = slice(row_idx, row_idx + 1), self._kv_len(row_idx)
            first = self.layers[0]
            rows = torch.empty(
                (len(self.layers), first.queries.shape[0], kv_len), dtype=torch.float16, device=self.device
            )
            for i, layer in enumerate(self.layers):
                probs = self._layer_rows(layer, select, kv_len)  # (H, 1, kv)
                rows[i].copy_(probs[:, 0])  # a split model copies across devices
                if also is not None:
                    also(i, probs)
            self._keep(row_idx, rows)
            PREFETCH.active()
            if self.prefetch:
                near = [row_idx + 1, row_idx + 2, row_idx - 1]
                wanted = [r for r in near if self.num_prompt_rows <= r < len(self.query_pos) and r not in self._cache]
                if row_idx >= self.num_prompt_rows and wanted:
                    PREFETCH.ask(self, wanted)
            return rows

    def _keep(self, row_idx: int, rows: torch.Tensor, viewed: bool = True) -> None:
        """Cache a row. The row viewed last stays the most recent: a prefetched row goes in just before it."""
        self._cache[row_idx] = rows
        if viewed:
            self._viewed = row_idx
        elif self._viewed in self._cache:
            self._cache.move_to_end(self._viewed)
        while len(self._cache) > self.cache_tokens:
            self._cache.popitem(last=False)

    def prefetch_rows(self, rows: list[int], stop=lambda: False) -> bool:
        """Compute query rows `rows` (several tokens) in one pass per layer and cache them; `stop()` is
        asked between layers, and a true answer abandons the work. True when they were kept."""
        kv_len = max(self._kv_len(r) for r in rows)
        first = self.layers[0]
        block = torch.empty(
            (len(self.layers), first.queries.shape[0], len(rows), kv_len), dtype=torch.float16, device=self.device
        )
        for i, layer in enumerate(self.layers):
            if stop():
                return False
            with self._lock:  # the key buffer is shared: one layer at a time, so a view waits one layer at most
                block[i].copy_(self._layer_rows(layer, rows, kv_len))
        with self._lock:
            for j, row_idx in enumerate(rows):
                if row_idx not in self._cache:
                    self._keep(row_idx, block[:, :, j, : self._kv_len(row_idx)], viewed=False)
        return True

    def step(self, step_idx: int) -> torch.Tensor:
        """(L, H, prompt_len + step_idx) float16 on the host."""
        return self._rows(self.num_prompt_rows + step_idx).cpu()

    def prompt(self, row_idx: int) -> torch.Tensor:
        """(L, H, prompt_len) float16 on the host."""
        return self._rows(row_idx).cpu()

    def maps(self, steps, keys, layer_sel: slice, head_sel: slice, how: str, renormalize: bool) -> torch.Tensor:
        """(n, P) float32 on the host: each step's attention on key positions `keys` (a slice or index
        tensor, in the prompt), reduced over the selected layers and heads (`Reduction`). Cached tokens
        are read from the cache; one new token is computed whole and cached, its map made in the same
        pass (a token switch: the next slider move reads the cache); several new tokens are computed
        together, one batched pass per layer in chunks, and not cached."""
        steps = [int(t) for t in steps]
        out: dict[int, torch.Tensor] = {}
        PREFETCH.active()
        with self._lock:
            fresh = sorted({t for t in steps if self.num_prompt_rows + t not in self._cache})
            if len(fresh) == 1:
                reduction, chosen = Reduction(how, renormalize), range(len(self.layers))[layer_sel]

                def add(i: int, probs: torch.Tensor) -> None:
                    if i in chosen:
                        reduction.add(probs[head_sel][:, :, _on(keys, probs.device)].to(self.device))

                self._rows(self.num_prompt_rows + fresh[0], also=add)
                out[fresh[0]] = reduction.result()[0].cpu()
                fresh = []
            for t in set(steps) - set(fresh) - set(out):
                rows = self._rows(self.num_prompt_rows + t)
                out[t] = _rows_maps(rows, keys, layer_sel, head_sel, how, renormalize).cpu()
            if fresh:
                out.update(self._fresh_maps(fresh, keys, layer_sel, head_sel, how, renormalize))
        return torch.stack([out[t] for t in steps])

    def masses(self, steps, keys) -> torch.Tensor:
        """(n, L, H) float32 on the host: each step's attention mass, per layer and head, on key positions
        `keys` (a slice or index tensor, in the prompt); cached tokens from the cache, the others together,
        one pass per layer in chunks."""
        steps = [int(t) for t in steps]
        out: dict[int, torch.Tensor] = {}
        PREFETCH.active()
        with self._lock:
            for t in steps:
                rows = self._cache.get(self.num_prompt_rows + t)
                if rows is not None:
                    out[t] = rows[:, :, _on(keys, rows.device)].float().sum(-1).cpu()
            fresh = sorted(set(steps) - set(out))
            if fresh:
                kv_len = self.prompt_len + fresh[-1]
                size = max(1, _MAP_CHUNK // max(1, self.layers[0].queries.shape[0] * kv_len))
                per_layer = []
                for layer in self.layers:
                    float_keys = self._float_keys(layer, kv_len)
                    parts = []
                    for start in range(0, len(fresh), size):
                        rows = [self.num_prompt_rows + t for t in fresh[start : start + size]]
                        probs = self._layer_rows(layer, rows, kv_len, slice(None), float_keys)  # (H, c, kv)
                        parts.append(probs[:, :, _on(keys, layer.keys.device)].sum(-1).cpu())  # (H, c)
                    per_layer.append(torch.cat(parts, dim=1))
                block = torch.stack(per_layer).permute(2, 0, 1)  # (n, L, H)
                out.update(zip(fresh, block, strict=True))
        return torch.stack([out[t] for t in steps])

    def _fresh_maps(self, steps: list[int], keys, layer_sel, head_sel, how, renormalize) -> dict[int, torch.Tensor]:
        """{step: (P,) float32 on the host} for sorted steps, nothing cached: per layer, its keys converted
        once, then the steps' rows in chunks of about `_MAP_CHUNK` scores, each reduced at once."""
        num_heads = len(range(*head_sel.indices(self.layers[0].queries.shape[0])))
        kv_len = self.prompt_len + steps[-1]
        size = max(1, _MAP_CHUNK // max(1, num_heads * kv_len))
        chunks = []
        for start in range(0, len(steps), size):
            part = steps[start : start + size]
            rows = [self.num_prompt_rows + t for t in part]
            if rows == list(range(rows[0], rows[-1] + 1)):
                rows = slice(rows[0], rows[-1] + 1)  # a view of the queries, not a copy
            chunks.append((part, rows, Reduction(how, renormalize)))
        for layer in self.layers[layer_sel]:
            float_keys = self._float_keys(layer, kv_len)
            for _, rows, reduction in chunks:
                probs = self._layer_rows(layer, rows, kv_len, head_sel, float_keys)  # (h, n, kv_len)
                reduction.add(probs[:, :, _on(keys, layer.keys.device)].to(self.device))  # (h, n, P)
        return {
            t: heat for part, _, reduction in chunks for t, heat in zip(part, reduction.result().cpu(), strict=True)
        }

    @property
    def nbytes(self) -> int:
        kept = [t for layer in self.layers for t in (layer.queries, layer.keys, layer.allowed)]
        return _storage_bytes([*kept, *self._buffers.values(), *self._cache.values(), *self.shares.values()])


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
    store_device: str = "cpu",
    budget_mb: float | None = None,
):
    """A `RowStore` or `QueryKeyStore` ('rows' / 'qk') from the layers' records.

    query_pos: (n_q,) int64 on the CPU. segments: name -> key positions (int64, CPU) whose per-step
    mass to keep, e.g. the image tokens. Work runs on each layer's own device, every layer queued
    before the first copy back; the copies to the host wait for their own device only. A 'qk' store
    stays on the devices its layers ran on when `placement` allows (`store_device`, `budget_mb`);
    rows and everything else go to the host.
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
        nbytes = sum(
            t.numel() * t.element_size() for r in records for t in (r.queries, r.keys, r.allowed) if t is not None
        )
        stays, where = placement(store_device, records[0].keys.device, nbytes, budget_mb)
        kept = [
            _narrowed(r)
            if stays
            else LayerRecord(
                r.queries.cpu(), r.keys.cpu(), r.scaling, None if r.allowed is None else r.allowed.cpu(), r.softcap
            )
            for r in records
        ]
        store = QueryKeyStore(kept, query_pos, num_prompt_rows, prompt_len, shares, placement=where)
        if stays:
            LEDGER.track(store, nbytes)
        return store
    block = torch.empty((len(records), *halves[0].shape), dtype=torch.float16)  # (L, H, n_q, K)
    for layer_idx, half in enumerate(halves):
        block[layer_idx].copy_(half)
    steps = [block[:, :, num_prompt_rows + t, : prompt_len + t] for t in range(len(query_pos) - num_prompt_rows)]
    prompt = block[:, :, :num_prompt_rows, :prompt_len] if num_prompt_rows else None
    return RowStore(steps, prompt, shares)


def _narrowed(record: LayerRecord) -> LayerRecord:
    """The record with keys that own just their storage: keys viewed out of a longer preallocated cache (a
    static cache) are copied, so keeping the store does not keep the whole cache."""
    keys = record.keys
    if keys.untyped_storage().nbytes() > keys.numel() * keys.element_size():
        keys = keys.clone()
    return replace(record, keys=keys)
