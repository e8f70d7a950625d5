"""What `Florence2.load` reads from a model folder: the graphs of a variant, the model's shape and
its settings, with or without a `flonnx.json`.

Two kinds of folders load through this one path:
- flonnx export folders: `flonnx.json` lists the variants, every file's size and sha256, and the
  model's shape; files it lists are verified against it.
- folders without it, such as onnx-community's (the transformers.js layout: the same four graphs
  under `onnx/`, weights inside each file, variants by file suffix): the shape comes from
  `config.json` and is checked against the decoder graph's inputs, and a warning says once that the
  files are unverified.
In both, a variant is a name the manifest lists (`int8`), a transformers.js dtype (`q4`, see
`DTYPE_SUFFIXES`), or a dtype per component (`{"vision_encoder": "fp16", "decoder_model_merged":
"q4"}`; a component left out is fp32, as in transformers.js on a CPU). Paths that would leave the
folder (absolute, `..`, symlinks pointing out) are refused before anything is opened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, ModelFolderError
from .manifest import COMPONENTS, MANIFEST, component_data_files

# transformers.js dtype names and the file suffixes they load (src/utils/dtypes.js).
DTYPE_SUFFIXES = {
    "fp32": "",
    "fp16": "_fp16",
    "q8": "_quantized",
    "int8": "_int8",
    "uint8": "_uint8",
    "q4": "_q4",
    "q4f16": "_q4f16",
    "bnb4": "_bnb4",
}
# Files the runtime reads besides the graphs; the others are optional.
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def inside(folder: Path, relative: str, what: str = "") -> Path:
    """`folder / relative`, refused when it is absolute or resolves (symlinks too) outside `folder`."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise ModelFolderError(f"{what or 'path'} {relative!r} is not a path inside {folder}")
    path = folder / relative
    root = folder.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ModelFolderError(f"{what or 'path'} {relative!r} leaves the folder {folder}; refused")
    return path


def check_links(folder: Path) -> None:
    """No file the runtime may open (the folder's own files and onnx/, where external weights
    live) is a symlink to somewhere outside the folder. (onnxruntime itself refuses external-data
    locations that are absolute or climb out with `..`.)"""
    for path in (
        [*folder.iterdir(), *(folder / "onnx").glob("*")] if (folder / "onnx").is_dir() else folder.iterdir()
    ):
        if path.is_symlink():
            inside(folder, str(path.relative_to(folder)), "file")


def read_json(folder: Path, name: str, required: bool = True) -> dict:
    path = inside(folder, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelFolderError(f"{path} is missing") from None
        return {}
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} does not hold a JSON object")
    return data


def require_graphs(folder: Path) -> None:
    """A folder without a manifest must at least hold ONNX graphs where the layout puts them."""
    if not folder.is_dir():
        raise ModelFolderError(f"model folder not found: {folder}")
    if not any((folder / "onnx").glob("*.onnx")):
        raise ModelFolderError(
            f"{folder} is not a model folder: no {MANIFEST} (flonnx export) and no onnx/*.onnx graphs"
        )


@dataclass(frozen=True)
class Selection:
    """The files of one variant: graph per component, external data, and which of them the
    manifest records (and so can verify)."""

    label: str
    files: dict[str, str]
    data: tuple[str, ...]
    listed: tuple[str, ...]
    dtypes: dict[str, str]  # per component: the manifest's label, else the transformers.js dtype


def _check_dtype(dtype: object, where: str) -> str:
    if dtype not in DTYPE_SUFFIXES:
        raise InputError(f"unknown dtype {dtype!r}{where}; expected one of: {', '.join(DTYPE_SUFFIXES)}")
    return dtype


def default_variant(manifest: dict | None) -> str:
    """fp32, or the only variant a manifest lists (a pack lists one, named as in its source)."""
    listed = list((manifest or {}).get("variants", {}))
    return listed[0] if len(listed) == 1 else "fp32"


def parse_dtype(text: str) -> str | dict[str, str]:
    """`q4` or `vision_encoder=fp16,decoder_model_merged=q4` (the CLI's --dtype) to a variant."""
    if "=" not in text:
        return _check_dtype(text.strip(), "")
    chosen = {}
    for part in text.split(","):
        component, _, dtype = part.partition("=")
        chosen[component.strip()] = dtype.strip()
    return chosen


