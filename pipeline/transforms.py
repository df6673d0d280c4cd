"""Raw sample -> model input: find the image, decode, orient, to RGB, bucket, resize, crop, to tensor.

Pure functions, no I/O. A sample whose image cannot be used raises `SampleDecodeError`; the caller
records it as a SampleError and goes on with the next sample.
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from pipeline.config import PreprocessConfig
from pipeline.samples import PreparedSample, RawSample

# Member extensions that hold the sample's image, in the order one is picked when several are present.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg", "jpeg", "jfif", "jpe", "png", "apng", "webp", "avif", "bmp", "dib", "tif", "tiff", "gif",
    "jp2", "j2k", "jpx", "jpc", "j2c", "jpf", "tga", "ppm", "pgm", "pbm", "pnm", "pfm", "qoi", "ico", "icns",
    "psd", "dds", "pcx", "sgi", "ras", "xbm", "xpm", "mpo", "image", "img",
)

_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
# Buckets whose area strays further than this from resolution² are left out (kohya-style buckets
# round one side to the step, which for small resolutions can lose a quarter of the area).
BUCKET_AREA_TOLERANCE = 0.15
_WHITE = (255, 255, 255)
_SRGB = ImageCms.createProfile("sRGB")


class SampleDecodeError(Exception):
    """One sample's image cannot be used. `stage` is "decode" or "preprocess"."""

    def __init__(self, message: str, stage: str = "decode") -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.stage))


# --- finding and decoding ------------------------------------------------------------------------


def find_image(sample: RawSample) -> tuple[str, bytes]:
    """The (extension, bytes) of the sample's image member, by `IMAGE_EXTENSIONS` priority."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    found = sorted(k for k in sample if not k.startswith("__"))
    raise SampleDecodeError(f"no image member; found extensions {found}; expected one of {list(IMAGE_EXTENSIONS)}")


def _pillow_failed(exc: BaseException, what: str) -> SampleDecodeError:
    return SampleDecodeError(f"{what}: {type(exc).__name__}: {exc}")


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    """Refuse an image over our limit or over Pillow's own (Image.MAX_IMAGE_PIXELS).

    Pillow only warns between its limit and twice it; checking its limit here makes that an error
    too, without warnings.catch_warnings, which is process-wide and races between decode threads.
    """
    width, height = img.size
    pixels = width * height
    if pixels > max_pixels:
        raise SampleDecodeError(f"image is {width}x{height} = {pixels} pixels, over the limit "
                                f"max_image_pixels={max_pixels}")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and pixels > pillow_limit:
        raise SampleDecodeError(f"image is {width}x{height} = {pixels} pixels, over Pillow's decompression bomb "
                                f"limit Image.MAX_IMAGE_PIXELS={pillow_limit} (raise it in the worker process "
                                "to allow larger images)")


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and enforce the pixel limits before any pixel is decoded."""
    if not data:
        raise SampleDecodeError("image data is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleDecodeError(f"refused by Pillow's decompression bomb check: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        # Pillow's message names a BytesIO's address; name the data instead.
        raise SampleDecodeError(f"cannot identify image format ({len(data)} bytes starting "
                                f"{data[:16]!r}); Pillow knows no decoder for it") from exc
    except Exception as exc:
        # Pillow signals malformed input with many types (OSError, SyntaxError, ValueError,
        # struct.error, ...; its own fuzzers catch Exception): each means these bytes are bad.
        raise _pillow_failed(exc, "cannot open image") from exc
    _check_pixels(img, max_pixels)
    return img


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale scaled (not clipped) to 8 bits.

    I;16*: the full 16-bit range maps onto 0..255. I (int32): values within 0..65535 are taken as
    16-bit (that is what 16-bit PNGs and TIFFs decode to), anything else is stretched min..max.
    F (float): values within 0..1 map onto 0..255, anything else is stretched min..max.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif img.mode == "I" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    scaled = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1e-12))
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB,
                                             outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken embedded profile: the plain conversion below still gives usable colours
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _gray_to_8bit(img)  # a transparent key on deep grayscale is vanishingly rare: ignored
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _composite_on_white(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, YCbCr, HSV, ...


_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) as displayed, from the header and the EXIF orientation, before decoding."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # an unreadable EXIF block: Pillow's exif_transpose will ignore it too
        orientation = 1
    return (w, h) if orientation in _SWAPS_AXES else (h, w)


def _decode(data: bytes, cfg: PreprocessConfig, *, draft: bool) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original (height, width)). With `draft`, a JPEG much larger than its target is
    decoded at a reduced DCT scale (1/2, 1/4, 1/8), never below the size the resize needs."""
    img = _open_checked(data, cfg.max_image_pixels)
    original = _oriented_size(img)
    try:
        if draft and img.format == "JPEG":
            th, tw = choose_bucket(*original, cfg)
            cover = max(th / original[0], tw / original[1])
            if cover <= 0.5:
                w, h = img.size
                img.draft(None, (math.ceil(w * cover), math.ceil(h * cover)))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of a full-size photo
        rgb = to_rgb(img)
    except Exception as exc:  # see _open_checked: Pillow's many exception types for bad input
        raise _pillow_failed(exc, f"cannot decode {img.format or 'image'} {img.width}x{img.height} "
                                  f"{img.mode}") from exc
    _check_pixels(rgb, cfg.max_image_pixels)  # a few formats (ICO, ICNS) pick their size while loading
    if not draft:
        original = (rgb.height, rgb.width)
    return rgb, original


def decode_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Encoded image bytes -> 8-bit RGB Pillow image at full size, EXIF orientation applied.

    Refuses images over cfg.max_image_pixels from the header, before any pixel is decoded.
    Raises SampleDecodeError with Pillow's reason for truncated, corrupt or unknown data.
    """
    return _decode(data, cfg, draft=False)[0]


# --- sizes, buckets, resizing --------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _buckets(resolution: int, step: int, max_ratio: float) -> tuple[tuple[int, int], ...]:
    area = resolution * resolution
    found: set[tuple[int, int]] = set()
    side = max(step, round(resolution / step) * step)
    found.add((side, side))
    width = step
    while width <= math.sqrt(area * max_ratio) + step:
        height = max(step, round(area / width / step) * step)
        ratio = max(width, height) / min(width, height)
        if ratio <= max_ratio + 1e-9 and abs(width * height / area - 1) <= BUCKET_AREA_TOLERANCE:
            found.update({(height, width), (width, height)})
        width += step
    # Tall to wide, so the list reads like the SDXL table.
    return tuple(sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0])))


def bucket_sizes(cfg: PreprocessConfig) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as (height, width), tall to wide.

    Sides are multiples of cfg.bucket_step, areas within BUCKET_AREA_TOLERANCE of resolution², and
    the long side at most cfg.max_aspect_ratio times the short one (SDXL/kohya-style).
    """
    return list(_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio))


def choose_bucket(height: int, width: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """The target (height, width) for an image: the bucket of closest aspect ratio (in log space),
    or (resolution, resolution) without buckets."""
    if not cfg.buckets:
        return cfg.resolution, cfg.resolution
    if height <= 0 or width <= 0:
        raise SampleDecodeError(f"image size {width}x{height} has no aspect ratio", stage="preprocess")
    log_ratio = math.log(width / height)
    return min(_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio),
               key=lambda hw: abs(math.log(hw[1] / hw[0]) - log_ratio))


def resize_and_crop(img: Image.Image, target_hw: tuple[int, int],
                    resample: str = "lanczos") -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover target_hw, then centre-crop to it; returns (image, (top, left)).

    (top, left) is the crop's offset in the resized (covering) image, SDXL's crop conditioning. An
    image already at the target size is returned as is. Only the cropped region is resampled (Pillow's
    `box`), so a long thin image never makes a huge intermediate; the filter still reads the pixels
    around the box, so the result matches resize-then-crop up to intermediate rounding.
    """
    th, tw = target_hw
    w, h = img.size
    if (h, w) == (th, tw):
        return img, (0, 0)
    try:
        filt = _RESAMPLE[resample]
    except KeyError:
        raise ValueError(f"resample={resample!r} is not allowed; expected one of {sorted(_RESAMPLE)}") from None
    # Scale so the limiting side lands exactly on the target (integer compare: no float drift) and the
    # other side, rounded, is never below it.
    if th * w >= tw * h:
        new_h, new_w = th, max(tw, round(w * th / h))
    else:
        new_h, new_w = max(th, round(h * tw / w)), tw
    top, left = (new_h - th) // 2, (new_w - tw) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + tw) * sx, (top + th) * sy)
    return img.resize((tw, th), filt, box=box), (top, left)


