"""Capture the decoder attention that produced each generated token, during generation.

The default method ("sdpa") registers an attention function with transformers: it computes the
layer output with SDPA, exactly as plain generation does, and additionally recomputes the softmax
row of only the last query position (the one that predicts the next token), stored in float16 on
the CPU. The reference method ("eager") runs eager attention and reads the same rows through
forward hooks; it is slower and exists for tests and comparison.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from families import VisionLayout, attention_implementation, decoder_layers

logger = logging.getLogger(__name__)

CAPTURE_IMPLEMENTATION = "vlm_explorer_capture"
CaptureMethod = Literal["sdpa", "eager"]
CAPTURE_METHODS: tuple[str, ...] = ("sdpa", "eager")


class CaptureError(RuntimeError):
    """Capture did not produce one attention row per generated token."""


@dataclass
class AttentionRun:
    """One generation: its tokens, the image's vision layout and the captured attention.

    All indices are 0-based. Everything is detached and on the CPU.

    prompt_ids: the prompt's token ids, vision placeholders expanded (len = prompt_len).
    generated_ids: the ids the model generated, in order; step_idx t is generated_ids[t].
    generated_tokens: one decoded piece per generated id.
    vision: where the image's tokens sit in the sequence and on the picture (the first image).
    visions: one layout per image (or the one video), in prompt order; visions[0] is `vision`.
    layer_indices: the decoder layers captured, in order; axis 0 of `step_attention`.
    num_heads: query heads per layer; axis 1 of `step_attention`.
    rows: per step t, a float16 tensor (num_layers, num_heads, prompt_len + t): the softmax
        attention of the query at position prompt_len - 1 + t, i.e. the one that produced
        generated token t (t = 0 is the last prompt row). Use `step_attention`.
    prompt_tokens: one decoded piece per prompt id (empty when not provided).
    prompt_positions: prompt positions (text, not vision) whose rows were also captured at prefill.
    prompt_rows: (num_layers, num_heads, len(prompt_positions), prompt_len) float16 or None: row i is
        the softmax attention of the query at prompt_positions[i] (zero after that position).
        Use `prompt_attention`.
    model_id, family, settings: provenance for exports and captions.
    """

    prompt_ids: list[int]
    generated_ids: list[int]
    generated_tokens: list[str]
    vision: VisionLayout
    layer_indices: list[int]
    num_heads: int
    rows: list[torch.Tensor] = field(repr=False)
    model_id: str = ""
    family: str = ""
    settings: dict = field(default_factory=dict)
    prompt_positions: list[int] = field(default_factory=list)
    prompt_rows: torch.Tensor | None = field(default=None, repr=False)
    prompt_tokens: list[str] = field(default_factory=list, repr=False)
    visions: list[VisionLayout] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.visions:
            self.visions = [self.vision]

    @property
    def num_steps(self) -> int:
        return len(self.generated_ids)

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def nbytes(self) -> int:
        prompt = 0 if self.prompt_rows is None else self.prompt_rows.numel() * self.prompt_rows.element_size()
        return prompt + sum(row.numel() * row.element_size() for row in self.rows)

    def prompt_attention(self, token_pos: int) -> torch.Tensor:
        """(num_layers, num_heads, token_pos + 1) float16: the attention of prompt token `token_pos`."""
        if token_pos not in self.prompt_positions:
            raise IndexError(f"Prompt position {token_pos} was not captured; captured prompt positions are "
                             f"{self.prompt_positions[:1]}..{self.prompt_positions[-1:]} (see prompt_positions).")
        return self.prompt_rows[:, :, self.prompt_positions.index(token_pos), : token_pos + 1]

    def step_attention(self, step_idx: int) -> torch.Tensor:
        """(num_layers, num_heads, len(prompt_ids) + step_idx) float16 on the CPU."""
        if not 0 <= step_idx < self.num_steps:
            raise IndexError(f"step_idx {step_idx} is out of range: this run generated {self.num_steps} "
                             f"tokens, so pick 0..{self.num_steps - 1}.")
        return self.rows[step_idx]


def estimate_capture_bytes(num_layers: int, num_heads: int, prompt_len: int, max_new_tokens: int,
                           num_prompt_rows: int = 0) -> int:
    """Upper bound of what a capture stores: float16 rows of prompt_len + t keys for t < max_new_tokens,
    plus `num_prompt_rows` prompt rows of prompt_len keys."""
    keys = max_new_tokens * prompt_len + max_new_tokens * (max_new_tokens - 1) // 2 + num_prompt_rows * prompt_len
    return 2 * num_layers * num_heads * keys


class CaptureTooLargeError(MemoryError):
    """A capture that would exceed the memory allowed for it; refused before generating."""


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy; from a GPU it goes into pinned memory without waiting (see `_Recorder.steps`)."""
    if not tensor.is_cuda:
        return tensor.clone() if tensor.device.type == "cpu" else tensor.cpu()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return pinned.copy_(tensor, non_blocking=True)


