"""Images in, `pixel_values` out: the runtime's version of Florence-2's image processor.

Florence-2 checkpoints name `CLIPImageProcessor` in `preprocessor_config.json`. In transformers 5
`AutoImageProcessor` turns that name into one of two backends: `CLIPImageProcessor` (torch +
torchvision, chosen whenever torchvision is importable) or `CLIPImageProcessorPil` (chosen otherwise).
Both convert to RGB the same way but resize differently:

- "pil": `PIL.Image.resize`, Pillow's bicubic with 22-bit fixed-point weights. This is what the
  original Florence-2 processor did and what transformers does without torchvision.
- "torchvision": `torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True)`, a port
  of Pillow's filter with 16-bit weights; it differs from Pillow by 1-2 grey levels on a few pixels
  (up to 0.035 in `pixel_values`). `_torch_resize` redoes it in numpy, bit for bit.

Both backends match their reference exactly (max abs diff 0.0 on every image we tried).

RGB conversion follows transformers' `convert_to_rgb`: a mode with an alpha band, or an image with
a "transparency" entry (a palette or colour key), is composited onto white; everything else goes
through `Image.convert("RGB")`. Where that gives garbage or an error we do the sane thing instead:

- 16-bit grey ("I;16", "I;16B", ...; what Pillow opens 16-bit PNG and TIFF files as): Pillow clips
  every value above 255 to white, so a 16-bit photo comes out almost all white. We scale
  0..65535 to 0..255 (`round(v / 257)`, the inverse of 8 -> 16 bit expansion).
- Premultiplied "La" (`convert("RGB")` raises) and "RGBa" (the reference drops the alpha): both
  are composited onto white like "LA" and "RGBA".

Other notes on `load_image`:
- Paths and bytes get their EXIF orientation applied (`PIL.ImageOps.exif_transpose`, as
  transformers' `load_image` does). PIL images and arrays are taken as they are: the reference
  processor does not rotate the images it is given either.
- transformers' `load_image(path)` drops the alpha channel (`.convert("RGB")`) while its processor
  composites a PIL image onto white; we composite for every kind of input.
- Decompression bombs: an encoded image with more than `max_pixels` pixels (default
  `DEFAULT_MAX_PIXELS` = 178,956,970, the size at which Pillow itself refuses, ~13,377 x 13,377) is
  refused from its header, before it is decoded. Pillow's own refusal at
  2 * `PIL.Image.MAX_IMAGE_PIXELS` still applies: to go beyond it, raise that too.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, InputError, ModelFolderError

DEFAULT_MAX_PIXELS = 178_956_970  # = 2 * Pillow's default MAX_IMAGE_PIXELS, where Pillow raises
BACKENDS = ("pil", "torchvision")

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

# transformers' CLIPImageProcessor defaults, for keys a config leaves out. A key set to null is
# off (a flag) or missing (a value), as in transformers.
_CLIP_DEFAULTS = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
_REQUIRED = {
    "do_resize": ("size", "resample"),
    "do_center_crop": ("crop_size",),
    "do_rescale": ("rescale_factor",),
    "do_normalize": ("image_mean", "image_std"),
}
_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class PreprocessedImages(NamedTuple):
    pixel_values: np.ndarray  # float32 [B, 3, H, W]
    image_sizes: list[tuple[int, int]]  # (width, height) of each image before resizing


# ---------------------------------------------------------------------------------------------
# Loading


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return `image` as an RGB PIL image (an RGB PIL image comes back as it is, not copied).

    Takes a path (str or PathLike), encoded bytes, a PIL image of any mode, or a uint8 numpy array
    of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (channels last: grey, RGB, RGBA).
    `max_pixels` (None: no limit) guards the decoding of paths and bytes. Raises ImageError.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ImageError("the image bytes are empty (0 bytes)")
        return _decode(io.BytesIO(data), f"image bytes ({len(data):,} bytes)", max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return _decode(_check_path(image), str(image), max_pixels)
    raise ImageError(
        f"cannot use an image of type {type(image).__name__}: pass a path, bytes, "
        "a PIL.Image.Image or a uint8 numpy array of shape (H, W), (H, W, 3) or (H, W, 4)"
    )


def _check_path(image: str | os.PathLike) -> Path:
    name = os.fspath(image)
    if isinstance(name, str) and name.startswith(("http://", "https://")):
        raise ImageError(f"flonnx does not download images; fetch {name} first and pass its bytes or path")
    path = Path(name)
    if not path.exists():
        raise ImageError(f"image file not found: {name}")
    if not path.is_file():
        raise ImageError(f"not an image file (a directory or special file): {name}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {name}")
    return path


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name} is too large to decode safely: {e} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels to accept it)"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not an image Pillow can read") from e
    except MemoryError:
        raise
    except Exception as e:  # a damaged header: Pillow's plugins raise OSError, ValueError, SyntaxError...
        raise ImageError(f"cannot read {name}: {type(e).__name__}: {e}") from e
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"{name} is {width}x{height} = {width * height:,} pixels, more than max_pixels="
                f"{max_pixels:,} (a guard against decompression bombs); pass a larger max_pixels to accept it"
            )
        try:
            image.load()  # Image.open is lazy: a truncated file only fails here
            image = ImageOps.exif_transpose(image)
        except MemoryError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, zlib.error...
            raise ImageError(f"cannot decode {name} ({image.format} {width}x{height}): {e}") from e
        return to_rgb(image)


def _array_to_pil(array: np.ndarray) -> Image.Image:
    valid = "a numpy image must be a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    if array.dtype != np.uint8:
        hint = (
            "; for floats in [0, 1] use (x * 255).round().astype(np.uint8)" if array.dtype.kind == "f" else ""
        )
        raise ImageError(f"{valid}, got dtype {array.dtype}{hint}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        channels_first = array.ndim == 3 and array.shape[0] in (3, 4)
        hint = "; for channels first use array.transpose(1, 2, 0)" if channels_first else ""
        raise ImageError(f"{valid} (channels last), got shape {array.shape}{hint}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"the numpy image has no pixels: shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))  # mode L, RGB or RGBA


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB like transformers' `convert_to_rgb` (see the module doc)."""
    if image.width == 0 or image.height == 0:
        raise ImageError(f"the image has no pixels: {image.width}x{image.height}")
    try:
        image.load()
        if image.mode.startswith("I;16"):
            image = _sixteen_bit_to_grey(image)
        elif image.mode in ("La", "RGBa"):
            image = image.convert(image.mode.upper())
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:
        size = f"{image.width}x{image.height}"
        raise ImageError(f"cannot convert a {image.mode} {size} image to RGB: {e}") from e


def _sixteen_bit_to_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.uint32)
    grey = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # round(v / 257)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):  # a 16-bit grey colour key
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


# ---------------------------------------------------------------------------------------------
# Transforms: each takes and returns an HxWxC array (uint8 until Rescale/Normalize, then float32).


@dataclass(frozen=True)
class Resize:
    """Resize to (height, width), or the shorter side to `shortest_edge` keeping the aspect ratio."""

    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    resample: int = 3
    backend: str = "pil"

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.shortest_edge is None:
            return self.height, self.width
        # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = self.output_size(*image.shape[:2])
        if self.backend == "pil":
            return np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))
        return _torch_resize(image, height, width, _RESAMPLE_NAMES[self.resample])


@dataclass(frozen=True)
class CenterCrop:
    height: int
    width: int

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if self.height > height or self.width > width:
            raise ImageError(
                f"cannot center-crop a {width}x{height} image to {self.width}x{self.height}: "
                "the preprocessor config crops more than it resized to"
            )
        top, left = (height - self.height) // 2, (width - self.width) // 2
        return image[top : top + self.height, left : left + self.width]


@dataclass(frozen=True)
class Rescale:
    factor: float
    backend: str = "pil"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.backend == "pil":  # transformers' rescale: float64 product, then float32
            return (image.astype(np.float64) * self.factor).astype(np.float32)
        return image.astype(np.float32) * np.float32(self.factor)  # torch: float32 product


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return (image.astype(np.float32, copy=False) - mean) / std


