"""Image loading and preprocessing against transformers' own image processors."""

from __future__ import annotations

import functools
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from flonnx.runtime.errors import ImageError, InputError, ModelFolderError
from flonnx.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImagePreprocessor,
    _torch_resize,
    load_image,
    load_preprocessor_config,
    preprocess,
    to_rgb,
)

# microsoft/Florence-2-base's preprocessor_config.json (the native conversions keep these values).
FLORENCE = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_center_crop": False,
    "image_processor_type": "CLIPImageProcessor",
    "image_seq_length": 577,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": {"height": 768, "width": 768},
    "crop_size": {"height": 768, "width": 768},
}
CONVERTING = {**FLORENCE, "do_convert_rgb": True}
SIZES = [(1, 1), (17, 33), (640, 480), (768, 768), (2000, 300)]
MODES = ["RGB", "RGBA", "LA", "L", "P", "CMYK", "1"]
TOLERANCE = 1e-5


def noise(width: int, height: int, channels: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def image_in_mode(mode: str, width: int, height: int) -> Image.Image:
    rgba = Image.fromarray(noise(width, height))
    return rgba if mode == "RGBA" else rgba.convert(mode)


def pil_reference(config: dict):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessorPil(**config)


def torchvision_reference(config: dict):
    """transformers' `CLIPImageProcessor` (torchvision backend), or its torch-only stand-in."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if transformers.utils.is_torchvision_available():
        processor = transformers.CLIPImageProcessor(**config)
        assert processor.backend == "torchvision"  # not the PIL fallback
        return processor
    return torch_only_clip_processor()(**config)


@functools.cache
def torch_only_clip_processor() -> type:
    """`CLIPImageProcessor` with its torchvision calls (`tvF.resize`, `tvF.normalize`, `tvF.crop`)
    redone in torch, for where torchvision is not installed (CI; PyPI's torchvision breaks beside
    our torch). Everything else is transformers' own code: the config's defaults, `convert_to_rgb`,
    the uint8 CHW tensors, batching, the fused rescale + normalize. Bit-identical to the real
    processor with torchvision 0.28 on the images and configs of this file.
    """
    import platform

    import torch
    from transformers.image_transforms import get_resize_output_image_size
    from transformers.image_utils import ChannelDimension
    from transformers.models.clip.image_processing_clip import CLIPImageProcessor

    class TorchOnlyCLIPImageProcessor(CLIPImageProcessor):
        def resize(self, image, size, resample=None, antialias=True, **kwargs):
            # TorchvisionBackend.resize: PIL resample -> torchvision InterpolationMode, output size
            mode = {None: "bilinear", 2: "bilinear", 3: "bicubic"}.get(
                None if resample is None else int(resample)
            )
            if mode is None:
                raise NotImplementedError(f"resample={resample!r} is not emulated")
            if (size.shortest_edge and size.longest_edge) or (size.max_height and size.max_width):
                raise NotImplementedError(f"size={size} is not emulated")
            if size.shortest_edge:
                new_size = get_resize_output_image_size(
                    image,
                    size=size.shortest_edge,
                    default_to_square=False,
                    input_data_format=ChannelDimension.FIRST,
                )
            elif size.height and size.width:
                new_size = (size.height, size.width)
            else:
                raise ValueError(f"bad size {size}")
            # torchvision.transforms.v2.functional.resize_image on a CPU tensor
            shape, dtype, numel = image.shape, image.dtype, image.numel()
            channels, height, width = shape[-3:]
            if tuple(new_size) == (height, width) or numel == 0:
                return image
            native_uint8 = mode == "bicubic" or (
                torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                or platform.machine() in ("aarch64", "arm64")
            )
            need_cast = dtype not in (
                (torch.float32, torch.float64) + ((torch.uint8,) if native_uint8 else ())
            )
            batch = image.reshape(-1, channels, height, width)
            strides = batch.stride()
            if (
                batch.is_contiguous(memory_format=torch.channels_last)
                and batch.shape[0] == 1
                and numel != strides[0]
            ):
                batch = batch.as_strided(batch.shape, (numel, *strides[1:]))
            if need_cast:
                batch = batch.to(torch.float32)
            batch = torch.nn.functional.interpolate(
                batch, size=list(new_size), mode=mode, align_corners=False, antialias=antialias
            )
            if need_cast:
                if mode == "bicubic" and dtype == torch.uint8:
                    batch = batch.clamp_(min=0, max=255)
                if not dtype.is_floating_point:
                    batch = batch.round_()
                batch = batch.to(dtype)
            return batch.reshape(shape[:-3] + (channels, *new_size))

        def normalize(self, image, mean, std, inplace=False, **kwargs):
            # tvF.normalize: mean and std as tensors of the image's dtype, then (x - mean) / std
            mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
            std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
            mean = mean.view(-1, 1, 1) if mean.ndim == 1 else mean
            std = std.view(-1, 1, 1) if std.ndim == 1 else std
            return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

        def center_crop(self, image, size, **kwargs):
            # TorchvisionBackend.center_crop without its padding; tvF.crop is a slice
            height, width = image.shape[-2:]
            if size.height > height or size.width > width:
                raise NotImplementedError("center-cropping beyond the image (padding) is not emulated")
            top, left = int((height - size.height) / 2.0), int((width - size.width) / 2.0)
            return image[..., top : top + size.height, left : left + size.width]

    return TorchOnlyCLIPImageProcessor


def reference_pixels(processor, image: Image.Image) -> np.ndarray:
    return processor(image, return_tensors="np")["pixel_values"]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).max())


# --- pixel_values against the reference processors -------------------------------------------


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_pil_reference(mode, width, height):
    image = image_in_mode(mode, width, height)
    expected = reference_pixels(pil_reference(CONVERTING), image)
    got = preprocess([image], FLORENCE)
    assert got.pixel_values.shape == (1, 3, 768, 768)
    assert got.pixel_values.dtype == np.float32
    assert got.image_sizes == [(width, height)]
    assert max_diff(got.pixel_values, expected) <= TOLERANCE


@pytest.mark.parametrize("mode", ["I", "F", "YCbCr", "PA", "RGBX", "HSV", "LAB"])
def test_other_modes_match_pil_reference(mode):
    image = image_in_mode("RGBA" if mode == "PA" else "RGB", 40, 30)
    if mode == "PA":
        palette = image.convert("RGB").convert("P")
        image = Image.merge("PA", (palette, image.getchannel("A")))
        image.putpalette(palette.getpalette())
    elif mode in ("I", "F"):
        values = noise(40, 30, 1)[..., 0].astype(np.int32) * 2 - 100  # out of 0..255 on both sides
        image = Image.fromarray(values if mode == "I" else values.astype(np.float32))
    else:
        image = image.convert(mode)
    assert image.mode == mode
    expected = reference_pixels(pil_reference(CONVERTING), image)
    assert max_diff(preprocess([image], FLORENCE).pixel_values, expected) <= TOLERANCE


@pytest.mark.parametrize("mode", ["P", "RGB", "L"])
def test_transparency_key_is_composited_like_the_reference(mode):
    image = image_in_mode(mode, 20, 10)
    image.info["transparency"] = image.getpixel((0, 0))
    expected = reference_pixels(pil_reference(CONVERTING), image)
    got = preprocess([image], FLORENCE).pixel_values
    assert max_diff(got, expected) <= TOLERANCE
    opaque = image.copy()
    del opaque.info["transparency"]
    assert max_diff(got, preprocess([opaque], FLORENCE).pixel_values) > 1.0


def test_real_config_fails_in_transformers_but_converts_here():
    # Florence-2 ships do_convert_rgb=null: transformers then feeds RGBA through as 4 channels.
    image = image_in_mode("RGBA", 30, 20)
    with pytest.raises(ValueError, match="mean must have 4 elements"):
        reference_pixels(pil_reference(FLORENCE), image)
    expected = reference_pixels(pil_reference(CONVERTING), image)
    assert max_diff(preprocess([image], FLORENCE).pixel_values, expected) <= TOLERANCE
    rgb = image.convert("RGB")
    assert (
        max_diff(preprocess([rgb], FLORENCE).pixel_values, reference_pixels(pil_reference(FLORENCE), rgb))
        == 0
    )


@pytest.mark.parametrize("width,height", [(1, 1), (17, 33), (640, 480), (2000, 300)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_matches_torchvision_reference(mode, width, height):
    image = image_in_mode(mode, width, height)
    expected = reference_pixels(torchvision_reference(CONVERTING), image)
    got = preprocess([image], FLORENCE, backend="torchvision").pixel_values
    assert max_diff(got, expected) <= TOLERANCE


CONFIG_VARIANTS = [
    {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
    {"size": {"height": 96, "width": 160}, "resample": 2},
    {"size": {"height": 64, "width": 64}, "resample": 0},
    {"size": {"height": 64, "width": 64}, "do_normalize": False},
    {"size": {"height": 64, "width": 64}, "do_rescale": False},
    {"size": {"height": 64, "width": 64}, "rescale_factor": 0.5, "image_mean": 0.5, "image_std": 0.25},
    {"size": {"height": 64, "width": 64}, "do_normalize": None, "do_rescale": None},
    {"size": {"height": 64, "width": 64}, "do_normalize": False, "image_mean": None, "image_std": None},
]


# The torchvision backend only does bilinear and bicubic: resample=0 there is a test_bad_configs case.
@pytest.mark.parametrize(
    "changes,backend",
    [
        (changes, backend)
        for backend in ("pil", "torchvision")
        for changes in CONFIG_VARIANTS
        if not (backend == "torchvision" and changes.get("resample") == 0)
    ],
)
def test_config_variants_match_reference(changes, backend):
    config = {**CONVERTING, **changes}
    reference = (pil_reference if backend == "pil" else torchvision_reference)(config)
    for width, height in [(300, 200), (90, 150)]:
        image = image_in_mode("RGB", width, height)
        expected = reference_pixels(reference, image)
        got = preprocess([image], config, backend=backend).pixel_values
        assert max_diff(got, expected) <= TOLERANCE


def test_defaults_are_clip_defaults():
    config = {"image_processor_type": "CLIPImageProcessor"}
    image = image_in_mode("RGB", 300, 200)
    expected = reference_pixels(pil_reference(config), image)
    assert expected.shape == (1, 3, 224, 224)
    assert max_diff(preprocess([image], config).pixel_values, expected) <= TOLERANCE


def test_checkpoint_folder_matches_auto_processor(tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    # CLIPImageProcessorPil here; CLIPImageProcessor (backend "torchvision") where torchvision is installed
    preprocessor = ImagePreprocessor.from_folder(tiny_model_dir, backend=reference.backend)
    modes = ["RGB", "RGBA", "L"]
    images = [image_in_mode(mode, w, h) for mode, (w, h) in zip(modes, SIZES[1:4], strict=True)]
    got = preprocessor(images)
    expected = reference(images, return_tensors="np")["pixel_values"]
    assert max_diff(got.pixel_values, expected) <= TOLERANCE
    assert got.image_sizes == [image.size for image in images]


def test_white_image_golden_values():
    pixels = preprocess([Image.new("RGB", (50, 70), "white")], FLORENCE).pixel_values
    expected = [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]
    np.testing.assert_allclose(pixels[0].mean(axis=(1, 2)), expected, rtol=1e-6)
    np.testing.assert_allclose(pixels[0, :, 0, 0], [2.2489083, 2.4285715, 2.64], rtol=1e-6)


# --- where we deliberately differ from transformers ------------------------------------------


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    eight = noise(33, 17, 1)[..., 0]
    sixteen = Image.fromarray(eight.astype(np.uint16) * 257)
    if mode != sixteen.mode:
        sixteen = Image.frombytes(mode, sixteen.size, sixteen.tobytes("raw", mode))
    assert sixteen.mode == mode
    assert np.array_equal(np.asarray(to_rgb(sixteen))[..., 0], eight)
    expected = reference_pixels(pil_reference(CONVERTING), Image.fromarray(eight))
    assert max_diff(preprocess([sixteen], FLORENCE).pixel_values, expected) <= TOLERANCE
    # transformers clips everything above 255 to white instead
    clipped = reference_pixels(pil_reference(CONVERTING), sixteen)
    assert clipped.max() == pytest.approx((1 - 0.406) / 0.225) and np.median(clipped) > 2


def test_sixteen_bit_png_round_trip():
    values = np.array([[0, 257, 32768, 65535], [128, 129, 385, 386]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    grey = np.asarray(load_image(buffer.getvalue()))[..., 0]
    assert grey.tolist() == [[0, 1, 128, 255], [0, 1, 1, 2]]  # round(v / 257)


@pytest.mark.parametrize("premultiplied,plain", [("La", "LA"), ("RGBa", "RGBA")])
def test_premultiplied_alpha_is_composited(premultiplied, plain):
    image = image_in_mode(plain, 20, 10).convert(premultiplied)
    expected = reference_pixels(pil_reference(CONVERTING), image.convert(plain))
    assert max_diff(preprocess([image], FLORENCE).pixel_values, expected) <= TOLERANCE


# --- torch's uint8 antialiased resize --------------------------------------------------------


def torch_interpolate(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    resized = torch.nn.functional.interpolate(tensor, size=(height, width), mode=mode, antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "size", [(1, 1, 768, 768), (33, 17, 768, 768), (300, 2000, 768, 768), (3024, 4032, 96, 128)]
)
def test_torch_resize_is_bit_exact(mode, size):
    height, width, out_height, out_width = size
    image = noise(width, height, 3)
    expected = torch_interpolate(image, out_height, out_width, mode)
    assert np.array_equal(_torch_resize(image, out_height, out_width, mode), expected)


# Output sizes start at 2: torch itself fails an internal assert shrinking uint8 images to 1x1.
@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(1, 60),
    st.integers(2, 60),
    st.integers(2, 60),
    st.sampled_from(["bicubic", "bilinear"]),
)
def test_torch_resize_is_bit_exact_for_any_size(height, width, out_height, out_width, mode):
    image = noise(width, height, 3, seed=height * 61 + width)
    expected = torch_interpolate(image, out_height, out_width, mode)
    assert np.array_equal(_torch_resize(image, out_height, out_width, mode), expected)


def test_torchvision_normalization_is_bit_exact():
    # CLIPImageProcessor fuses rescale into normalize: mean and std are scaled by 1/rescale_factor.
    torch = pytest.importorskip("torch")
    image = Image.fromarray(noise(768, 768, 3))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32)
    mean = torch.tensor(FLORENCE["image_mean"]) * (1.0 / (1 / 255))
    std = torch.tensor(FLORENCE["image_std"]) * (1.0 / (1 / 255))
    expected = tensor.sub_(mean[:, None, None]).div_(std[:, None, None]).numpy()
    got = preprocess([image], FLORENCE, backend="torchvision").pixel_values[0]
    assert np.array_equal(got, expected)


def test_pil_and_torchvision_backends_differ_a_little():
    image = image_in_mode("RGB", 640, 480)
    pil = preprocess([image], FLORENCE).pixel_values
    torchvision = preprocess([image], FLORENCE, backend="torchvision").pixel_values
    assert 0.01 < max_diff(pil, torchvision) < 0.05  # 1-2 grey levels on a few pixels


# --- load_image ------------------------------------------------------------------------------


def jpeg_with_orientation(orientation: int) -> bytes:
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:4, :4] = 255  # a marker in the top-left corner shows the rotation
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_transformers_load_image(orientation, tmp_path):
    image_utils = pytest.importorskip("transformers.image_utils")
    data = jpeg_with_orientation(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    expected = np.asarray(image_utils.load_image(str(path)))
    assert expected.shape[:2] == ((16, 8) if orientation >= 5 else (8, 16))
    for source in (data, path, str(path)):
        got = load_image(source)
        assert got.mode == "RGB"
        assert np.array_equal(np.asarray(got), expected)
    # PIL images are taken as they are, like the reference processor does
    assert load_image(Image.open(io.BytesIO(data))).size == (16, 8)


def test_paths_and_bytes_equal_pil_input(tmp_path):
    image = image_in_mode("RGBA", 31, 17)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path = tmp_path / "alpha.png"
    path.write_bytes(buffer.getvalue())
    expected = np.asarray(load_image(image))
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert np.array_equal(np.asarray(load_image(bytearray(buffer.getvalue()))), expected)
    batch = preprocess([path, buffer.getvalue(), image], FLORENCE)
    assert np.array_equal(batch.pixel_values[0], batch.pixel_values[2])
    assert np.array_equal(batch.pixel_values[1], batch.pixel_values[2])


@pytest.mark.parametrize("shape", [(17, 33), (17, 33, 1), (17, 33, 3), (17, 33, 4), (1, 1, 3)])
def test_array_input_equals_pil_input(shape):
    array = noise(shape[1], shape[0], shape[2] if len(shape) == 3 else 1)
    if len(shape) == 2:
        array = array[..., 0]
    pil = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    assert np.array_equal(np.asarray(load_image(array)), np.asarray(load_image(pil)))
    assert np.array_equal(
        preprocess([array], FLORENCE).pixel_values, preprocess([pil], FLORENCE).pixel_values
    )
    strided = np.asfortranarray(array)  # any memory layout
    assert np.array_equal(np.asarray(load_image(strided)), np.asarray(load_image(pil)))


def test_batch_and_sizes():
    images = [image_in_mode("RGB", w, h) for w, h in SIZES]
    batch = preprocess(images, FLORENCE)
    assert batch.pixel_values.shape == (len(SIZES), 3, 768, 768)
    assert batch.pixel_values.flags.c_contiguous
    assert batch.image_sizes == SIZES
    pixel_values, sizes = batch  # unpacks like a tuple
    single = preprocess([images[2]], FLORENCE).pixel_values
    assert np.array_equal(pixel_values[2:3], single)
    assert np.array_equal(preprocess(images[2], FLORENCE).pixel_values, single)  # one image, no list


# --- bad input -------------------------------------------------------------------------------


def good_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64, 3)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.jpg", "not found: .*missing.jpg"),
        (lambda p: p, "not an image file"),
        (lambda p: write(p / "empty.png", b""), r"empty \(0 bytes\): .*empty.png"),
        (lambda p: write(p / "notes.txt", b"hello"), "notes.txt is not an image"),
        (lambda p: write(p / "cut.jpg", good_jpeg()[:1500]), "cannot decode .*cut.jpg"),
    ],
    ids=["missing", "directory", "empty", "text", "truncated"],
)
def test_bad_files(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        load_image(make(tmp_path))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", r"empty \(0 bytes\)"),
        (b"hello, world", "not an image"),
        (good_jpeg()[:1500], "cannot decode image bytes .*JPEG 64x64.*truncated"),
        (png_header_only(20000, 20000), "too large to decode safely"),
    ],
    ids=["empty", "text", "truncated", "pillow-bomb"],
)
def test_bad_bytes(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_image_already_opened_by_the_caller():
    image = Image.open(io.BytesIO(good_jpeg()[:1500]))  # lazy: opens fine
    with pytest.raises(ImageError, match="cannot convert a RGB 64x64 image to RGB: .*truncated"):
        load_image(image)


def test_pixel_limit():
    data = png_header_only(12_000, 12_000)  # 144M pixels: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ImageError, match=r"12000x12000 = 144,000,000 pixels, more than max_pixels=100,000,000"
        ):
            load_image(data, max_pixels=100_000_000)
    small = io.BytesIO()
    Image.new("RGB", (100, 50)).save(small, "PNG")
    with pytest.raises(ImageError, match="max_pixels=4,999"):
        load_image(small.getvalue(), max_pixels=4_999)
    assert load_image(small.getvalue(), max_pixels=5_000).size == (100, 50)
    assert load_image(Image.new("RGB", (100, 50)), max_pixels=10).size == (100, 50)  # decoded already
    assert DEFAULT_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS


def test_urls_are_not_fetched():
    with pytest.raises(ImageError, match="does not download"):
        load_image("https://example.com/cat.jpg")


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((8, 8, 3), np.float32), r"uint8 .*got dtype float32; for floats in \[0, 1\]"),
        (np.zeros((8, 8, 3), np.uint16), "got dtype uint16"),
        (np.zeros((8, 8), bool), "got dtype bool"),
        (np.zeros((3, 8, 8), np.uint8), r"got shape \(3, 8, 8\); for channels first use"),
        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
        (np.zeros(8, np.uint8), r"got shape \(8,\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), r"got shape \(1, 8, 8, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
    ],
)
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


@pytest.mark.parametrize("value", [42, [np.zeros((4, 4, 3), np.uint8)], None])
def test_bad_types(value):
    with pytest.raises(ImageError, match="cannot use an image of type .*: pass a path, bytes"):
        load_image(value)


def test_empty_pil_image():
    with pytest.raises(ImageError, match="no pixels: 0x0"):
        load_image(Image.new("RGB", (0, 0)))


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        load_image(b"")
    with pytest.raises(InputError):
        preprocess([], FLORENCE)


# --- configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,backend,message",
    [
        (
            {"image_processor_type": "SiglipImageProcessor"},
            "pil",
            "SiglipImageProcessor.*implements: CLIPImage",
        ),
        ({"do_pad": True}, "pil", "do_pad"),
        ({"size": {"longest_edge": 768}}, "pil", "size=.*longest_edge.* expected"),
        ({"size": None}, "pil", "do_resize is true but size is null"),
        ({"rescale_factor": None}, "pil", "do_rescale is true but rescale_factor is null"),
        ({"image_mean": [0.5, 0.5]}, "pil", "image_mean must have 3 values"),
        ({"resample": 1}, "torchvision", r"resample=1 .*torchvision backend: 2 \(bilinear\), 3 \(bicubic\)"),
        ({"resample": 0}, "torchvision", r"resample=0 .*torchvision backend: 2 \(bilinear\)"),
        ({"resample": 7}, "pil", "resample=7"),
        ({"do_center_crop": True, "crop_size": {"height": 1000, "width": 1000}}, "pil", None),
    ],
)
def test_bad_configs(changes, backend, message):
    config = {**FLORENCE, **changes}
    if message is None:  # only fails on an image
        with pytest.raises(ImageError, match="cannot center-crop a 768x768 image to 1000x1000"):
            preprocess([Image.new("RGB", (10, 10))], config)
        return
    with pytest.raises(ModelFolderError, match=message):
        ImagePreprocessor.from_config(config, backend)


def test_unknown_backend():
    with pytest.raises(
        InputError, match="unknown preprocessing backend 'cuda', expected one of: pil, torchvision"
    ):
        ImagePreprocessor.from_config(FLORENCE, backend="cuda")


def test_images_that_cannot_be_batched():
    config = {**FLORENCE, "do_resize": False}
    with pytest.raises(ImageError, match="differ in size"):
        preprocess([Image.new("RGB", (10, 10)), Image.new("RGB", (10, 12))], config)


def test_config_files(tmp_path):
    with pytest.raises(ModelFolderError, match="neither preprocessor_config.json nor processor_config.json"):
        ImagePreprocessor.from_folder(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": FLORENCE}))
    assert load_preprocessor_config(tmp_path) == FLORENCE
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="cannot read .*preprocessor_config.json"):
        ImagePreprocessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**FLORENCE, "size": {"height": 64, "width": 32}})
    )
    image = Image.new("RGB", (5, 5))
    assert ImagePreprocessor.from_folder(tmp_path)([image]).pixel_values.shape == (1, 3, 64, 32)


def test_runtime_imports_no_torch():
    heavy = "{'torch', 'transformers', 'torchvision'}"
    code = f"import sys, flonnx.runtime.preprocess; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
