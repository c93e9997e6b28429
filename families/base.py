"""What every family adapter shares: finding the vision tokens and checking their count."""

from __future__ import annotations

import numpy as np
import torch


def token_positions(inputs, token_id: int) -> np.ndarray:
    """(n,) int64: sequence positions of `token_id` in the inputs' one prompt (batch of 1)."""
    return torch.nonzero(inputs["input_ids"][0] == token_id).flatten().cpu().numpy().astype(np.int64)


def whole_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box of a whole (W, H) image: a grid resized over it with no crop and no padding."""
    return 0.0, 0.0, float(size[0]), float(size[1])


def check_count(found: int, needed: list[int], token_id: int, num_inputs: int, what: str = "image") -> None:
    """Refuse a prompt whose vision tokens do not match the grids worked out from the processor
    (`needed`: the token count of each input's grids; one entry per image, or per video)."""
    if len(needed) != num_inputs or found != sum(needed):
        raise ValueError(
            f"Found {found} {what} tokens (id {token_id}) in the prompt for {num_inputs} {what}(s), but their "
            f"grids need {' + '.join(map(str, needed)) or 0}. Give one {what} entry in the prompt per input and "
            "use the processor that belongs to this checkpoint.")


def split_per_input(positions: np.ndarray, needed: list[int], token_id: int, num_inputs: int,
                    what: str = "image") -> list[np.ndarray]:
    """The vision positions cut into each input's own run, in prompt order, after `check_count`."""
    check_count(len(positions), needed, token_id, num_inputs, what)
    return np.split(positions, np.cumsum(needed)[:-1])


def no_video(family: str, video: bool) -> None:
    if video:
        raise ValueError("This tool maps video for the Qwen families, GLM-4.1V, InternVL, LLaVA-OneVision and "
                         f"SmolVLM, not {family}; give images instead.")


def scale_box(box, from_size: tuple[float, float], to_size: tuple[float, float]) -> tuple[float, float, float, float]:
    """A box in the pixels of an image of `from_size` (W, H), in the pixels of the same image at `to_size`."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy
