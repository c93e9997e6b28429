"""Synthetic shapes data for the demo model: images, one-word questions and the target box.

Each image holds 2 to 4 non-overlapping shapes, each in a different named colour, on a plain
light background. Every question is about one object whose attribute is unique in the image,
and its answer is one word; `Sample.box_xyxy` is that object's box in pixels of the image,
which is the ground truth for the localization benchmark. Same seed, same samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "where")

# (width, height); all multiples of 28 so the Qwen processor keeps them as they are.
DEFAULT_SIZE = (224, 224)
OTHER_SIZES = ((280, 196), (196, 308), (308, 224), (252, 252), (224, 168))
P_DEFAULT_SIZE = 0.7

TOKEN_PX = 28  # one Qwen2-VL vision token after the 2x2 merge
MIN_OBJECT_PX = 48  # about 1.7 tokens across
MAX_OBJECT_PX = 80
WHERE_MARGIN = 0.12  # "where" is asked only if the centre is >= 12% of the width off the middle


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; `box_xyxy` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    shape: str
    color: str
    box_xyxy: tuple[int, int, int, int]

    @property
    def center_xy(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box_xyxy
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Sample:
    """An image, a question with a one-word answer, and the box of the object the answer is about."""

    image: Image.Image
    question: str
    answer: str
    box_xyxy: tuple[int, int, int, int]
    objects: list[ShapeObject] = field(default_factory=list)
    question_type: str = "color"


def pick_size(rng: random.Random) -> tuple[int, int]:
    """Image (width, height): mostly 224x224, sometimes another aspect ratio."""
    return DEFAULT_SIZE if rng.random() < P_DEFAULT_SIZE else rng.choice(OTHER_SIZES)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    x0, y0, x1, y1 = obj.box_xyxy
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":  # apex up, base at the bottom of the box
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def _place_objects(rng: random.Random, width: int, height: int, n: int) -> list[ShapeObject]:
    """Random non-overlapping boxes (with a 6 px gap), distinct colours, random shapes."""
    colors = rng.sample(list(COLORS), n)
    boxes: list[tuple[int, int, int, int]] = []
    max_px = min(MAX_OBJECT_PX, min(width, height) // 2)
    for _ in range(200 * n):
        if len(boxes) == n:
            break
        side = rng.randint(MIN_OBJECT_PX, max_px)
        x0, y0 = rng.randint(4, width - side - 4), rng.randint(4, height - side - 4)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + 6 <= b[0] or b[2] + 6 <= box[0] or box[3] + 6 <= b[1] or b[3] + 6 <= box[1] for b in boxes):
            boxes.append(box)
    return [ShapeObject(rng.choice(SHAPES), c, b) for c, b in zip(colors, boxes, strict=False)]


def render(objects: list[ShapeObject], size: tuple[int, int], background: tuple[int, int, int]) -> Image.Image:
    """Draw `objects` on a plain background; size is (width, height)."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj)
    return image


def _where(obj: ShapeObject, width: int) -> str | None:
    offset = obj.center_xy[0] / width - 0.5
    if abs(offset) < WHERE_MARGIN:
        return None  # too close to the middle to be unambiguous
    return "left" if offset < 0 else "right"


def _questions(objects: list[ShapeObject], width: int, qtype: str) -> list[tuple[str, str, ShapeObject]]:
    """All (question, answer, target) of one type whose target is unambiguous in the image."""
    out = []
    for obj in objects:
        unique_shape = sum(o.shape == obj.shape for o in objects) == 1
        if qtype == "color" and unique_shape:
            out.append((f"What color is the {obj.shape}?", obj.color, obj))
        elif qtype == "shape":  # colours are always distinct
            out.append((f"What shape is {obj.color}?", obj.shape, obj))
        elif qtype == "where" and (pos := _where(obj, width)) is not None:
            out.append((f"Where is the {obj.color} {obj.shape}?", pos, obj))
    return out