@dataclass(frozen=True)
class RescaleNormalize:
    """torchvision's fused rescale + normalize: (x - mean / factor) / (std / factor) in float32."""

    factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        scale = np.float32(1.0 / self.factor)
        mean = np.asarray(self.mean, dtype=np.float32) * scale
        std = np.asarray(self.std, dtype=np.float32) * scale
        return (image.astype(np.float32) - mean) / std


# ---------------------------------------------------------------------------------------------
# The processor


@dataclass(frozen=True)
class ImagePreprocessor:
    """The transforms of a `preprocessor_config.json`, applied to a batch of images."""

    transforms: tuple
    backend: str = "pil"

    @classmethod
    def from_config(cls, config: dict, backend: str = "pil") -> ImagePreprocessor:
        """Build from the dict of a checkpoint's `preprocessor_config.json`.

        `backend` picks the resize of the reference to match: "pil" (`CLIPImageProcessorPil`, the
        original Florence-2 processor) or "torchvision" (`CLIPImageProcessor` in transformers 5).
        Images are always converted to RGB, whatever `do_convert_rgb` says: Florence-2 checkpoints
        set it to null, which makes transformers pass RGBA, grey and palette images through
        unconverted and then fail ("mean must have 4 elements").
        """
        if backend not in BACKENDS:
            expected = ", ".join(BACKENDS)
            raise InputError(f"unknown preprocessing backend {backend!r}, expected one of: {expected}")
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _PROCESSOR_TYPES:
            raise ModelFolderError(
                f"preprocessor_config.json names image_processor_type {kind!r}; "
                f"flonnx implements: {', '.join(_PROCESSOR_TYPES)}"
            )
        if config.get("do_pad"):
            raise ModelFolderError("preprocessor_config.json sets do_pad: Florence-2 processors never pad")
        cfg = {key: config.get(key, default) for key, default in _CLIP_DEFAULTS.items()}
        for flag, keys in _REQUIRED.items():
            missing = [key for key in keys if cfg[flag] and cfg[key] is None]
            if missing:
                raise ModelFolderError(f"preprocessor_config.json: {flag} is true but {missing[0]} is null")

        transforms: list = []
        if cfg["do_resize"]:
            resample = cfg["resample"]
            supported = (2, 3) if backend == "torchvision" else tuple(_RESAMPLE_NAMES)
            if resample not in supported:
                names = ", ".join(f"{i} ({_RESAMPLE_NAMES[i]})" for i in supported)
                raise ModelFolderError(
                    f"resample={resample!r} is not supported by the {backend} backend: {names}"
                )
            size = _size(cfg["size"], "size", square=False)
            transforms.append(Resize(**size, resample=resample, backend=backend))
        if cfg["do_center_crop"]:
            crop = _size(cfg["crop_size"], "crop_size", square=True)
            transforms.append(CenterCrop(crop["height"], crop["width"]))
        if cfg["do_normalize"]:
            mean, std = (
                _per_channel(cfg["image_mean"], "image_mean"),
                _per_channel(cfg["image_std"], "image_std"),
            )
        if backend == "torchvision" and cfg["do_rescale"] and cfg["do_normalize"]:
            transforms.append(RescaleNormalize(float(cfg["rescale_factor"]), mean, std))
        else:
            if cfg["do_rescale"]:
                transforms.append(Rescale(float(cfg["rescale_factor"]), backend))
            if cfg["do_normalize"]:
                transforms.append(Normalize(mean, std))
        return cls(tuple(transforms), backend)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, backend: str = "pil") -> ImagePreprocessor:
        """Build from `<folder>/preprocessor_config.json`, or from the "image_processor" entry of
        `<folder>/processor_config.json`, where transformers 5 saves it instead."""
        return cls.from_config(load_preprocessor_config(folder), backend)

    def __call__(self, images: Sequence[ImageInput]) -> PreprocessedImages:
        if isinstance(images, (Image.Image, np.ndarray, str, bytes, os.PathLike)):
            images = [images]
        images = list(images)
        if len(images) == 0:
            raise InputError("no images to preprocess")
        arrays, sizes = [], []
        for image in images:
            rgb = load_image(image)
            sizes.append(rgb.size)
            array = np.asarray(rgb)
            for transform in self.transforms:
                array = transform(array)
            arrays.append(array.astype(np.float32, copy=False))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ImageError(
                f"the preprocessed images differ in size {sorted(shapes)}: they cannot be batched"
            )
        return PreprocessedImages(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)), sizes)