class _Recorder:
    """Rows captured during one generation, per layer, one per forward call."""

    def __init__(self, layer_indices: list[int], prompt_positions: list[int] | None = None):
        self.layer_indices = layer_indices
        self.wanted = set(layer_indices)
        self.rows: dict[int, list[torch.Tensor]] = {idx: [] for idx in layer_indices}
        self.prompt_positions = sorted(set(prompt_positions or []))
        self.prompt_rows: dict[int, torch.Tensor] = {}                   # layer -> (H, n, prompt_len)

    def wants_prompt_rows(self, layer_idx: int, q_len: int) -> bool:
        """At prefill (many queries), once per layer, when prompt rows were asked for."""
        return bool(self.prompt_positions) and q_len > 1 and layer_idx in self.wanted \
            and layer_idx not in self.prompt_rows

    def record_prompt(self, layer_idx: int, probs: torch.Tensor) -> None:
        """probs: (B=1, H, n, kv) softmax rows of the prompt positions."""
        rows = probs[0].to(torch.float16)                               # (H, n, kv)
        self.prompt_rows[layer_idx] = _to_cpu(rows)

    def stacked_prompt_rows(self) -> torch.Tensor | None:
        """(num_layers, H, n, prompt_len) float16, or None when no prompt rows were asked for."""
        if not self.prompt_positions:
            return None
        if set(self.prompt_rows) != self.wanted:
            raise CaptureError("Prompt rows were asked for but not captured at prefill for every layer.")
        return torch.stack([self.prompt_rows[idx] for idx in self.layer_indices])

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        """probs: (B=1, H, kv) softmax row of the last query position, any device and dtype."""
        if layer_idx in self.wanted:
            row = probs[0].to(torch.float16)                            # (H, kv)
            self.rows[layer_idx].append(_to_cpu(row))

    def steps(self, num_steps: int) -> list[torch.Tensor]:
        """Stack per step: list over t of (num_layers, H, prompt_len + t)."""
        counts = {idx: len(rows) for idx, rows in self.rows.items()}
        if any(count != num_steps for count in counts.values()):
            raise CaptureError(f"Captured {counts} rows per layer for {num_steps} generated tokens. "
                               "Was the model run with a batch of one and a standard decoding loop?")
        if torch.cuda.is_available():
            torch.cuda.synchronize()                                    # the non-blocking copies have landed
        return [torch.stack([self.rows[idx][t] for idx in self.layer_indices]) for t in range(num_steps)]


_active: _Recorder | None = None
_active_lock = threading.Lock()


