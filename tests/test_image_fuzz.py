"""Robustness campaign, images: every format Pillow writes, valid and mutated (flipped, truncated,
spliced bytes, wrong extension), plus the awkward valid kinds (animated GIF, multi-frame TIFF,
16-bit, palette with transparency, broken EXIF, CMYK / LAB / YCbCr JPEG, 1-pixel and very long
images, decompression bombs). Each gives pixels of the right shape or an ImageError, never another
exception, within a deadline per case and under the pixel guard."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flonnx.runtime.errors import ImageError
from flonnx.runtime.preprocess import ImagePreprocessor, load_image

FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "ICO", "PPM", "TGA", "PCX", "DIB", "JPEG2000")
SIZE = 64
PREPROCESS = ImagePreprocessor.from_config({"size": {"height": SIZE, "width": SIZE}, "do_center_crop": False})
CASES = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = _picture(rng, 37, 23)
    files = {}
    for fmt in FORMATS:
        try:
            files[fmt] = _encode(rgb if fmt != "ICO" else rgb.resize((32, 32)), fmt)
        except (OSError, KeyError):  # a codec this Pillow build lacks
            continue
    frames = [_picture(rng, 20, 10) for _ in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["animated GIF"] = out.getvalue()
    out = io.BytesIO()
    frames[0].save(out, format="TIFF", save_all=True, append_images=frames[1:])
    files["multi-frame TIFF"] = out.getvalue()
    files["16-bit PNG"] = _encode(Image.fromarray(rng.integers(0, 65535, (9, 11), dtype=np.uint16)), "PNG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["palette PNG with transparency"] = _encode(palette, "PNG", transparency=3)
    files["LA PNG"] = _encode(rgb.convert("LA"), "PNG")
    files["CMYK JPEG"] = _encode(rgb.convert("CMYK"), "JPEG")
    files["YCbCr JPEG"] = _encode(rgb.convert("YCbCr"), "JPEG")
    files["LAB TIFF"] = _encode(rgb.convert("LAB"), "TIFF")
    files["1-bit BMP"] = _encode(rgb.convert("1"), "BMP")
    files["1x1 PNG"] = _encode(_picture(rng, 1, 1), "PNG")
    files["1x4000 PNG"] = _encode(_picture(rng, 1, 4000), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 99  # an orientation that does not exist
    files["bad EXIF orientation JPEG"] = _encode(rgb, "JPEG", exif=exif.tobytes())
    files["garbage EXIF JPEG"] = _encode(rgb, "JPEG", exif=b"Exif\x00\x00MM\x00*" + bytes(40))
    return files


VALID = _valid_files()


def _check(data: bytes) -> None:
    """Pixels of the right shape, or an ImageError; anything else fails the test."""
    started = time.perf_counter()
    try:
        image = load_image(data)
    except ImageError:
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    batch = PREPROCESS([image])
    assert batch.pixel_values.shape == (1, 3, SIZE, SIZE) and np.isfinite(batch.pixel_values).all()
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_kinds_give_pixels(name, tmp_path):
    image = load_image(VALID[name])
    assert image.mode == "RGB"
    _check(VALID[name])
    wrong = tmp_path / "image.txt"  # a wrong extension does not matter: the content decides
    wrong.write_bytes(VALID[name])
    assert load_image(wrong).size == image.size


@CASES
@given(
    name=st.sampled_from(sorted(VALID)),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "insert", "zero"]), st.floats(0, 1), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_files_give_pixels_or_an_image_error(name, edits):
    data = bytearray(VALID[name])
    for kind, where, value in edits:
        at = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "flip" and data:
            data[at] ^= value or 1
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = bytes([value]) * 16
        elif kind == "zero":
            data[at : at + 64] = bytes(len(data[at : at + 64]))
    _check(bytes(data))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_decompression_bombs_are_refused_before_decoding(fmt):
    """A header that claims a huge image: refused by the pixel guard, not by running out of memory."""
    bomb = Image.new("1" if fmt != "GIF" else "P", (30000, 30000))
    data = _encode(bomb, fmt)
    assert len(data) < 2_000_000 or fmt == "BMP"
    with pytest.raises(ImageError, match="too large|max_pixels"):
        load_image(data)


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_zero_dimension_images_are_refused(size):
    with pytest.raises(ImageError, match="no pixels"):
        load_image(Image.new("RGB", size))