def make_sample(
    rng: random.Random,
    size: tuple[int, int] | None = None,
    n_objects: int | None = None,
    question_type: str | None = None,
) -> Sample:
    """One sample drawn from `rng`; size is (width, height), default `pick_size(rng)`.

    `n_objects` (1-4, default 2-4) and `question_type` ("color", "shape", "where") can be forced,
    e.g. for a curriculum; if the forced type has no unambiguous question the layout is redrawn.
    """
    width, height = size if size is not None else pick_size(rng)
    if min(width, height) < 2 * MIN_OBJECT_PX:
        raise ValueError(f"image {width}x{height} is too small; both sides must be >= {2 * MIN_OBJECT_PX} px")
    qtype = question_type or rng.choice(QUESTION_TYPES)
    for _ in range(100):
        n = n_objects if n_objects is not None else rng.randint(2, 4)
        objects = _place_objects(rng, width, height, n)
        if len(objects) < min(n, 2):
            continue  # could not fit them; draw a new layout
        candidates = _questions(objects, width, qtype)
        if not candidates:
            continue
        question, answer, target = rng.choice(candidates)
        background = tuple(rng.randint(225, 250) for _ in range(3))
        image = render(objects, (width, height), background)
        return Sample(image, question, answer, target.box_xyxy, objects, qtype)
    raise RuntimeError(f"no valid {qtype} question for {width}x{height} after 100 layouts")


def make_samples(seed: int, n: int, **kwargs) -> list[Sample]:
    """`n` reproducible samples from `random.Random(seed)`."""
    rng = random.Random(seed)
    return [make_sample(rng, **kwargs) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every lower-case word a question or answer can contain (for a word-level tokenizer)."""
    words = {"what", "color", "is", "the", "shape", "where", "?"}
    return sorted(words | set(COLORS) | set(SHAPES) | set(POSITIONS))


QUESTION_FORMS: tuple[str, ...] = (
    "What color is the <shape>?",
    "What shape is <color>?",
    "Where is the <color> <shape>?",
)


def guide() -> str:
    """What the demo model understands, in Markdown: its question forms and every word it knows."""
    return (
        f"**The demo model** answers three question forms: {', '.join(f'`{q}`' for q in QUESTION_FORMS)} "
        f"with one word. Shapes: {', '.join(SHAPES)}; colours: {', '.join(COLORS)}; answers for where: "
        f"{', '.join(POSITIONS)}. Any other word is unknown to it."
    )


def box_area_fraction(box_xyxy: tuple[int, int, int, int], width: int, height: int) -> float:
    """Share of the image covered by a box, in [0, 1]."""
    x0, y0, x1, y1 = box_xyxy
    return max(0, x1 - x0) * max(0, y1 - y0) / (width * height)


def write_examples(out_dir: str, seed: int = 7, n: int = 6) -> None:
    """PNG examples for the app, one per sample, and `examples.json` as [[file, question, answer], ...]."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng, rows = random.Random(seed), []
    for i in range(n):
        size = DEFAULT_SIZE if i < n - 2 else OTHER_SIZES[i % 2]  # the last two are not square
        sample = make_sample(rng, size=size, question_type=QUESTION_TYPES[i % len(QUESTION_TYPES)])
        name = f"shapes_{i}.png"
        sample.image.save(out / name)
        rows.append([name, sample.question, sample.answer])
    (out / "examples.json").write_text("[\n" + ",\n".join(" " + json.dumps(r) for r in rows) + "\n]\n")


def write_imagefolder(folder: str, seed: int, n: int) -> None:
    """`n` samples of `seed` as one split of a Hugging Face imagefolder, a study's manifest: PNGs and
    `metadata.jsonl` rows with `file_name`, `prompt`, `answer` and `boxes` (the target object's box)."""
    import json
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, sample in enumerate(make_samples(seed, n)):
        name = f"{seed}_{k:04d}.png"
        sample.image.save(out / name)
        rows.append(
            {
                "file_name": name,
                "prompt": sample.question,
                "answer": sample.answer,
                "boxes": [list(sample.box_xyxy)],
                "question_type": sample.question_type,
            }
        )
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--examples":
        write_examples(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "--imagefolder":  # --imagefolder DIR SEED N
        write_imagefolder(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        sys.exit(0)
    for s in make_samples(0, 5):
        print(s.image.size, s.question, "->", s.answer, s.box_xyxy, len(s.objects))