def load_preprocessor_config(folder: str | os.PathLike) -> dict:
    """The image-processor settings of a checkpoint or export folder (see `from_folder`)."""
    folder = Path(folder)
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"cannot read {path}: {e}") from e
        if key is not None:
            config = config.get(key) if isinstance(config, dict) else None
        if not isinstance(config, dict):
            raise ModelFolderError(f"{path} holds no image-processor settings")
        return config
    raise ModelFolderError(f"{folder} has neither preprocessor_config.json nor processor_config.json")


def preprocess(images: Sequence[ImageInput], config: dict, *, backend: str = "pil") -> PreprocessedImages:
    """`pixel_values` float32 [B, 3, H, W] and the (width, height) of each image, from a
    `preprocessor_config.json` dict. Images are PIL images or anything `load_image` takes."""
    return ImagePreprocessor.from_config(config, backend)(images)


def _size(value, name: str, square: bool) -> dict:
    # The forms transformers' get_size_dict accepts; an int means the shortest edge for CLIP's size.
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square else {"shortest_edge": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"height", "width"} or (not square and keys == {"shortest_edge"}):
            if all(isinstance(v, int) and v > 0 for v in value.values()):
                return dict(value)
    valid = '{"height": H, "width": W}' + ("" if square else ' or {"shortest_edge": S}')
    raise ModelFolderError(f"preprocessor_config.json: {name}={value!r} is not supported, expected {valid}")


def _per_channel(value, name: str) -> tuple[float, ...]:
    values = value if isinstance(value, Iterable) else [value] * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ModelFolderError(f"preprocessor_config.json: {name} must have 3 values (RGB), got {value!r}")
    return values


# ---------------------------------------------------------------------------------------------
# torch's uint8 antialiased resize (aten/src/ATen/native/cpu/UpSampleKernel.cpp), redone in numpy.
# Same filter and support as Pillow, but the weights are quantized to int16 with a precision
# chosen per axis so the largest weight fits, instead of Pillow's fixed 22 bits. Horizontal pass
# first, rounded to uint8, then vertical.


def _torch_resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    image = _torch_resize_axis(image, width, 1, mode)
    return _torch_resize_axis(image, height, 0, mode)


def _torch_resize_axis(image: np.ndarray, out_size: int, axis: int, mode: str) -> np.ndarray:
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    index, weights, precision = _torch_int16_weights(in_size, out_size, mode)
    source = np.ascontiguousarray(np.moveaxis(image, axis, 0))
    shape = (out_size,) + (1,) * (source.ndim - 1)
    total = np.full((out_size,) + source.shape[1:], 1 << (precision - 1), dtype=np.int32)
    for k in range(index.shape[1]):
        total += source[index[:, k]].astype(np.int32) * weights[:, k].reshape(shape)
    out = np.clip(total >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def _torch_filter(x: np.ndarray, mode: str) -> np.ndarray:
    x = np.abs(x)
    if mode == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # the antialiased bicubic uses Pillow's a = -0.5, not torch's usual -0.75
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _torch_int16_weights(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    scale = in_size / out_size
    support = (2.0 if mode == "bicubic" else 1.0) * max(scale, 1.0)
    taps = int(np.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - start, 0, taps)
    k = np.arange(taps)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    weights = _torch_filter((k + start[:, None] - center[:, None] + 0.5) * inverse, mode)
    weights = np.where(k < count[:, None], weights, 0.0)
    total = np.zeros(out_size)
    for j in range(taps):  # summed in order, like the C loop
        total += weights[:, j]
    normalized = total != 0.0
    weights[normalized] /= total[normalized, None]
    largest = weights[normalized].max(initial=0.0)
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    quantized = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    index = np.minimum(start[:, None] + k, in_size - 1)
    return index, quantized, precision
