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
    placeholder_tokens,
    prefix_lm,
    processor_options,
    softmax_layers,
    supports_video,
    video_families,
    vision_layouts,
)
from loading import load_checkpoint
from records import AttentionRun, GenerationSettings, VisionLayout, segment_positions
from utils import (
    MAX_IMAGE_PIXELS,
    image_header_size,
    load_image,
    load_video,
    resolve_device,
    resolve_dtype,
    video_header,
)

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


def _processor_refused(err: ValueError, sizes: list[tuple[int, int]]) -> InputError:
    """The processor's refusal of these (W, H) inputs, with what to do."""
    extreme = any(max(w, h) > 50 * max(1, min(w, h)) for w, h in sizes)  # a side that resizes to nothing
    hint = (
        "Crop it to a less extreme aspect ratio or resize it"
        if "aspect ratio" in str(err) or extreme
        else "Check that this checkpoint's processor takes this kind of input (images, video)"
    )
    listed = ", ".join(f"{width}x{height}" for width, height in sizes)
    return InputError(f"The processor could not prepare the input ({listed}): {err} {hint}, then try again.")


@dataclass(frozen=True)
class MediaLimits:
    """What one request may give, checked from the images' headers before any is decoded."""

    max_images: int = 8  # images in one prompt
    max_total_pixels: int = MAX_IMAGE_PIXELS  # width × height summed over the images (or a video's frames)


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
        text = self._chat_text(len(images), prompt, bool(video))
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
        except (ValueError, IndexError, RuntimeError, ZeroDivisionError) as err:  # a processor that cannot size it
            raise _processor_refused(err, [im.size for im in images + (video or [])[:1]]) from err

    def _chat_text(self, num_images: int, prompt: str, video: bool = False) -> str:
        """The prompt's text before the processor expands each image's (or the video's) one placeholder."""
        parts = [{"type": "image"}] * num_images + ([{"type": "video"}] if video else [])
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        if getattr(self.processor, "chat_template", None) or not prefix_lm(self.family):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "<image>" * num_images + prompt  # PaliGemma: no chat template; the processor expands <image>, adds BOS

    def check_media(
        self,
        image_sizes: list[tuple[int, int]],
        prompt: str,
        max_new_tokens: int,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_capture_mb: float | None = None,
        video: tuple[int, tuple[int, int]] | None = None,
        limits: MediaLimits | None = None,
        capture_layers: list[int] | None = None,
        store: StoreKind = "auto",
    ) -> None:
        """Refuse, from the images' (W, H) sizes alone (their headers: nothing is decoded yet), a request
        with too many images, too many pixels to decode, or a prompt the processor would make longer than
        the context or the capture budget. video: (frames, (W, H)) in place of images. The message names
        each image's size and token count and what to change."""
        limits = limits or MediaLimits()
        if len(image_sizes) > limits.max_images:
            raise InputError(
                f"This request has {len(image_sizes)} images; this server takes at most {limits.max_images} in one "
                "prompt. Give fewer images (or start the app with a larger --max-images)."
            )
        frames, frame_size = video or (0, (0, 0))
        if video is not None and (frames < 2 or min(frame_size) < 1):
            return  # a video its header does not describe: reading it says what is wrong
        sizes = image_sizes or [frame_size] * frames
        pixels = sum(width * height for width, height in sizes)
        listed = ", ".join(f"{width}x{height}" for width, height in sizes[:16]) + (" …" if len(sizes) > 16 else "")
        if pixels > limits.max_total_pixels:
            raise InputError(
                f"The {'frames' if video else 'images'} ({listed}) hold {pixels / 1e6:.0f} megapixels together; "
                f"this server decodes at most {limits.max_total_pixels / 1e6:.0f} megapixels per request. Give "
                "fewer or smaller images, then try again."
            )
        predicted = self.predicted_length(image_sizes, prompt, min_pixels, max_pixels, video)
        if predicted is None:
            return
        prompt_len, counts = predicted
        if video:
            each = f" The video's {frames} frames of {frame_size[0]}x{frame_size[1]} take {sum(counts)} tokens."
        else:
            per_image = [
                f"{'Image' if i == 0 else 'image'} {i + 1}: {w}x{h} px, {n} tokens"
                for i, ((w, h), n) in enumerate(zip(sizes, counts, strict=True))
            ]
            each = " " + "; ".join(per_image) + "."
        num_layers = len(set(capture_layers)) if capture_layers is not None else len(softmax_layers(self.model))
        self._check_budget(prompt_len, max_new_tokens, num_layers, max_capture_mb, store=store, detail=each)

    def predicted_length(
        self,
        image_sizes: list[tuple[int, int]],
        prompt: str,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video: tuple[int, tuple[int, int]] | None = None,
    ) -> tuple[int, list[int]] | None:
        """(the prompt's length in tokens, each image's or the video's placeholder tokens) that `build_inputs`
        will produce for images of these (W, H) sizes, from the sizes alone; None when the processor cannot
        say."""
        size = pixel_budget(self.family, self.processor.image_processor, min_pixels, max_pixels, self.max_pixels_cap)
        try:
            counts = placeholder_tokens(self.family, self.processor, image_sizes, size, video=video)
        except ValueError as err:  # the resize rule refuses these sizes, as the processor would
            raise _processor_refused(err, image_sizes or [video[1]]) from err
        except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as err:
            logger.debug("no token count from the sizes alone (%s); the processed prompt is checked", err)
            return None
        if counts is None:
            return None
        tokenizer = self.processor.tokenizer
        text_ids = tokenizer(self._chat_text(len(image_sizes), prompt, bool(video)), add_special_tokens=False)
        placeholder = getattr(self.processor, "video_token" if video else "image_token", None)
        marks = sum(piece == placeholder for piece in tokenizer.convert_ids_to_tokens(text_ids["input_ids"]))
        return len(text_ids["input_ids"]) - marks + sum(counts), counts

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
        detail: str = "",
    ) -> None:
        """Refuse up front what would overflow the model's context or the capture's memory; `detail`
        (each image's size and tokens) is added to the message."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if context and prompt_len + max_new_tokens > context:
            raise InputError(
                f"The image and prompt take {prompt_len} tokens; with {max_new_tokens} new tokens "
                f"that exceeds the model's context of {context}.{detail} Shorten the prompt, give fewer or smaller "
                "images, lower the image-token budget (max pixels) or generate fewer tokens."
            )
        estimate = estimate_capture_bytes(self.model, num_layers, prompt_len, max_new_tokens, num_prompt_rows, store)
        if max_capture_mb is not None and estimate > max_capture_mb * 2**20:
            raise CaptureTooLargeError(
                f"Capturing {max_new_tokens} tokens over {num_layers} layers for a {prompt_len}-token prompt "
                f"could take {estimate / 2**20:.0f} MB, more than the {max_capture_mb:.0f} MB allowed.{detail} "
                "Capture fewer layers, generate fewer tokens, give fewer or smaller images, or lower the "
                "image-token budget (max pixels)."
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

    def _media(self, image, video, check) -> tuple[list[Image.Image], list[Image.Image] | None]:
        """Loaded images and video frames; exactly one of the two is given. `check(sizes, video)` sees their
        headers first (`check_media`'s arguments), before anything is decoded."""
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
            check([], video_header(video))
            return [], load_video(video)
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ImageLoadError("No image given. Upload or pass at least one image.")
        check([image_header_size(im) for im in images], None)
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
        limits: MediaLimits | None = None,
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
        limits: how many images and pixels one request may give (`MediaLimits`), checked with the
            prompt's length from the images' headers before any is decoded (`check_media`).
        generate_kwargs: passed on to `model.generate`; greedy decoding unless they say otherwise.
            One sequence only: beam search and several return sequences are refused.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("The prompt is empty. Type a question or instruction about the image.")
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}.")

        def check(sizes, video_header):
            self.check_media(
                sizes,
                prompt,
                max_new_tokens,
                min_pixels,
                max_pixels,
                max_capture_mb,
                video_header,
                limits,
                capture_layers,
                store,
            )

        images, frames = self._media(image, video, check)
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
