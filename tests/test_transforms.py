"""Decode, orient, colour-convert, bucket, resize and crop real and awkward images; check the values."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from pipeline.config import PreprocessConfig
from pipeline.samples import PreparedSample
from pipeline.transforms import (
    IMAGE_EXTENSIONS,
    SampleDecodeError,
    bucket_sizes,
    choose_bucket,
    decode_image,
    find_image,
    hflip,
    prepare,
    resize_and_crop,
    to_model_input,
    to_rgb,
)
from tests.imagedata import (
    GRAY16_VALUES,
    corrupt_images,
    encode,
    odd_images,
    photo,
    real_photos,
)

CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def odd() -> dict:
    return odd_images()


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return math.inf if np.array_equal(a, b) else peak_signal_noise_ratio(a, b, data_range=255)


# --- finding the image ---------------------------------------------------------------------------


def test_find_image_follows_priority_and_names_what_it_found() -> None:
    sample = {"__key__": "k", "__url__": "u", "txt": b"t", "png": b"P", "jpg": b"J"}
    assert find_image(sample) == ("jpg", b"J")
    assert find_image({"__key__": "k", "webp": b"W", "txt": b""}) == ("webp", b"W")
    with pytest.raises(SampleDecodeError) as info:
        find_image({"__key__": "k", "__url__": "u", "txt": b"a", "json": b"{}"})
    msg = str(info.value)
    assert "no image member" in msg and "['json', 'txt']" in msg and "'jpg'" in msg
    assert info.value.stage == "decode"


def test_image_extensions_are_lower_case_and_unique() -> None:
    assert len(set(IMAGE_EXTENSIONS)) == len(IMAGE_EXTENSIONS)
    assert all(e == e.lower() for e in IMAGE_EXTENSIONS)
    assert IMAGE_EXTENSIONS[:2] == ("jpg", "jpeg")


# --- decoding and colour -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,params", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})])
def test_real_photos_decode_losslessly_to_rgb(fmt: str, params: dict) -> None:
    for name, img in real_photos(max_side=96):
        out = decode_image(encode(img, fmt, **params), CFG)
        assert out.mode == "RGB" and out.size == img.size, name
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img), err_msg=name)


def test_real_photos_decode_from_jpeg() -> None:
    for name, img in real_photos(max_side=96):
        out = decode_image(encode(img, "JPEG", quality=95), CFG)
        assert out.mode == "RGB" and out.size == img.size, name
        assert psnr(np.asarray(img), np.asarray(out)) > 30, name


def test_grayscale_becomes_equal_rgb_channels(odd: dict) -> None:
    gray = photo("camera", max_side=48).convert("L")
    out = px(decode_image(odd["gray_l"].data, CFG))
    assert out.shape == (48, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], px(gray))


def test_rgba_is_composited_on_white(odd: dict) -> None:
    src = photo("astronaut", max_side=64)
    out = px(decode_image(odd["rgba_transparent"].data, CFG))
    assert (out[:, :32] == 255).all()  # alpha 0: white, whatever the colour underneath
    np.testing.assert_array_equal(out[8:, 32:], px(src)[8:, 32:])  # alpha 255: the photo
    # alpha 128: halfway between the photo and white
    expected = (px(src)[:8, 32:] * 128 + 255 * 127) / 255
    assert np.abs(out[:8, 32:] - expected).max() <= 1.5


@pytest.mark.parametrize("name", ["palette_transparent", "palette_transparent_gif"])
def test_palette_transparency_is_white_and_colours_kept(odd: dict, name: str) -> None:
    out = px(decode_image(odd[name].data, CFG))
    assert out.shape == (16, 16, 3)
    assert (out[:4, :4] == 255).all()  # transparent index
    assert (out[4:, :8] == (0, 0, 255)).all()  # blue
    assert (out[:, 8:] == (255, 0, 0)).all()  # red


def test_gray_alpha_transparent_is_white_and_bilevel_is_black_and_white(odd: dict) -> None:
    assert (px(decode_image(odd["gray_alpha_la"].data, CFG)) == 255).all()
    bilevel = px(decode_image(odd["bilevel_1"].data, CFG))
    assert set(np.unique(bilevel)) <= {0, 255} and len(np.unique(bilevel)) == 2


def test_cmyk_jpeg_converts_to_the_right_colours(odd: dict) -> None:
    out = px(decode_image(odd["cmyk_jpeg"].data, CFG))
    centre = {name: out[y, x] for name, (y, x) in
              {"cyan": (16, 16), "magenta": (16, 48), "yellow": (48, 16), "black": (48, 48)}.items()}
    for name, expected in {"cyan": (0, 255, 255), "magenta": (255, 0, 255), "yellow": (255, 255, 0),
                           "black": (0, 0, 0)}.items():
        assert np.abs(centre[name] - expected).max() <= 8, (name, centre[name])


@pytest.mark.parametrize("name", ["gray16_png", "gray16_tiff"])
def test_16bit_grayscale_is_scaled_not_clipped(odd: dict, name: str) -> None:
    out = px(decode_image(odd[name].data, CFG))
    assert out.shape == (5, 40, 3)
    rows = out[:, 0, 0]
    np.testing.assert_array_equal(rows, [round(v / 257) for v in GRAY16_VALUES])
    assert rows[0] == 0 and rows[2] == 128 and rows[-1] == 255
    assert (out == out[:, :, :1]).all()


def test_float_and_int32_grayscale_are_scaled(odd: dict) -> None:
    flt = px(decode_image(odd["float_tiff"].data, CFG))[:, :, 0].ravel()
    np.testing.assert_array_equal(flt, np.rint(np.linspace(0.0, 1.0, 64) * 255))
    i32 = px(decode_image(odd["int32_tiff"].data, CFG))[:, :, 0].ravel()
    np.testing.assert_array_equal(i32, np.rint(np.arange(0, 64 * 1024, 1024) / 257))


def test_16bit_rgb_png_becomes_8bit_rgb(odd: dict) -> None:
    out = px(decode_image(odd["rgb16_png"].data, CFG))
    assert (out == (255, 128, 0)).all()


def test_to_rgb_returns_rgb_untouched() -> None:
    img = photo("chelsea", max_side=32)
    assert to_rgb(img) is img


def test_exif_orientation_is_applied(odd: dict) -> None:
    out = px(decode_image(odd["exif_rotated_jpeg"].data, CFG))
    assert out.shape == (60, 40, 3)  # stored 60 wide x 40 high; orientation 6 shows it 40 x 60
    assert np.abs(out[2:10, -10:-2] - (255, 0, 0)).max() <= 40  # stored top-left -> shown top-right
    assert np.abs(out[2:10, 2:10] - (255, 0, 0)).max() > 60  # and the top-left is the photo


def test_tiny_image_decodes_and_prepares() -> None:
    data = odd_images()["tiny"].data
    out = px(decode_image(data, CFG))
    assert out.shape == (5, 3, 3) and out[0, 0].tolist() == [0, 1, 2]
    prepared = prepare({"__key__": "t", "png": data}, PreprocessConfig(resolution=64))
    assert prepared.pixels.shape == (64, 64, 3) and prepared.original_size == (5, 3)


# --- refusing bad data ---------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding(odd: dict) -> None:
    with pytest.raises(SampleDecodeError) as info:
        decode_image(odd["huge_header_png"].data, PreprocessConfig(max_image_pixels=1_000_000))
    msg = str(info.value)
    assert "4000x3000" in msg and "12000000" in msg and "max_image_pixels=1000000" in msg
    # Under a higher limit the same bytes get as far as decoding, and fail there: the body is 1 pixel.
    with pytest.raises(SampleDecodeError, match="cannot decode PNG 4000x3000"):
        decode_image(odd["huge_header_png"].data, PreprocessConfig(max_image_pixels=20_000_000))


@pytest.mark.parametrize("name", ["bomb_header_png", "bomb_header_gif"])
def test_pillow_decompression_bomb_warning_and_error_are_errors(odd: dict, name: str) -> None:
    # A limit above Pillow's own, so that Pillow's check (a warning for bomb_header_png, an error
    # for bomb_header_gif) is what refuses it.
    cfg = PreprocessConfig(max_image_pixels=10**12)
    if name == "bomb_header_png":  # 100M pixels: between Pillow's limit and twice it, where Pillow only warns
        with pytest.warns(Image.DecompressionBombWarning), pytest.raises(SampleDecodeError) as info:
            decode_image(odd[name].data, cfg)
        assert "10000x10000" in str(info.value) and f"MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}" in str(info.value)
    else:
        with pytest.raises(SampleDecodeError, match="decompression bomb"):
            decode_image(odd[name].data, cfg)


@pytest.mark.parametrize("name,reason", [
    ("truncated_jpeg", "truncated"),
    ("truncated_png", "truncated"),
    ("zero_bytes", "empty"),
    ("text_named_jpg", "cannot identify image format"),
])
def test_corrupt_data_raises_with_pillows_reason(name: str, reason: str) -> None:
    enc = corrupt_images()[name]
    with pytest.raises(SampleDecodeError, match=reason) as info:
        decode_image(enc.data, CFG)
    assert info.value.stage == "decode"
    with pytest.raises(SampleDecodeError):
        prepare({"__key__": "k", enc.ext: enc.data}, CFG)


def test_sample_decode_error_pickles_with_its_stage() -> None:
    err = pickle.loads(pickle.dumps(SampleDecodeError("bad", stage="preprocess")))
    assert str(err) == "bad" and err.stage == "preprocess"


# --- buckets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,step,ratio", [(512, 64, 4.0), (1024, 64, 4.0), (768, 32, 2.0), (256, 64, 4.0)])
def test_buckets_respect_step_area_and_ratio(resolution: int, step: int, ratio: float) -> None:
    cfg = PreprocessConfig(resolution=resolution, bucket_step=step, max_aspect_ratio=ratio, buckets=True)
    buckets = bucket_sizes(cfg)
    assert len(buckets) >= 3 and len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert abs(h * w / resolution**2 - 1) <= 0.15, (h, w)
        assert max(h, w) / min(h, w) <= ratio + 1e-9
        assert (w, h) in buckets  # both orientations
    assert (resolution, resolution) in buckets
    ratios = [w / h for h, w in buckets]
    assert ratios == sorted(ratios)
    assert max(ratios) >= ratio * 0.9  # reaches near the ratio bound


def test_choose_bucket_matches_the_aspect_ratio() -> None:
    cfg = PreprocessConfig(buckets=True)
    h, w = choose_bucket(300, 600, cfg)  # 2:1 landscape
    assert 1.7 <= w / h <= 2.4
    assert choose_bucket(600, 300, cfg) == (w, h)  # portrait mirrors it
    assert choose_bucket(500, 500, cfg) == (512, 512)
    # far beyond the ratio bound: the most extreme bucket
    assert choose_bucket(10, 1000, cfg) == min(bucket_sizes(cfg), key=lambda hw: hw[0] / hw[1])
    # closest in log ratio among all buckets
    for hh, ww in [(600, 800), (1080, 1920), (1000, 1500)]:
        got = choose_bucket(hh, ww, cfg)
        best = min(abs(math.log((b[1] / b[0]) / (ww / hh))) for b in bucket_sizes(cfg))
        assert abs(math.log((got[1] / got[0]) / (ww / hh))) == pytest.approx(best)
    assert choose_bucket(300, 600, PreprocessConfig(resolution=256)) == (256, 256)  # no buckets: square


# --- resize and crop -----------------------------------------------------------------------------


def test_image_at_target_size_is_untouched() -> None:
    img = photo("astronaut", max_side=128)
    out, crop = resize_and_crop(img, (128, 128), "lanczos")
    assert crop == (0, 0)
    assert out is img


def test_800x600_square_crop_offsets_and_original_size() -> None:
    img = photo("coffee").resize((800, 600), Image.Resampling.LANCZOS)
    out, crop = resize_and_crop(img, (512, 512), "lanczos")
    assert out.size == (512, 512)
    # covering size: 683 x 512 (512 * 800 / 600 = 682.7, rounded up to cover); centre crop
    assert crop == (0, (683 - 512) // 2)
    prepared = prepare({"__key__": "c", "jpg": encode(img, "PNG"), "txt": b"a cup"}, CFG)
    assert prepared.original_size == (600, 800) and prepared.crop_top_left == (0, 85)
    assert prepared.target_size == (512, 512) and prepared.pixels.shape == (512, 512, 3)
    reference = img.resize((683, 512), Image.Resampling.LANCZOS).crop((85, 0, 597, 512))
    assert psnr(np.asarray(reference), prepared.pixels) > 40


def test_800x600_with_buckets() -> None:
    img = photo("rocket").resize((800, 600), Image.Resampling.LANCZOS)
    prepared = prepare({"__key__": "r", "png": encode(img, "PNG")}, PreprocessConfig(buckets=True))
    h, w = prepared.target_size
    assert (h, w) == (448, 576)  # 1.29, the closest bucket to 4:3
    # covering size 597 x 448 (800 * 448 / 600 = 597.3); crop (597 - 576) // 2 = 10 from the left
    assert prepared.crop_top_left == (0, 10)
    assert prepared.pixels.shape == (448, 576, 3)


@pytest.mark.parametrize("target", [(512, 512), (384, 704), (704, 384), (256, 1024), (100, 37)])
def test_resize_and_crop_matches_resize_then_crop(target: tuple[int, int]) -> None:
    th, tw = target
    for name, img in real_photos(max_side=400)[:4]:
        out, (top, left) = resize_and_crop(img, target, "lanczos")
        assert out.size == (tw, th)
        w, h = img.size
        scale = max(th / h, tw / w)
        new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
        assert (new_w == tw or new_h == th) and new_w >= tw and new_h >= th
        assert (top, left) == ((new_h - th) // 2, (new_w - tw) // 2)
        full = img.resize((new_w, new_h), Image.Resampling.LANCZOS).crop((left, top, left + tw, top + th))
        assert psnr(np.asarray(full), np.asarray(out)) > 38, name


def test_long_thin_image_needs_no_huge_intermediate() -> None:
    img = Image.new("RGB", (2, 60_000), (10, 20, 30))  # covering 512x512 would be 512 x 15,360,000
    out, crop = resize_and_crop(img, (512, 512), "bicubic")
    assert out.size == (512, 512) and crop[1] == 0 and crop[0] > 7_000_000
    assert (px(out) == (10, 20, 30)).all()


def test_resample_filter_must_be_known() -> None:
    with pytest.raises(ValueError, match="resample='nearest'"):
        resize_and_crop(photo("chelsea", max_side=64), (32, 32), "nearest")


# --- prepare and tensors -------------------------------------------------------------------------


def test_prepare_keeps_extras_and_drops_image_and_meta() -> None:
    img = photo("grace_hopper", max_side=100)
    sample = {"__key__": "a/b/000001", "__url__": "s3://b/x.tar", "jpg": encode(img, "JPEG"),
              "png": encode(img, "PNG"), "txt": b"Grace Hopper", "json": b'{"id": 1}'}
    prepared = prepare(sample, PreprocessConfig(resolution=64))
    assert isinstance(prepared, PreparedSample)
    assert prepared.key == "a/b/000001"
    assert prepared.extras == {"txt": b"Grace Hopper", "json": b'{"id": 1}'}
    assert prepared.original_size == (img.height, img.width)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.flags.writeable


def test_to_model_input_layout_and_range() -> None:
    a = np.zeros((4, 6, 3), np.uint8)
    a[..., 0] = 255  # red plane
    a[0, 0] = (0, 128, 255)
    b = np.full((4, 6, 3), 255, np.uint8)
    t = to_model_input([a, b])
    assert t.shape == (2, 3, 4, 6) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[0, 0, 1, 1] == 1.0 and t[0, 1, 1, 1] == -1.0
    assert t[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert (t[1] == 1.0).all() and t.min() == -1.0


def test_to_model_input_rejects_mixed_sizes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="image 1"):
        to_model_input([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        to_model_input([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="empty"):
        to_model_input([])


def test_hflip_mirrors_columns() -> None:
    img = np.asarray(photo("chelsea", max_side=32))
    flipped = hflip(img)
    np.testing.assert_array_equal(flipped[:, 0], img[:, -1])
    np.testing.assert_array_equal(hflip(flipped), img)
    batch = np.stack([img, img])
    np.testing.assert_array_equal(hflip(batch)[1], flipped)
    assert flipped.flags.c_contiguous


# --- JPEG draft decoding --------------------------------------------------------------------------


def _big_jpeg(size=(2048, 1536), orientation: int | None = None) -> bytes:
    import io as _io

    img = photo("astronaut").resize(size, Image.Resampling.LANCZOS)
    buf = _io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("orientation, original", [(None, (1536, 2048)), (6, (2048, 1536))])
def test_jpeg_draft_keeps_geometry_and_is_close_to_a_full_decode(orientation, original):
    from pipeline.transforms import _decode

    data = _big_jpeg(orientation=orientation)
    full = prepare({"__key__": "k", "jpg": data}, PreprocessConfig(resolution=256))
    draft_cfg = PreprocessConfig(resolution=256, jpeg_draft=True)
    fast = prepare({"__key__": "k", "jpg": data}, draft_cfg)
    assert full.original_size == fast.original_size == original
    assert full.target_size == fast.target_size and full.crop_top_left == fast.crop_top_left
    assert peak_signal_noise_ratio(full.pixels, fast.pixels) > 35.0
    decoded, _ = _decode(data, draft_cfg, draft=True)
    assert max(decoded.size) == 512  # a quarter-scale DCT decode, still covering the 256 px target


def test_jpeg_draft_leaves_small_jpegs_and_other_formats_alone():
    small = _big_jpeg(size=(400, 300))  # needs a 0.85 scale: no DCT reduction applies
    for data, ext in ((small, "jpg"), (encode(photo("astronaut"), "PNG"), "png")):
        a = prepare({"__key__": "k", ext: data}, PreprocessConfig(resolution=256))
        b = prepare({"__key__": "k", ext: data}, PreprocessConfig(resolution=256, jpeg_draft=True))
        assert np.array_equal(a.pixels, b.pixels)
