"""Logit lens over image patches: what each vision token's hidden state would predict, layer by layer.

A teacher-forced forward over the prompt records every decoder layer's output at the vision
positions (forward hooks, installed through `attention_extractor.recording`; pre-norm), then
decodes each through the final norm and `lm_head` once.
`pictures.report.lens_html` draws the result as a self-contained, interactive HTML page.
"""

from __future__ import annotations

import torch

from attention_extractor import recording
from families import decoder_layers, final_norm, vision_layout
from records import LogitLens
from utils import load_image


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # (B, S, hidden)


def logit_lens(
    holder,
    image,
    prompt: str,
    top_k: int = 5,
    chunk: int = 256,
    track_ids: list[int] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> LogitLens:
    """Decode every decoder layer's hidden state at the image's vision tokens (first image).

    track_ids: token ids whose probability to keep at every layer and cell (`LogitLens.tracked`).
    min_pixels / max_pixels: the image-token budget; pass a run's own (`run.settings`) so the lens
        covers the same token grid as the run's maps.
    """
    image = load_image(image)
    inputs = holder.build_inputs(image, prompt, min_pixels, max_pixels)
    layout = vision_layout(holder.family, holder.model.config, holder.processor, inputs, image.size)
    return _lens(holder, holder.on_model(inputs), layout, top_k, chunk, track_ids)


def run_logit_lens(holder, run, top_k: int = 5, chunk: int = 256, track_ids: list[int] | None = None) -> LogitLens:
    """`logit_lens` of a run's first image and prompt, replayed with the run's own pixel budget, so
    the lens covers exactly the token grid of the run's maps."""
    return _lens(holder, holder.replay_inputs(run, 0), run.vision, top_k, chunk, track_ids)


def _lens(holder, inputs, layout, top_k: int, chunk: int, track_ids: list[int] | None) -> LogitLens:
    positions = torch.from_numpy(layout.token_positions)  # (n_cells,)
    layers = decoder_layers(holder.model)
    states: dict[int, torch.Tensor] = {}

    def keep(idx):
        def hook(module, args, output):
            states[idx] = _layer_output(output)[0, positions.to(_layer_output(output).device)].detach()

        return hook

    hooks = [(layer, keep(i)) for i, layer in enumerate(layers)]
    with recording(holder.model, text=None, hooks=hooks), torch.inference_mode():  # hooks removed in finally
        holder.model(**inputs)
    norm, head = final_norm(holder.model), holder.model.get_output_embeddings()
    top_ids, top_probs, tracked = [], [], []
    with torch.inference_mode():
        for idx in range(len(layers)):
            ids, probs, kept = [], [], []
            for start in range(0, len(positions), chunk):  # bounded (chunk, vocab) logits
                distribution = torch.softmax(head(norm(states[idx][start : start + chunk])).float(), dim=-1)
                best = distribution.topk(top_k, dim=-1)  # (c, k)
                ids.append(best.indices.cpu())
                probs.append(best.values.cpu())
                kept.append(distribution[:, list(track_ids or [])].cpu())  # (c, n_tracked)
            top_ids.append(torch.cat(ids))
            top_probs.append(torch.cat(probs))
            tracked.append(torch.cat(kept))
    top_ids = torch.stack(top_ids).numpy()  # (L, n_cells, k)
    decode = _decoder(holder.processor.tokenizer)
    tokens = [[[decode(int(i)) for i in cell] for cell in layer] for layer in top_ids]
    return LogitLens(
        list(range(len(layers))),
        top_ids,
        torch.stack(top_probs).numpy(),
        tokens,
        layout.grid_hw,
        layout.image_box_xyxy,
        torch.stack(tracked).numpy() if track_ids else None,
    )


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return decode
