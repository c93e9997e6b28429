"""Token Activation Map (TAM; Li et al., ICCV 2025): a last-layer logit map with the context removed.

For a token c (generated, or a prompt token after the image):
1. **Raw map.** m = max(0, logit of c) at every image position, from the decoder's last hidden state
   through the final norm and the output head (the model's own logits, its soft-capping included).
2. **Context-interference removal.** Each earlier text token j (the prompt's text after the image and
   the answer before c, special tokens left out, and tokens whose text equals c's) has its own raw map
   m_j, for its own id. Its weight is its text score for c: max(0, logit of c at the position whose
   prediction was j), normalised over the earlier tokens to sum 1. The interference map is
   I = Σ_j w_j m_j; the least-squares scale α = <m, I> / <I, I> (0 when I is all zero); and
   m' = max(0, m - α I).
3. **Rank Gaussian filter** over the token grid (`rank_gaussian_filter`).

The reference code takes the text score of a prompt token at its own position and that of an answer
token at the position that predicted it; here every earlier token is scored at the position that
predicted it, so prompt and answer tokens are treated alike. One teacher-forced forward over the prompt
and the answer gives every token's map: the logits are computed for the ids that occur only, never
over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attention_extractor import recording
from families import final_norm


@dataclass(frozen=True)
class TamMap:
    """One token's TAM: `heat` (grid_h, grid_w) float32, the filtered map; `logit` the raw clipped logit
    map; `interference` the map subtracted (α I, before clipping); `alpha`; `context` how many earlier
    text tokens were weighed."""

    heat: np.ndarray
    logit: np.ndarray
    interference: np.ndarray
    alpha: float
    context: int


def rank_gaussian_filter(grid: np.ndarray, size: int = 3) -> np.ndarray:
    """TAM's rank Gaussian filter of a (h, w) map: each size × size window (reflect padding) is sorted;
    σ = std / mean of the window; weights exp(-k² / 2σ²) over the rank offsets k = -(n//2) … n//2
    (n = size²), normalised; the output is Σ sorted × weights, and 0 where the window mean is ≤ 0.
    A constant positive window (σ = 0) gives its value, the limit of the weights as σ → 0."""
    grid = np.asarray(grid, dtype=np.float64)
    pad = size // 2
    padded = np.pad(grid, pad, mode="reflect")  # a one-cell-wide axis repeats its value
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size)).reshape(*grid.shape, size * size)
    ordered = np.sort(windows, axis=-1)  # (h, w, n)
    mean = ordered.mean(axis=-1, keepdims=True)
    positive = mean[..., 0] > 0
    sigma = np.divide(ordered.std(axis=-1, keepdims=True), mean, out=np.zeros_like(mean), where=mean > 0)
    offsets = np.arange(size * size) - (size * size) // 2  # (n,)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.exp(-(offsets**2) / (2 * sigma**2))  # (h, w, n); σ = 0: only the middle rank survives
    weights = np.where(sigma > 0, weights, (offsets == 0).astype(np.float64))
    weights /= weights.sum(axis=-1, keepdims=True)
    out = (ordered * weights).sum(axis=-1)
    return np.where(positive, out, 0.0).astype(np.float32)


def remove_interference(m: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(m', α I, α) for a raw map m (N,), the earlier tokens' raw maps (n, N) and their text scores (n,):
    weights w = max(0, scores) / (Σ + 1e-8), I = w @ maps, α = <m, I> / <I, I> (0 when I = 0),
    m' = max(0, m - α I)."""
    m = np.asarray(m, dtype=np.float64)
    if len(scores) == 0:
        return m.copy(), np.zeros_like(m), 0.0
    w = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    w = w / (w.sum() + 1e-8)
    interference = w @ np.asarray(maps, dtype=np.float64)  # (N,)
    norm = float(interference @ interference)
    alpha = float(m @ interference) / norm if norm > 0 else 0.0
    return np.clip(m - alpha * interference, 0.0, None), alpha * interference, alpha


def _final_states(holder, run) -> torch.Tensor:
    """(S, hidden) the final norm's output over the prompt and every generated token but the last."""
    states: list[torch.Tensor] = []

    def keep(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    inputs = holder.replay_inputs(run, max(run.num_steps - 1, 0))
    with recording(holder.model, text=None, hooks=[(final_norm(holder.model), keep)]), torch.inference_mode():
        holder.model(**inputs)
    return states[-1]


def class_logits(holder, states: torch.Tensor, ids: Sequence[int]) -> np.ndarray:
    """(S, len(ids)) float32: the model's logits for `ids` at every position of `states` (S, hidden),
    with the output head's bias and the model's final soft-capping, as its own logits have them."""
    head = holder.model.get_output_embeddings()
    index = torch.tensor(list(ids), dtype=torch.long, device=head.weight.device)
    with torch.inference_mode():
        bias = head.bias[index] if getattr(head, "bias", None) is not None else None
        logits = torch.nn.functional.linear(states.to(head.weight.dtype), head.weight[index], bias).float()
        cap = getattr(holder.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits.cpu().numpy()


def _after_image(run) -> int:
    """The first sequence position after the run's last image token."""
    return max(int(layout.token_positions.max()) for layout in run.visions) + 1


def text_positions(run, special_ids: set[int]) -> list[int]:
    """Sequence positions of the text TAM weighs as context: the prompt after its last image token, then
    the answer; special tokens left out."""
    ids = [*run.prompt_ids, *run.generated_ids]
    return [pos for pos in range(_after_image(run), len(ids)) if ids[pos] not in special_ids]


def tam_maps(holder, run, steps: Sequence[int] = (), prompt_positions: Sequence[int] = ()) -> list[TamMap]:
    """The TAM of generated tokens `steps` (0-based), then of the prompt tokens at `prompt_positions`
    (sequence positions after the image), on the run's token grid (`run.vision`). One model pass; the
    caller holds the model lock."""
    prompt_len, ids = len(run.prompt_ids), [*run.prompt_ids, *run.generated_ids]
    targets = [prompt_len + int(t) for t in steps] + [int(p) for p in prompt_positions]
    start = _after_image(run)
    for pos in targets:
        if not start <= pos < len(ids):
            raise ValueError(f"TAM maps tokens after the image (positions {start}..{len(ids) - 1}); got {pos}.")
    tokenizer = holder.processor.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    context = text_positions(run, special)
    classes = sorted({ids[pos] for pos in [*targets, *context]})
    column = {token_id: k for k, token_id in enumerate(classes)}
    logits = class_logits(holder, _final_states(holder, run), classes)  # (S', n_classes), S' ≥ positions used
    layout = run.vision
    image = np.clip(logits[layout.token_positions], 0.0, None)  # (N, n_classes): every class's raw map
    pieces = {token_id: tokenizer.decode([token_id]) for token_id in classes}
    out = []
    for pos in targets:
        c = column[ids[pos]]
        earlier = [j for j in context if j < pos and pieces[ids[j]] != pieces[ids[pos]]]
        maps = image[:, [column[ids[j]] for j in earlier]].T  # (n, N)
        scores = logits[[j - 1 for j in earlier], c] if earlier else np.zeros(0)
        kept, removed, alpha = remove_interference(image[:, c], maps, scores)
        grid = layout.grid_hw
        out.append(
            TamMap(
                rank_gaussian_filter(kept.reshape(grid)),
                image[:, c].reshape(grid).astype(np.float32),
                removed.reshape(grid).astype(np.float32),
                alpha,
                len(earlier),
            )
        )
    return out