# --- whole samples and tensors -------------------------------------------------------------------


def prepare(sample: RawSample, cfg: PreprocessConfig) -> PreparedSample:
    """Raw sample -> PreparedSample at its target size; raises SampleDecodeError for a bad sample."""
    ext, data = find_image(sample)
    img, original = _decode(data, cfg, draft=cfg.jpeg_draft)
    target = choose_bucket(*original, cfg)
    try:
        resized, crop = resize_and_crop(img, target, cfg.resample)
        pixels = np.array(resized, dtype=np.uint8)  # a copy the caller owns and may write
    except (OSError, ValueError) as exc:  # Pillow failing on pixels that decoded fine
        raise SampleDecodeError(f"cannot resize {img.width}x{img.height} to {target[1]}x{target[0]}: "
                                f"{type(exc).__name__}: {exc}", stage="preprocess") from exc
    extras = {k: v for k, v in sample.items() if not k.startswith("__") and k not in IMAGE_EXTENSIONS}
    return PreparedSample(key=sample.get("__key__", ""), pixels=pixels, original_size=original,
                          crop_top_left=crop, target_size=target, extras=extras)


def hflip(pixels: np.ndarray) -> np.ndarray:
    """Mirror left-right: an (H, W, C) image or an (N, H, W, C) batch; returns a contiguous copy."""
    if pixels.ndim not in (3, 4):
        raise ValueError(f"hflip: pixels have shape {pixels.shape}; expected (H, W, C) or (N, H, W, C)")
    return np.ascontiguousarray(np.flip(pixels, axis=pixels.ndim - 2))


@functools.lru_cache(maxsize=None)
def copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The CUDA stream that uploads batches to `device` (an indexed CUDA device), one per device."""
    return torch.cuda.Stream(device=device)


def _upload(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host uint8 batch on `device`, copied from pinned memory on `copy_stream`, not the stream
    the model runs on: an actor runs two shards at once, and one's upload then proceeds beside the
    other's model kernels instead of queueing behind them. The current stream waits for the copy."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    compute, copier = torch.cuda.current_stream(device), copy_stream(device)
    with torch.cuda.stream(copier):
        out = batch.pin_memory().to(device, non_blocking=True)
    compute.wait_stream(copier)
    out.record_stream(compute)  # freed while the model may still read it: the allocator waits for it
    return out


def to_model_input(pixels: Sequence[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size -> float32 (N, 3, H, W) in [-1, 1], on `device`.

    On a CUDA device the batch crosses as uint8 from pinned host memory (a quarter of the bytes of
    float32, copied without a staging buffer, on a stream of its own: `_upload`) and is normalised
    there: the host never holds float32."""
    if len(pixels) == 0:
        raise ValueError("to_model_input: empty batch; expected at least one image")
    first = pixels[0]
    for i, p in enumerate(pixels):
        if p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3 or p.shape != first.shape:
            raise ValueError(f"to_model_input: image {i} is {p.dtype} {p.shape}; expected uint8 "
                             f"{first.shape if first.ndim == 3 else '(H, W, 3)'} like image 0")
    batch = torch.from_numpy(np.stack(pixels))
    device = torch.device(device) if device is not None else batch.device
    if device.type == "cuda":
        batch = _upload(batch, device)
    return batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
