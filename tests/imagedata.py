"""Test inputs built from real images that ship with installed packages; nothing is downloaded.

Not a test module: other tests import it.

- `real_photos()`: photographs from scikit-image's package folder and matplotlib's sample data.
- `odd_images()`: encoded images in the awkward modes real datasets contain (grayscale, alpha,
  palette transparency, CMYK, 16-bit, float, EXIF-rotated, tiny, huge in the header only).
- `corrupt_images()`: bytes that must fail to decode.
- `write_tar_shard()` / `write_truncated_tar()` / `write_tar_members()`: WebDataset tars on a local
  path or any fsspec URL.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import fsspec
import numpy as np
from PIL import Image


class Encoded(NamedTuple):
    """An encoded image and the member extension it would have in a shard."""

    ext: str
    data: bytes


# --- real photographs ----------------------------------------------------------------------------

_SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                   "hubble_deep_field.jpg", "retina.jpg", "camera.png")


def skimage_data_dir() -> Path:
    """scikit-image's bundled data folder (read directly: skimage.data fetchers may download)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def grace_hopper_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _photo_paths() -> dict[str, Path]:
    paths = [skimage_data_dir() / name for name in _SKIMAGE_PHOTOS] + [grace_hopper_path()]
    return {p.stem: p for p in paths}


@functools.cache
def _decoded(name: str) -> Image.Image:
    with Image.open(_photo_paths()[name]) as img:
        return img.convert("RGB")


def photo(name: str = "chelsea", max_side: int | None = None) -> Image.Image:
    """One real photograph (a fresh RGB copy) by file stem, e.g. "astronaut", "grace_hopper"."""
    if name not in _photo_paths():
        raise KeyError(f"no bundled photo {name!r}; expected one of {sorted(_photo_paths())}")
    img = _decoded(name).copy()
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def real_photos(max_side: int | None = None) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for each bundled photograph; downscaled to fit max_side when given."""
    return [(name, photo(name, max_side)) for name in _photo_paths()]


def encode(img: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


# --- odd and corrupt images ----------------------------------------------------------------------


def png_bytes(array: np.ndarray, color_type: int, bit_depth: int, *, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit colour) or a header that lies.

    color_type: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA. size=(width, height) overrides the header.
    """
    height, width = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    w, h = size or (width, height)
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def gif_header_only(width: int, height: int) -> bytes:
    """A GIF whose logical screen and single frame claim width x height, with a 1-pixel body."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def cmyk_patches() -> Image.Image:
    """A 64x64 CMYK image in four flat quadrants: cyan, magenta, yellow, black."""
    img = Image.new("CMYK", (64, 64), (0, 0, 0, 0))
    for (x, y), ink in zip([(0, 0), (32, 0), (0, 32), (32, 32)],
                           [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
        img.paste(ink, (x, y, x + 32, y + 32))
    return img


GRAY16_VALUES = (0, 16384, 32768, 49152, 65535)


def gray16_array() -> np.ndarray:
    """5 rows x 40 columns; row i is GRAY16_VALUES[i]."""
    return np.repeat(np.array(GRAY16_VALUES, dtype=np.uint16)[:, None], 40, axis=1)


def exif_rotated_jpeg() -> bytes:
    """A 60 wide x 40 high JPEG, stored with orientation 6 (shown rotated 90° clockwise, 40x60).

    The stored top-left 12x12 block is red, the rest a real photo; once oriented, red is top-right.
    """
    img = photo("chelsea").resize((60, 40), Image.Resampling.LANCZOS)
    img.paste((255, 0, 0), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def odd_images() -> dict[str, Encoded]:
    """Images in awkward modes; each name says what it tests."""
    base = photo("astronaut", max_side=64)  # 64x64 RGB
    gray = photo("camera", max_side=48).convert("L")
    rgba = base.convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # left half fully transparent
    alpha[:8, 32:] = 128  # a half-transparent strip on the right
    rgba.putalpha(Image.fromarray(alpha))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.paste(2, (0, 0, 8, 16))  # left half blue, right half red
    pal.paste(0, (0, 0, 4, 4))  # index 0 is transparent
    la = Image.merge("LA", (gray, Image.new("L", gray.size, 0)))  # all transparent
    float_img = Image.fromarray(np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8), "F")
    int_img = Image.fromarray(np.arange(0, 64 * 1024, 1024, dtype=np.int32).reshape(8, 8), "I")
    tiny = Image.fromarray(np.arange(3 * 5 * 3, dtype=np.uint8).reshape(5, 3, 3), "RGB")  # 3 wide, 5 high
    return {
        "gray_l": Encoded("png", encode(gray, "PNG")),
        "rgba_transparent": Encoded("png", encode(rgba, "PNG")),
        "palette_transparent": Encoded("png", encode(pal, "PNG", transparency=0)),
        "palette_transparent_gif": Encoded("gif", encode(pal, "GIF", transparency=0)),
        "gray_alpha_la": Encoded("png", encode(la, "PNG")),
        "bilevel_1": Encoded("png", encode(gray.convert("1"), "PNG")),
        "cmyk_jpeg": Encoded("jpg", encode(cmyk_patches(), "JPEG", quality=100)),
        "gray16_png": Encoded("png", png_bytes(gray16_array(), color_type=0, bit_depth=16)),
        "gray16_tiff": Encoded("tif", encode(Image.fromarray(gray16_array()), "TIFF")),
        "float_tiff": Encoded("tiff", encode(float_img, "TIFF")),
        "int32_tiff": Encoded("tiff", encode(int_img, "TIFF")),
        "rgb16_png": Encoded("png", png_bytes(np.full((4, 4, 3), (65535, 32768, 0), np.uint16), 2, 16)),
        "exif_rotated_jpeg": Encoded("jpg", exif_rotated_jpeg()),
        "webp": Encoded("webp", encode(base, "WEBP", lossless=True)),
        "bmp": Encoded("bmp", encode(base, "BMP")),
        "tiny": Encoded("png", encode(tiny, "PNG")),
        # Headers that claim far more pixels than the body holds: refused before decoding.
        "huge_header_png": Encoded("png", png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(4000, 3000))),
        "bomb_header_png": Encoded("png", png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(10000, 10000))),
        "bomb_header_gif": Encoded("gif", gif_header_only(65535, 65535)),
    }


def corrupt_images() -> dict[str, Encoded]:
    """Bytes that must not decode."""
    jpeg = encode(photo("chelsea", max_side=128), "JPEG", quality=90)
    png = encode(photo("chelsea", max_side=128), "PNG")
    return {
        "truncated_jpeg": Encoded("jpg", jpeg[: len(jpeg) // 2]),
        "truncated_png": Encoded("png", png[: len(png) // 2]),
        "zero_bytes": Encoded("jpg", b""),
        "text_named_jpg": Encoded("jpg", b"This is a caption, not a JPEG.\n"),
    }


# --- tar shards ----------------------------------------------------------------------------------


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def sample_members(samples: Iterable[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """WebDataset members (`<key>.<ext>`, bytes) of samples given as {"__key__": k, ext: bytes|str}."""
    return [(f"{s['__key__']}.{ext}", _as_bytes(v)) for s in samples for ext, v in s.items()
            if not ext.startswith("__")]


def digests(root: Path | str) -> dict[str, str]:
    """Every file under `root` (path relative to it) -> its sha256: to show a folder left as it was."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar (in memory) of the given members, in order, with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write bytes to a local path or fsspec URL; returns the URL."""
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)
    return url


