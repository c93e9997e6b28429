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

import numpy as np
import torch

from attention_extractor import RECORD_IMPLEMENTATION, recording
from attention_store import softmax_rows
from errors import InputError
from families import (
    decoder_layers,
    feature_block,
    run_vision_tower,
    supports_vit_map,
    vision_encoder_blocks,
    vision_merge_size,
    vision_prefix_tokens,
    vision_window_order,
)
from records import AttentionRun


class _DecoderQK:
    """Keeps each decoder layer's post-RoPE queries and keys (KV heads) on the CPU, in the model's dtype,
    and the mask it used (None: causal). Layers share mask tensors, so each distinct mask is kept once."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None, float | None]] = {}
        self._masks: dict[int, torch.Tensor] = {}

    def on_attention(self, module, query, key, attention_mask, scaling, kwargs) -> None:
        if getattr(module, "layer_idx", None) is None:
            return
        mask = None
        if attention_mask is not None:  # (1, 1, S, S): bool, or additive
            if id(attention_mask) not in self._masks:
                allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
                self._masks[id(attention_mask)] = allowed[0, 0].detach().cpu()  # (S, S) True = may attend
            mask = self._masks[id(attention_mask)]
        # (H, S, D) queries, (KV, S, D) keys; a soft-capping layer's cap (PaliGemma 2)
        self.layers[module.layer_idx] = (
            query[0].detach().cpu(),
            key[0].detach().cpu(),
            scaling,
            mask,
            kwargs.get("softcap"),
        )


def _grid(run: AttentionRun, row: torch.Tensor) -> np.ndarray:
    """(S,) relevance of every position → (grid_h, grid_w) float32 at the first image's cells."""
    positions = torch.from_numpy(run.vision.token_positions)
    return row[positions].reshape(run.vision.grid_hw).float().numpy()


def _mean_attention_rows(
    query, key, scale, rows: slice, mask: torch.Tensor | None = None, softcap: float | None = None
) -> torch.Tensor:
    """Head-averaged softmax attention of query rows `rows` under the model's mask (S, S; True = may
    attend), or causal when there is none, with the layer's logit soft-capping if any: (n, S) float32."""
    seq = query.shape[1]
    if mask is not None:  # the model's own mask decides alone (bidirectional blocks too)
        query_pos, allowed = torch.full((len(range(seq)[rows]),), seq - 1), mask[rows, :seq]  # (n,), (n, S)
    else:  # causal
        query_pos, allowed = torch.arange(seq)[rows], None
    return softmax_rows(query[:, rows], key, query_pos, scale, allowed, softcap).mean(dim=0)  # (n, S)


def rollout_map(holder, run: AttentionRun, step_idx: int, chunk: int = 256) -> np.ndarray:
    """Attention rollout of generated token `step_idx` onto the image grid: (grid_h, grid_w) float32."""
    inputs = holder.replay_inputs(run, step_idx)
    with torch.inference_mode(), recording(holder.model, _DecoderQK()) as recorder:
        holder.model(**inputs)
    recorded = recorder.layers
    seq = inputs["input_ids"].shape[1]
    relevance = torch.zeros(seq)
    relevance[seq - 1] = 1.0  # the row that produced the token
    for layer_idx in reversed(range(len(decoder_layers(holder.model)))):
        query, key, scale, mask, softcap = recorded.pop(layer_idx)  # free each layer once used
        mixed = 0.5 * relevance.clone()  # the identity's half
        for start in range(0, seq, chunk):
            rows = slice(start, min(start + chunk, seq))
            mixed += 0.5 * relevance[rows] @ _mean_attention_rows(query, key, scale, rows, mask, softcap)  # (S,)
        relevance = mixed
    return _grid(run, relevance)


def gradient_bytes_estimate(holder, seq_len: int) -> int:
    """Rough memory of a gradient pass: attention weights and their gradients in float32, all layers."""
    config = holder.model.config.get_text_config()
    return 3 * holder.num_layers * int(config.num_attention_heads) * seq_len * seq_len * 4


def gradient_map(holder, run: AttentionRun, step_idx: int, max_mb: float | None = None) -> np.ndarray:
    """Gradient-weighted attention relevance (Chefer et al.) of token `step_idx` on the image grid."""
    inputs = holder.replay_inputs(run, step_idx)
    seq = inputs["input_ids"].shape[1]
    if max_mb is not None and gradient_bytes_estimate(holder, seq) > max_mb * 2**20:
        raise MemoryError(
            f"Gradient-weighted attention over {seq} tokens needs about "
            f"{gradient_bytes_estimate(holder, seq) / 2**20:.0f} MB, more than the {max_mb:.0f} MB "
            "allowed. Lower the image-token budget (max pixels) or use raw attention or rollout."
        )
    weights: list[torch.Tensor] = []

    def keep(module, args, output):
        output[1].retain_grad()
        weights.append(output[1])

    hooks = [(layer.self_attn, keep) for layer in decoder_layers(holder.model)]
    try:
        with torch.enable_grad(), recording(holder.model, text="eager", hooks=hooks):
            logits = holder.model(**inputs).logits  # (1, S, vocab)
            logits[0, -1, run.generated_ids[step_idx]].backward()
    finally:
        holder.model.zero_grad(set_to_none=True)
    relevance = torch.eye(seq)  # R = I
    for attn in weights:  # in layer order
        cam = (attn.grad[0] * attn[0]).clamp(min=0).mean(dim=0).detach().float().cpu()  # (S, S)
        relevance = relevance + cam @ relevance
    return _grid(run, relevance[seq - 1])


