"""Generic helpers: opening user images safely and choosing devices and dtypes."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from errors import ImageLoadError, InputError

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; 16-bit greyscale is rescaled, alpha is flattened onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


MAX_IMAGE_PIXELS = 150_000_000  # decoded size accepted by default: a 12000x9000 photo, not a 30000² bomb


def load_image(source: str | Path | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path or a PIL image.

    EXIF orientation is applied once here, so the model and the overlay see the same picture.
    Animated images use their first frame. Images over `max_pixels` (width × height) are refused
    before they are decoded.
    """
    if source is None:
        raise ImageLoadError("No image given. Upload or pass an image (a file path or a PIL.Image).")
    if type(source) is Image.Image and source.mode == "RGB" and _upright(source):  # in memory, decoded
        if source.size[0] * source.size[1] > max_pixels:
            raise _too_large(source.size, max_pixels)
        return source  # already prepared: no copy
    with _reading(source, max_pixels):
        image = source if isinstance(source, Image.Image) else Image.open(Path(source))
        if image.size[0] * image.size[1] > max_pixels:
            raise _too_large(image.size, max_pixels)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()  # truncated files fail here, not at open
        image = ImageOps.exif_transpose(image)
        image = _to_8bit_rgb(image)
    if min(image.size) < 1:
        raise ImageLoadError(f"The image is empty ({image.size[0]}x{image.size[1]} px).")
    return image


def image_header_size(source: str | Path | Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(W, H) of the upright image `load_image` would return, read from the file's header only: nothing
    is decoded, so a request's sizes can be checked before any of its images takes memory."""
    if source is None:
        raise ImageLoadError("No image given. Upload or pass an image (a file path or a PIL.Image).")
    with _reading(source, max_pixels):
        if isinstance(source, Image.Image):
            (width, height), orientation = source.size, _header_orientation(source)
        else:
            with Image.open(Path(source)) as image:  # the header only
                (width, height), orientation = image.size, _header_orientation(image)
    if width * height > max_pixels:
        raise _too_large((width, height), max_pixels)
    if orientation in (5, 6, 7, 8):  # a quarter turn: load_image returns it upright
        width, height = height, width
    if min(width, height) < 1:
        raise ImageLoadError(f"The image is empty ({width}x{height} px).")
    return width, height


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation an opened image's header declares (1: upright), read without decoding it
    (`getexif` would decode a PNG to look for EXIF after its pixels)."""
    if "exif" in image.info:
        exif = Image.Exif()
        exif.load(image.info["exif"])
        return exif.get(ExifTags.Base.Orientation, 1)
    if image.format == "TIFF":  # its tags are the header
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    return 1


@contextmanager
def _reading(source, max_pixels: int):
    """Pillow's errors while opening or decoding `source`, as `ImageLoadError`s that say what to do."""
    try:
        yield
    except ImageLoadError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError(f"Image file not found: {source}. Check the path.") from err
    except Image.DecompressionBombError as err:  # Pillow's own limit, hit at open
        raise ImageLoadError(
            f"The image is too large to decode safely ({err}). Resize it below "
            f"{max_pixels / 1e6:.0f} megapixels and try again."
        ) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageLoadError(
            f"Could not read the image ({err}). Use a PNG, JPEG, WebP, GIF or BMP file that opens in an image viewer."
        ) from err


def _upright(image: Image.Image) -> bool:
    """Whether an image has no EXIF rotation left to apply."""
    return image.getexif().get(ExifTags.Base.Orientation, 1) == 1


def _too_large(size: tuple[int, int], max_pixels: int) -> ImageLoadError:
    return ImageLoadError(
        f"The image is {size[0]}x{size[1]} px ({size[0] * size[1] / 1e6:.0f} megapixels); this "
        f"server decodes at most {max_pixels / 1e6:.0f} megapixels. Resize it and try again."
    )


def video_header(source, max_frames: int = 16) -> tuple[int, tuple[int, int]]:
    """(frames `load_video` would return, (W, H) of each) from the container's header, or from a list of
    frames' headers, before any frame is decoded."""
    if isinstance(source, (list, tuple)):
        sizes = [image_header_size(frame) for frame in source]
        return len(sizes) // 2 * 2, max(sizes, key=lambda wh: wh[0] * wh[1], default=(0, 0))
    import cv2

    capture = cv2.VideoCapture(str(source))
    try:
        if not capture.isOpened():
            return 0, (0, 0)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        size = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    return min(max_frames, max(total, 0)) // 2 * 2, size


BROWSER_CODECS = ("avc1", "h264", "vp80", "vp08", "vp90", "vp09", "av01")  # what browsers play in a <video>


def playable_preview(source: str | Path, out_dir: Path, max_side: int = 480, max_frames: int = 300) -> Path | None:
    """A VP8 WebM copy of a video whose codec a browser cannot play (MPEG-4 Part 2, `mp4v`, is common from
    OpenCV and phones), for the page's preview only: at most `max_side` px and `max_frames` frames at the
    video's own rate; the model still reads the original. None when the browser plays the original, or
    when it cannot be read."""
    import cv2

    capture = cv2.VideoCapture(str(source))
    try:
        if not capture.isOpened():
            return None
        code = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1").lower()
        if code in BROWSER_CODECS:
            return None
        fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if min(width, height) < 1:
            return None
        size = scaled_size((width, height), min(1.0, max_side / max(width, height)))
        size = (size[0] + size[0] % 2, size[1] + size[1] % 2)  # even sides, as the encoder wants
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / f"{Path(source).stem}-preview.webm"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), float(fps), size)
        try:
            for _ in range(max_frames):
                ok, bgr = capture.read()
                if not ok:
                    break
                writer.write(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA))
        finally:
            writer.release()
    finally:
        capture.release()
    return path if path.exists() and path.stat().st_size > 0 else None