def write_tar_members(url: str, members: Iterable[tuple[str, bytes]],
                      storage_options: Mapping[str, Any] | None = None) -> str:
    """A tar of raw (name, bytes) members, e.g. with a name twice; returns the URL."""
    return write_bytes(url, tar_bytes(members), storage_options)


def write_tar_shard(url: str, samples: list[dict[str, Any]], storage_options: Mapping[str, Any] | None = None) -> str:
    """A WebDataset shard of the samples ({"__key__": k, "jpg": bytes, "txt": str, ...}); returns the URL."""
    return write_tar_members(url, sample_members(samples), storage_options)


def write_truncated_tar(url: str, samples: list[dict[str, Any]], *, cut_sample: int = -1,
                        storage_options: Mapping[str, Any] | None = None) -> str:
    """A shard cut halfway through the data of the last member of samples[cut_sample].

    Samples before cut_sample are whole; samples[cut_sample] is incomplete. Returns the URL.
    """
    cut_sample %= len(samples)
    members = sample_members(samples[: cut_sample + 1])
    whole = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        last = tf.getmembers()[-1]
    if last.size < 2:
        raise ValueError(f"member {last.name!r} has {last.size} bytes; need at least 2 to cut inside it")
    return write_bytes(url, whole[: last.offset_data + last.size // 2], storage_options)


def photo_shards(root: Path | str, n: int, *, per_shard: int = 3, broken: int = 0, max_side: int = 96) -> str:
    """`n` tar shards `part-NNNNNN.tar` under `root` of real photos as JPEG (keys `s{i}/{j}`, a
    caption each), plus `broken` samples per shard whose image is not one; returns `root`."""
    photos = [encode(img, "JPEG") for _, img in real_photos(max_side=max_side)]
    for i in range(n):
        samples = [{"__key__": f"s{i}/{j}", "jpg": photos[(i + j) % len(photos)], "txt": f"{i}-{j}"}
                   for j in range(per_shard)]
        samples += [{"__key__": f"s{i}/bad{j}", "jpg": b"not a jpeg at all"} for j in range(broken)]
        write_tar_shard(f"{root}/part-{i:06d}.tar", samples)
    return str(root)