class _VisionQK:
    """Keeps every vision-tower attention call's (module id, queries, keys, scale), in call order."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def on_attention(self, module, query, key, attention_mask, scaling, kwargs) -> None:
        self.calls.append((id(module), query[0].detach().cpu(), key[0].detach().cpu(), scaling))  # (H, n, D)


def _vision_attention_rows(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged, non-causal softmax attention of one chunk: (n, n) float32."""
    scores = torch.matmul(query.float(), key.float().transpose(1, 2)) * scale  # (H, n, n)
    return torch.softmax(scores, dim=-1).mean(dim=0)


def _record_vision_tower(holder, inputs) -> dict[int, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Run the vision tower once; per block index, its calls' (query, key, scale) in order."""
    blocks = vision_encoder_blocks(holder.model)
    block_of = {id(getattr(block, "attn", None) or block.self_attn): idx for idx, block in enumerate(blocks)}
    on_model = holder.on_model(inputs)
    with (
        torch.inference_mode(),
        recording(holder.model, _VisionQK(), text=None, vision=RECORD_IMPLEMENTATION) as recorder,
    ):
        run_vision_tower(holder.model, on_model)
    per_block: dict[int, list] = {}
    for module_id, query, key, scale in recorder.calls:
        per_block.setdefault(block_of[module_id], []).append((query, key, scale))
    return per_block


def _propagate(relevance: torch.Tensor, per_block: dict, blocks: list[int]) -> torch.Tensor:
    """relevance (n,) over a block's outputs → over the first block's inputs, through 0.5 A + 0.5 I per block."""
    for block in reversed(blocks):
        mixed, start = 0.5 * relevance.clone(), 0
        for query, key, scale in per_block[block]:  # chunks tile the sequence in order
            n = query.shape[1]
            mixed[start : start + n] += 0.5 * relevance[start : start + n] @ _vision_attention_rows(query, key, scale)
            start += n
        relevance = mixed
    return relevance


def vit_combined_map(holder, run: AttentionRun, heat: np.ndarray) -> np.ndarray:
    """A decoder map pushed back through the vision encoder's own attention (rollout over its blocks).

    heat: (grid_h, grid_w) decoder attention on the image's tokens. Returns a map over the encoder's
    patches: (2 * grid_h, 2 * grid_w) for Qwen (each merged token splits into its 2×2 patches, with
    Qwen2.5-VL's window order undone), (grid_h, grid_w) for LLaVA (rollout up to the feature layer).
    Qwen3-VL's deepstack shortcuts from inner blocks to the decoder are not followed. The family's
    merge size, prefix tokens, window order and feature block come from `families`.
    """
    return vit_combined_maps(holder, run, [heat])[0]


def vit_combined_maps(holder, run: AttentionRun, heats: list[np.ndarray]) -> list[np.ndarray]:
    """`vit_combined_map` for several decoder maps of the same image, with one vision-tower pass."""
    if not supports_vit_map(holder.family, holder.model.config):
        raise InputError(
            f"The ViT-combined map is not available for {holder.family} checkpoints (their vision "
            "tower merges patches in a way this map does not follow yet); use raw attention, "
            "rollout or the gradient map."
        )
    inputs = holder.replay_inputs(run, 0)
    per_block = _record_vision_tower(holder, inputs)
    return [_through_vision(holder, run, inputs, per_block, heat) for heat in heats]


def _through_vision(holder, run: AttentionRun, inputs, per_block: dict, heat: np.ndarray) -> np.ndarray:
    weights = torch.from_numpy(np.asarray(heat, dtype=np.float32)).flatten()  # (n_cells,)
    merge, prefix = vision_merge_size(holder.model), vision_prefix_tokens(holder.model)
    unit = merge * merge
    window_index = vision_window_order(holder.model, inputs, len(weights))  # block position k holds unit k's
    relevance = torch.cat(
        [
            torch.zeros(prefix),  # e.g. CLIP's CLS: no decoder weight
            (weights[window_index] / unit).repeat_interleave(unit),
        ]
    )  # (prefix + n_patches,)
    last = feature_block(holder.model, len(per_block))  # the block whose output is the feature
    relevance = _propagate(relevance, per_block, list(range(last + 1)))[prefix:]  # (n_patches,) block order
    patches = torch.empty_like(relevance)
    patches.view(-1, unit)[window_index] = relevance.view(-1, unit)  # back to the original unit order
    grid_h, grid_w = run.vision.grid_hw
    cells = patches.view(grid_h, grid_w, merge, merge)  # unit (R, C), sub-patch (r, c)
    return cells.permute(0, 2, 1, 3).reshape(grid_h * merge, grid_w * merge).numpy()
