"""Load a vision-language model with its processor, and generate with attention capture.

`ModelHolder.load` accepts a hub id or a local folder of any supported family and returns a
holder whose `generate` gives one `AttentionRun` per call: tokens, vision layout and attention.
"""

from __future__ import annotations

import gc
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import DynamicCache

from attention_extractor import CaptureMethod, capture_attention, estimate_capture_bytes
from attention_store import StoreDevice, StoreKind
from causal.knockout import Knockout, knockout
from causal.patching import Patch, patch
from causal.positions import QueryKind
from causal.sweep import KnockoutSweep, knockout_sweep
from errors import CaptureTooLargeError, GenerationOutOfMemoryError, ImageLoadError, InputError
from families import (
    SUPPORTED_FAMILIES,
    attention_windows,
    decoder_layers,
    pixel_budget,
    prefix_lm,
    processor_options,
    softmax_layers,
    supports_video,
    video_families,
    vision_layouts,
)
from loading import load_checkpoint
from records import AttentionRun, GenerationSettings, VisionLayout, segment_positions
from utils import load_image, load_video, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def _token_piece(tokenizer, token_id: int) -> str:
    """The text of one token; the raw vocabulary entry when it is only part of a UTF-8 character."""
    text = tokenizer.decode([token_id])
    return str(tokenizer.convert_ids_to_tokens(token_id)) if "\ufffd" in text else text


PromptRows = Literal["question", "all", "none"]


def prompt_query_positions(prompt_ids: list[int], layouts: list[VisionLayout], which: str) -> list[int]:
    """Text positions of the prompt whose attention rows to keep (the last one is step 0 anyway)."""
    if which not in ("question", "all", "none"):
        raise ValueError(f"prompt_rows must be 'question', 'all' or 'none', got {which!r}.")
    if which == "none":
        return []
    vision = {int(pos) for layout in layouts for pos in layout.token_positions}
    start = max(vision) + 1 if which == "question" else 0
    return [pos for pos in range(start, len(prompt_ids) - 1) if pos not in vision]


def _token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """`_token_piece` for many ids, decoding each distinct id once (images repeat one id many times)."""
    pieces = {token_id: _token_piece(tokenizer, token_id) for token_id in set(token_ids)}
    return [pieces[token_id] for token_id in token_ids]


@dataclass
class ModelHolder:
    """A loaded model and processor. Read-only once loaded; share it between users behind a lock."""

    model: torch.nn.Module
    processor: object
    family: str
    model_id: str
    device: str
    dtype: torch.dtype
    max_pixels_cap: int | None = None  # largest image-token budget (pixels) a request may ask for

    @classmethod
    def load(
        cls,
        model_id: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        max_pixels_cap: int | None = None,
    ) -> ModelHolder:
        """Load a checkpoint of a supported family (see `families.SUPPORTED_FAMILIES`).

        device: 'auto' (CUDA when available, else CPU), 'cuda' or 'cpu'.
        dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16' or 'float32'.
        A checkpoint whose processor is missing or whose weights do not cover its config is refused
        with ModelLoadError before any weights are allocated (for a local folder) or after loading.
        """
        model_id = str(model_id)
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        model, processor, family = load_checkpoint(model_id, device, torch_dtype, trust_remote_code)
        logger.info("loaded %s (%s) on %s as %s", model_id, SUPPORTED_FAMILIES[family], device, torch_dtype)
        return cls(model, processor, family, model_id, device, torch_dtype, max_pixels_cap)

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def num_heads(self) -> int:
        return int(self.model.config.get_text_config().num_attention_heads)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def takes_video(self) -> bool:
        """Whether this checkpoint takes a video: a family whose video this tool maps, with a chat template
        that has a video part."""
        return supports_video(self.family) and "video" in str(getattr(self.processor, "chat_template", "") or "")

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` the tokenizer can only read as its unknown token (word-level vocabularies,
        such as the demo model's); empty for byte-level tokenizers, which know every string."""
        tokenizer = self.processor.tokenizer
        unk = tokenizer.unk_token_id
        if unk is None:
            return []
        words = []
        for word in prompt.split():
            shown = word.strip(".,;:!?\"'") or word
            if unk in tokenizer(word, add_special_tokens=False)["input_ids"] and shown not in words:
                words.append(shown)
        return words

    def knockout(
        self,
        run: AttentionRun,
        step_idx: int,
        *,
        key_positions: list[int] | None = None,
        box: tuple[float, float, float, float] | None = None,
        queries: QueryKind = "token",
        layers: tuple[int, int] | None = None,
        heads: list[int] | tuple[int, int] | None = None,
        ablate_heads: list[tuple[int, int]] | None = None,
        mode: str = "zero",
    ) -> Knockout:
        """How generated token `step_idx`'s probability changes when attention edges are blocked and/or
        heads ablated, teacher-forced over the run (see `causal.knockout.knockout` for every option)."""
        options = dict(key_positions=key_positions, box=box, queries=queries, layers=layers, heads=heads)
        return knockout(self, run, step_idx, **options, ablate_heads=ablate_heads, mode=mode)

    def knockout_sweep(self, run: AttentionRun, step_idx: int, box, window: int = 9, **options) -> KnockoutSweep:
        """The box's effect per window of layers, with a random-region control (`causal.sweep`)."""
        return knockout_sweep(self, run, step_idx, box, window, **options)

    def patch(self, run: AttentionRun, other_image, layers=None, positions="image", step_idx: int = 0) -> Patch:
        """Activation patching from another image at the image positions (`causal.patching.patch`)."""
        return patch(self, run, other_image, layers, positions, step_idx)

    def describe(self) -> str:
        """One line for status bars: family, sizes, device and dtype."""
        dtype = str(self.dtype).replace("torch.", "")
        return (
            f"{self.model_id} · {SUPPORTED_FAMILIES[self.family]} · {self.num_layers} layers × "
            f"{self.num_heads} heads · {self.device} · {dtype}"
        )

    def build_inputs(
        self,
        image: Image.Image | list[Image.Image] | None,
        prompt: str,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video: list[Image.Image] | None = None,
    ):
        """Chat-templated, processed model inputs for one user message with its images or video (batch of 1)."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        parts = [{"type": "image"}] * len(images) + ([{"type": "video"}] if video else [])
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None) or not prefix_lm(self.family):
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # PaliGemma: no chat template; the processor expands <image>, adds BOS
            text = "<image>" * len(images) + prompt
        kwargs = processor_options(self.family, self.processor)
        size = pixel_budget(self.family, self.processor.image_processor, min_pixels, max_pixels, self.max_pixels_cap)
        if size is not None:
            kwargs["size"] = size
        media = {"images": images} if images else {}
        if video:
            media["videos"] = [video]
            kwargs["do_sample_frames"] = False  # load_video chose the frames already
        try:
            inputs = self.processor(text=[text], return_tensors="pt", **media, **kwargs)
            inputs.pop("labels", None)  # PaliGemma's processor adds training labels; never wanted here
            return inputs
        except ValueError as err:
            sizes = ", ".join(f"{im.size[0]}x{im.size[1]}" for im in images + (video or [])[:1])
            hint = (
                "Crop it to a less extreme aspect ratio or resize it"
                if "aspect ratio" in str(err)
                else "Check that this checkpoint's processor takes this kind of input (images, video)"
            )
            raise InputError(
                f"The processor could not prepare the input ({sizes}): {err} {hint}, then try again."
            ) from err

    def on_model(self, inputs):
        """Processor outputs moved to the model's input device, pixels in the model's dtype."""
        inputs = inputs.to(self.input_device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.dtype)
        return inputs

    def teacher_forced_inputs(
        self, image, prompt: str, continuation: list[int], min_pixels: int | None = None, max_pixels: int | None = None
    ):
        """Model inputs, on the model's device, for prompt + `continuation` ids in one forward, batch of 1.

        The logits at position len(prompt) - 1 + t are then those that chose continuation[t].
        """
        inputs = self.build_inputs(image, prompt, min_pixels, max_pixels)
        extra = torch.tensor([continuation], dtype=torch.long)  # (1, len(continuation))
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:  # text tokens are type 0
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
        if prefix_lm(self.family) and "token_type_ids" in inputs:  # generated tokens: the suffix
            inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(extra)], dim=1)
        return self.on_model(inputs)

    def replay_inputs(self, run: AttentionRun, step_idx: int, images: list[Image.Image] | None = None):
        """Teacher-forced inputs that replay `run` up to generated token `step_idx`: its images, prompt
        and image-token budget, then the tokens generated before it; the last position's logits chose it.

        images: other pictures in place of the run's own (same sizes; e.g. with regions blurred).
        Every pass that replays a run builds its inputs here.
        """
        if not run.images:
            raise InputError(
                "This pass replays the run's image, and this run has none (a video, or a run "
                "made elsewhere). Generate from an image first."
            )
        images = run.images if images is None else images
        if [im.size for im in images] != [im.size for im in run.images]:
            raise ValueError("Replacement images must have the sizes of the run's own images.")
        settings = run.settings
        return self.teacher_forced_inputs(
            images, settings.prompt, run.generated_ids[:step_idx], settings.min_pixels, settings.max_pixels
        )

    def _check_budget(
        self,
        prompt_len: int,
        max_new_tokens: int,
        num_layers: int,
        max_capture_mb: float | None,
        num_prompt_rows: int = 0,
        store: StoreKind = "auto",
    ) -> None:
        """Refuse up front what would overflow the model's context or the capture's memory."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if context and prompt_len + max_new_tokens > context:
            raise InputError(
                f"The image and prompt take {prompt_len} tokens; with {max_new_tokens} new tokens "
                f"that exceeds the model's context of {context}. Shorten the prompt, lower the "
                "image-token budget (max pixels) or generate fewer tokens."
            )
        estimate = estimate_capture_bytes(self.model, num_layers, prompt_len, max_new_tokens, num_prompt_rows, store)
        if max_capture_mb is not None and estimate > max_capture_mb * 2**20:
            raise CaptureTooLargeError(
                f"Capturing {max_new_tokens} tokens over {num_layers} layers for a {prompt_len}-token prompt "
                f"could take {estimate / 2**20:.0f} MB, more than the {max_capture_mb:.0f} MB allowed. Capture "
                "fewer layers, generate fewer tokens, or lower the image-token budget (max pixels)."
            )

    def _generate_with_capture(
        self,
        inputs,
        max_new_tokens: int,
        method: CaptureMethod,
        capture_layers: list[int] | None,
        prompt_positions: list[int],
        layouts: list[VisionLayout],
        store: StoreKind,
        generate_kwargs: dict,
        placement: dict | None = None,
    ):
        """(generated ids, attention store, recorder) after generation; out-of-memory frees what it took."""
        prompt_len = inputs["input_ids"].shape[1]
        if any(attention_windows(self.model.config, list(range(self.num_layers)))):
            # A sliding-window cache drops old keys, which the rows need; a full cache keeps them, and the
            # model's own sliding mask still limits what each layer sees (the rows apply that mask).
            generate_kwargs.setdefault("past_key_values", DynamicCache())
        try:
            with (
                torch.inference_mode(),
                capture_attention(self.model, method, capture_layers, prompt_positions) as recorder,
            ):
                output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            generated = output[0, prompt_len:].tolist()  # (num_steps,)
            with torch.inference_mode():
                attention = recorder.finish(
                    prompt_len, len(generated), segment_positions(layouts), store, **(placement or {})
                )
            return generated, attention, recorder
        except torch.OutOfMemoryError:
            recorder = output = None  # drop references before freeing
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise GenerationOutOfMemoryError(
                f"Out of {'GPU memory' if self.device.startswith('cuda') else 'memory'} while generating. Lower the "
                "image-token budget (max pixels), generate fewer tokens, or capture fewer layers, then try "
                "again."
            ) from None

    def _media(self, image, video) -> tuple[list[Image.Image], list[Image.Image] | None]:
        """Loaded images and video frames; exactly one of the two is given."""
        if video is not None:
            if image is not None:
                raise InputError("Give either images or a video, not both.")
            if not supports_video(self.family):
                raise InputError(
                    f"{SUPPORTED_FAMILIES[self.family]} takes images, not video. Video works with "
                    f"{', '.join(video_families())}; give images, or load one of those."
                )
            if not self.takes_video:
                raise InputError(
                    "This checkpoint's chat template has no video part, so it cannot be given a "
                    "video. Use images, or load a checkpoint whose template takes video."
                )
            return [], load_video(video)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ImageLoadError("No image given. Upload or pass at least one image.")
        return [load_image(im) for im in images], None

    def generate(
        self,
        image: Image.Image | str | Path | list | None,
        prompt: str,
        max_new_tokens: int = 64,
        method: CaptureMethod = "sdpa",
        capture_layers: list[int] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_capture_mb: float | None = None,
        prompt_rows: PromptRows = "question",
        video: str | Path | list | None = None,
        store: StoreKind = "auto",
        store_device: StoreDevice = "auto",
        store_budget_mb: float | None = None,
        **generate_kwargs,
    ) -> AttentionRun:
        """Generate an answer and capture, for every generated token, the attention that produced it.

        image: a PIL image or a file path (EXIF orientation applied, converted to RGB), or a list of
            them for several images in one prompt (run.visions has one layout per image).
        video: instead of images, a video file or a list of frames (`families.supports_video`); run.vision then
            has num_frames > 1 and token_heatmap returns one map per frame.
        method: 'sdpa' (fast capture, default) or 'eager' (reference).
        capture_layers: decoder layer indices to capture; all by default.
        min_pixels / max_pixels: Qwen's image-token budget, in pixels of the resized image.
        max_capture_mb: refuse up front (CaptureTooLargeError) when the capture could exceed this.
        prompt_rows: which prompt tokens' own attention to keep from prefill, so their maps can be
            shown too: 'question' (the text after the image), 'all' (every text token) or 'none'.
        store: how the attention is kept (see `attention_store`): 'auto' (whichever is smaller for
            this model and length), 'rows' (float16 rows) or 'qk' (queries and keys; rows on demand).
        store_device: where a 'qk' store is kept: 'auto' (on the GPU the model ran on while all such
            stores fit `store_budget_mb`, by default half the GPU memory free; else on the host), 'cpu'
            or 'cuda'. Rows are then computed there; `run.attention.placement` says where it is.
        generate_kwargs: passed on to `model.generate`; greedy decoding unless they say otherwise.
            One sequence only: beam search and several return sequences are refused.
        """
        images, frames = self._media(image, video)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("The prompt is empty. Type a question or instruction about the image.")
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}.")
        for option in ("num_beams", "num_return_sequences"):
            if generate_kwargs.get(option, 1) != 1:
                raise InputError(
                    f"{option}={generate_kwargs[option]} is not supported: the attention is captured "
                    "for one sequence. Use greedy decoding or sampling with one sequence."
                )
        inputs = self.build_inputs(images, prompt, min_pixels, max_pixels, video=frames)
        sizes = [im.size for im in images] or [frames[0].size]
        layouts = vision_layouts(self.family, self.model.config, self.processor, inputs, sizes, video=bool(frames))
        num_layers = len(set(capture_layers)) if capture_layers is not None else len(softmax_layers(self.model))
        # A prefix-LM prompt (PaliGemma) attends both ways, so a prompt token's row is not a causal row: none kept.
        positions = (
            []
            if prefix_lm(self.family)
            else prompt_query_positions(inputs["input_ids"][0].tolist(), layouts, prompt_rows)
        )
        self._check_budget(
            inputs["input_ids"].shape[1], max_new_tokens, num_layers, max_capture_mb, len(positions), store
        )
        inputs = self.on_model(inputs)
        generate_kwargs.setdefault("do_sample", False)
        generated, attention, recorder = self._generate_with_capture(
            inputs,
            max_new_tokens,
            method,
            capture_layers,
            positions,
            layouts,
            store,
            generate_kwargs,
            dict(store_device=store_device, store_budget_mb=store_budget_mb),
        )
        decoding = {k: v for k, v in generate_kwargs.items() if isinstance(v, (int, float, str, bool))}
        settings = GenerationSettings(prompt, max_new_tokens, method, min_pixels, max_pixels, store, decoding)
        prompt_ids = inputs["input_ids"][0].tolist()
        return AttentionRun(
            prompt_ids=prompt_ids,
            generated_ids=generated,
            generated_tokens=_token_pieces(self.processor.tokenizer, generated),
            vision=layouts[0],
            visions=layouts,
            layer_indices=recorder.layer_indices,
            num_heads=self.num_heads,
            attention=attention,
            model_id=self.model_id,
            family=self.family,
            settings=settings,
            prompt_positions=recorder.prompt_positions,
            prompt_tokens=_token_pieces(self.processor.tokenizer, prompt_ids),
            images=images,
            frames=frames or [],
            windows=attention_windows(self.model.config, recorder.layer_indices),
        )
