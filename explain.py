"""Maps beyond raw attention: attention rollout over the decoder, and gradient-weighted attention.

Both run on demand, in a teacher-forced pass over the prompt and the tokens generated before the
selected one, and return a map over the image's token grid like `token_heatmap`.

- `rollout_map`: Abnar & Zuidema (2020). Each layer's head-averaged attention, mixed with the
  identity for the residual path (0.5 A + 0.5 I), multiplied through all layers; the row of the
  selected token, read at the vision positions. Queries and keys are recorded during the pass and
  the layers' attention rows are rebuilt one layer (and one chunk of rows) at a time, from the
  last layer down, so memory stays linear in the number of layers.
- `gradient_map`: Chefer et al. (2021). With eager attention and gradients, R = I, then for every
  layer R ← R + mean_h[(∂logit/∂A ⊙ A)⁺] R; the selected token's row at the vision positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attention_extractor import AttentionRun
from families import decoder_layers

QK_IMPLEMENTATION = "vlm_explorer_qk"
_recorded: dict[int, tuple[torch.Tensor, torch.Tensor, float]] | None = None


def _recording_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA output; also keeps this layer's post-RoPE queries and keys (KV heads), in the model's dtype."""
    if _recorded is not None and getattr(module, "layer_idx", None) is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _recorded[module.layer_idx] = (query[0].detach().cpu(), key[0].detach().cpu(), scale)  # (H,S,D), (KV,S,D)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


AttentionInterface.register(QK_IMPLEMENTATION, _recording_sdpa)
AttentionMaskInterface.register(QK_IMPLEMENTATION, sdpa_mask)


@contextmanager
def _decoder_attention(model, implementation: str):
    """Switch only the decoder's attention implementation for the block; always restore it."""
    saved = {"text_config": model.config.get_text_config()._attn_implementation,
             "vision_config": model.config.vision_config._attn_implementation}
    model.set_attn_implementation({"text_config": implementation, "vision_config": saved["vision_config"]})
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def _teacher_forced(holder, run: AttentionRun, image, step_idx: int):
    settings = run.settings
    return holder.teacher_forced_inputs(image, settings.get("prompt", ""), run.generated_ids[:step_idx],
                                        settings.get("min_pixels"), settings.get("max_pixels")).to(holder.input_device)


def _grid(run: AttentionRun, row: torch.Tensor) -> np.ndarray:
    """(S,) relevance of every position → (grid_h, grid_w) float32 at the first image's cells."""
    positions = torch.from_numpy(run.vision.token_positions)
    return row[positions].reshape(run.vision.grid_hw).float().numpy()


def _mean_attention_rows(query, key, scale, rows: slice) -> torch.Tensor:
    """Head-averaged causal softmax attention of query rows `rows`: (n, S) float32."""
    num_heads, seq, _ = query.shape
    groups = num_heads // key.shape[0]
    keys = key.float().repeat_interleave(groups, dim=0)                  # (H, S, D)
    scores = torch.matmul(query[:, rows].float(), keys.transpose(1, 2)) * scale  # (H, n, S)
    positions = torch.arange(seq)[rows]                                  # (n,)
    scores = scores.masked_fill(torch.arange(seq)[None, :] > positions[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=0)                     # (n, S)


def rollout_map(holder, run: AttentionRun, image, step_idx: int, chunk: int = 256) -> np.ndarray:
    """Attention rollout of generated token `step_idx` onto the image grid: (grid_h, grid_w) float32."""
    global _recorded
    inputs = _teacher_forced(holder, run, image, step_idx)
    _recorded = {}
    try:
        with torch.inference_mode(), _decoder_attention(holder.model, QK_IMPLEMENTATION):
            holder.model(**inputs)
        recorded, _recorded = _recorded, None
    finally:
        _recorded = None
    seq = inputs["input_ids"].shape[1]
    relevance = torch.zeros(seq)
    relevance[seq - 1] = 1.0                                             # the row that produced the token
    for layer_idx in reversed(range(len(decoder_layers(holder.model)))):
        query, key, scale = recorded.pop(layer_idx)                      # free each layer once used
        mixed = 0.5 * relevance.clone()                                  # the identity's half
        for start in range(0, seq, chunk):
            rows = slice(start, min(start + chunk, seq))
            mixed += 0.5 * relevance[rows] @ _mean_attention_rows(query, key, scale, rows)  # (S,)
        relevance = mixed
    return _grid(run, relevance)


def gradient_bytes_estimate(holder, seq_len: int) -> int:
    """Rough memory of a gradient pass: attention weights and their gradients in float32, all layers."""
    config = holder.model.config.get_text_config()
    return 3 * holder.num_layers * int(config.num_attention_heads) * seq_len * seq_len * 4


def gradient_map(holder, run: AttentionRun, image, step_idx: int, max_mb: float | None = None) -> np.ndarray:
    """Gradient-weighted attention relevance (Chefer et al.) of token `step_idx` on the image grid."""
    inputs = _teacher_forced(holder, run, image, step_idx)
    seq = inputs["input_ids"].shape[1]
    if max_mb is not None and gradient_bytes_estimate(holder, seq) > max_mb * 2**20:
        raise MemoryError(f"Gradient-weighted attention over {seq} tokens needs about "
                          f"{gradient_bytes_estimate(holder, seq) / 2**20:.0f} MB, more than the {max_mb:.0f} MB "
                          "allowed. Lower the image-token budget (max pixels) or use raw attention or rollout.")
    weights: list[torch.Tensor] = []

    def keep(module, args, output):
        output[1].retain_grad()
        weights.append(output[1])
    handles = [layer.self_attn.register_forward_hook(keep) for layer in decoder_layers(holder.model)]
    try:
        with torch.enable_grad(), _decoder_attention(holder.model, "eager"):
            logits = holder.model(**inputs).logits                        # (1, S, vocab)
            logits[0, -1, run.generated_ids[step_idx]].backward()
    finally:
        for handle in handles:
            handle.remove()
        holder.model.zero_grad(set_to_none=True)
    relevance = torch.eye(seq)                                           # R = I
    for attn in weights:                                                 # in layer order
        cam = (attn.grad[0] * attn[0]).clamp(min=0).mean(dim=0).detach().float().cpu()  # (S, S)
        relevance = relevance + cam @ relevance
    return _grid(run, relevance[seq - 1])