def _query_probs(query, key, attention_mask, scaling, rows: list[int]) -> torch.Tensor:
    """Softmax attention of the given query rows only: (B, H, n, kv), computed in float32.

    rows index the query's own axis. Grouped-query attention is handled by grouping the query
    heads instead of repeating keys. Causality comes from the mask, or, when the model relies on
    SDPA's is_causal (no mask), from the rows' positions: query row r sits at kv_len - q_len + r.
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = num_heads // num_kv_heads
    picked = query[:, :, rows, :].float()                               # (B, H, n, D)
    picked = picked.view(batch, num_kv_heads, groups * len(rows), head_dim)  # (B, KV, G*n, D)
    scores = torch.matmul(picked, key.float().transpose(2, 3)) * scaling  # (B, KV, G*n, kv)
    scores = scores.view(batch, num_heads, len(rows), kv_len)           # (B, H, n, kv)
    if attention_mask is not None:
        mask = attention_mask[:, :, rows, :kv_len]                       # (B, 1 or H, n, kv)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    else:
        positions = torch.tensor(rows, device=key.device) + (kv_len - q_len)    # (n,)
        future = torch.arange(kv_len, device=key.device)[None, :] > positions[:, None]  # (n, kv)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1)                                # (B, H, n, kv)


def _capturing_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA output, plus the last query's softmax row for the active recorder."""
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                       dropout=dropout, scaling=scaling, **kwargs)  # (B, q, H, D)
    recorder = _active
    layer_idx = getattr(module, "layer_idx", None)
    if recorder is not None and layer_idx is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q_len = query.shape[2]
        recorder.record(layer_idx, _query_probs(query, key, attention_mask, scale, [q_len - 1])[:, :, 0])
        if recorder.wants_prompt_rows(layer_idx, q_len):
            recorder.record_prompt(layer_idx, _query_probs(query, key, attention_mask, scale,
                                                           recorder.prompt_positions))
    return output, None


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_sdpa)
# Without a mask function under the same name the decoder gets no mask and ignores padding.
AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def _eager_hook(recorder: _Recorder, layer_idx: int):
    def hook(module, args, output):
        weights = output[1]                                             # (B, H, q, kv)
        if weights is None:
            raise CaptureError("Eager attention returned no weights; cannot use the eager reference.")
        recorder.record(layer_idx, weights[:, :, -1, :])
        if recorder.wants_prompt_rows(layer_idx, weights.shape[2]):
            recorder.record_prompt(layer_idx, weights[:, :, recorder.prompt_positions, :])
    return hook


@contextmanager
def capture_attention(model, method: CaptureMethod = "sdpa", layers: list[int] | None = None,
                      prompt_positions: list[int] | None = None) -> Iterator[_Recorder]:
    """Install attention capture on the decoder for the duration of the block.

    Yields a recorder; after `model.generate(...)` inside the block, call
    `recorder.steps(num_generated)` (and `recorder.stacked_prompt_rows()` when `prompt_positions`,
    positions of the prompt whose rows to keep from prefill, were given). The model's attention
    implementation and hooks are restored on exit, also when generation raises. Only one capture
    runs at a time.
    """
    global _active
    if method not in CAPTURE_METHODS:
        raise ValueError(f"Unknown capture method {method!r}; choose one of {CAPTURE_METHODS}.")
    num_layers = len(decoder_layers(model))
    layer_indices = sorted(set(range(num_layers) if layers is None else layers))
    if not layer_indices or not all(0 <= idx < num_layers for idx in layer_indices):
        raise ValueError(f"layers must be indices in 0..{num_layers - 1}, got {layers}.")
    recorder = _Recorder(layer_indices, prompt_positions)
    handles = []
    implementation = CAPTURE_IMPLEMENTATION if method == "sdpa" else "eager"
    with _active_lock, attention_implementation(model, text=implementation):
        try:
            if method == "sdpa":
                _active = recorder
            else:
                for idx in layer_indices:
                    attn = decoder_layers(model)[idx].self_attn
                    handles.append(attn.register_forward_hook(_eager_hook(recorder, idx)))
            yield recorder
        finally:
            _active = None
            for handle in handles:
                handle.remove()