def select(folder: Path, manifest: dict | None, variant: str | Mapping[str, str]) -> Selection:
    """The files a variant loads; raises InputError naming what is available when it is unknown."""
    listed_variants = (manifest or {}).get("variants", {})
    records = (manifest or {}).get("files", {})
    if isinstance(variant, str) and variant in listed_variants:
        entry = listed_variants[variant]
        missing = [c for c in COMPONENTS if not isinstance(entry.get(c), dict) or "file" not in entry[c]]
        if missing:
            raise ModelFolderError(f"{MANIFEST} variant {variant!r} has no file for {', '.join(missing)}")
        files = {c: entry[c]["file"] for c in COMPONENTS}
        dtypes = {c: str(entry[c].get("dtype", "?")) for c in COMPONENTS}
        data: list[str] = []
        for component in COMPONENTS:
            data += [d for d in component_data_files(manifest, variant, component) if d not in data]
        label = variant
    else:
        if isinstance(variant, Mapping):
            unknown = [c for c in variant if c not in COMPONENTS]
            if unknown:
                raise InputError(
                    f"unknown component {unknown[0]!r} in the dtype; "
                    f"expected some of: {', '.join(COMPONENTS)}"
                )
            dtypes = {c: _check_dtype(variant.get(c, "fp32"), f" for {c}") for c in COMPONENTS}
            label = ",".join(f"{c}={d}" for c, d in dtypes.items() if d != "fp32") or "fp32"
        elif isinstance(variant, str) and variant in DTYPE_SUFFIXES:
            dtypes = dict.fromkeys(COMPONENTS, variant)
            label = variant
        else:
            names = [*listed_variants, *(d for d in DTYPE_SUFFIXES if d not in listed_variants)]
            raise InputError(f"unknown variant {variant!r} for {folder}; available: {', '.join(names)}")
        files = {c: f"onnx/{c}{DTYPE_SUFFIXES[d]}.onnx" for c, d in dtypes.items()}
        # A dtype file the manifest records (flonnx's int8 is transformers.js's q8) is verified too.
        data = []
        for name, entry in listed_variants.items():
            for component in COMPONENTS:
                if entry.get(component, {}).get("file") == files[component]:
                    data += [d for d in component_data_files(manifest, name, component) if d not in data]
        absent = [f for f in files.values() if not inside(folder, f, "graph").is_file()]
        if absent:
            present = sorted(p.name for p in (folder / "onnx").glob("*.onnx"))
            named = f"; variants in {MANIFEST}: {', '.join(listed_variants)}" if listed_variants else ""
            raise InputError(
                f"{folder} has no {', '.join(absent)} for variant {label!r}; "
                f"graphs present: {', '.join(present) or 'none'}{named}"
            )
    for name in [*files.values(), *data]:
        inside(folder, name, f"{MANIFEST} entry")
    listed = tuple(name for name in [*files.values(), *data] if name in records)
    return Selection(label, files, tuple(data), listed, dtypes)


@dataclass(frozen=True)
class ModelShape:
    """What the request pipeline needs to know of the model beyond its graphs."""

    num_image_tokens: int
    max_positions: int
    layers: int
    heads: int
    head_dim: int
    vocab_size: int


def _positive(value: object, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelFolderError(f"{source}: {name} must be a positive integer, got {value!r}")
    return value


def model_shape(manifest: dict | None, config: dict, preprocessor: dict) -> ModelShape:
    """From the manifest when there is one, else from config.json and preprocessor_config.json."""
    if manifest is not None:
        model = manifest.get("model", {})
        keys = ("num_image_tokens", "max_position_embeddings", "decoder_layers", "decoder_heads", "head_dim")
        values = [_positive(model.get(k), k, MANIFEST) for k in keys]
        return ModelShape(*values, vocab_size=int(model.get("vocab_size", 0)))
    text = config.get("text_config") or config
    source = "config.json text_config"
    layers = _positive(text.get("decoder_layers"), "decoder_layers", source)
    heads = _positive(text.get("decoder_attention_heads"), "decoder_attention_heads", source)
    d_model = _positive(text.get("d_model"), "d_model", source)
    if d_model % heads:
        raise ModelFolderError(f"{source}: d_model {d_model} is not a multiple of {heads} heads")
    tokens = preprocessor.get("image_seq_length")
    if tokens is None:
        size = preprocessor.get("size") or {"height": 768, "width": 768}
        tokens = (int(size.get("height", 768)) // 32) * (int(size.get("width", 768)) // 32) + 1
    return ModelShape(
        num_image_tokens=_positive(tokens, "image_seq_length", "preprocessor_config.json"),
        max_positions=_positive(text.get("max_position_embeddings", 1024), "max_position_embeddings", source),
        layers=layers,
        heads=heads,
        head_dim=d_model // heads,
        vocab_size=int(text.get("vocab_size", 0)),
    )


def check_decoder(session, shape: ModelShape, path: str) -> None:
    """The decoder graph's cache inputs must be the ones the shape implies (config.json can lie)."""
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    layers = sum(1 for i in pasts if i.name.endswith(".decoder.key"))
    if layers != shape.layers:
        raise ModelFolderError(
            f"{path} has cache inputs for {layers} decoder layers; the config says {shape.layers}"
        )
    for item in pasts:
        heads, head_dim = item.shape[1], item.shape[3]
        if (isinstance(heads, int) and heads != shape.heads) or (
            isinstance(head_dim, int) and head_dim != shape.head_dim
        ):
            raise ModelFolderError(
                f"{path}: {item.name} is {item.shape}; config implies {shape.heads} heads of {shape.head_dim}"
            )


def generation_settings(folder: Path, manifest: dict | None, config: dict) -> tuple[dict, list[str]]:
    """generation_config.json, and the special ids corrected from config.json's text_config where a
    folder without a manifest disagrees with it (fine-tunes carry bos 2 / eos 1 / pad 0 there; the
    original model generated with text_config's). Returns the settings and what was corrected."""
    settings = read_json(folder, "generation_config.json", required=manifest is not None)
    text = config.get("text_config")
    corrected = []
    if manifest is None and isinstance(text, dict):
        for key in SPECIAL_IDS:
            if key in text and settings.get(key, text[key]) != text[key]:
                corrected.append(f"{key} {settings[key]} -> {text[key]}")
                settings[key] = text[key]
        if not settings:  # no generation_config.json: what the original model took from text_config
            for key in ("num_beams", "no_repeat_ngram_size", "early_stopping", "forced_bos_token_id"):
                if key in text:
                    settings[key] = text[key]
            settings.update({k: text[k] for k in SPECIAL_IDS if k in text})
            settings.setdefault("forced_eos_token_id", text.get("forced_eos_token_id", 2))
    return settings, corrected