def load_video(source, max_frames: int = 16) -> list[Image.Image]:
    """Upright 8-bit RGB frames from a video file (sampled evenly) or a list of images.

    An even number of frames is returned, since Qwen's vision encoder pairs frames in time.
    """
    if isinstance(source, (list, tuple)):
        frames = [load_image(frame) for frame in source]
    else:
        import cv2

        capture = cv2.VideoCapture(str(source))
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        frames = []
        for index in np.linspace(0, max(total - 1, 0), num=min(max_frames, total)).round().astype(int):
            capture.set(cv2.CAP_PROP_POS_FRAMES, int(index))
            ok, bgr = capture.read()
            if ok:
                frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))  # OpenCV decodes BGR
        capture.release()
    if len(frames) < 2:
        raise ImageLoadError(
            f"Could not read at least two frames from {source!r}. Use an MP4, WebM or AVI "
            "file that plays in a video player, or pass a list of frames."
        )
    return frames[: len(frames) // 2 * 2]


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'. Asking for CUDA without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            "CUDA was requested but no GPU is visible to PyTorch. Use device='cpu' (or 'auto'), "
            "or check the CUDA driver and the torch build."
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"Unknown device {device!r}; use 'auto', 'cuda' or 'cpu'.")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' → bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"Unknown dtype {dtype!r}; use 'auto' or one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def scaled_size(size_wh: tuple[int, int], factor: float, factor_y: float | None = None) -> tuple[int, int]:
    """(W, H) scaled by `factor` (and `factor_y` for the height, if given), rounded, at least 1 px each."""
    fy = factor if factor_y is None else factor_y
    return max(1, round(size_wh[0] * factor)), max(1, round(size_wh[1] * fy))


def scale_box(box_xyxy, sx: float, sy: float | None = None) -> tuple[float, float, float, float]:
    """A box (x0, y0, x1, y1) in one image's pixels, in the pixels of the same image scaled by (sx, sy)."""
    sy = sx if sy is None else sy
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy
