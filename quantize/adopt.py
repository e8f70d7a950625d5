"""A folder of Florence-2 graphs without `flonnx.json` (onnx-community's layout) described by one,
so that `flonnx quantize` can add variants to it from its fp32 graphs.

The manifest records what the folder holds as it is: the four fp32 graphs and the configuration
files with their sizes and hashes, the model's shape from `config.json` (checked against the
decoder graph by the runtime), and `source.format = "onnx-community"`. Its other graphs (the
`_quantized`, `_q4`, ... files onnx-community published) stay untouched and unlisted: flonnx never
writes over them (a recipe whose suffix they use needs `--variant NAME`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import onnx

from flonnx.runtime.folder import model_shape, read_json, require_graphs, select
from flonnx.runtime.manifest import (
    COMPONENTS,
    CONFIG_FILES,
    FORMAT_VERSION,
    MANIFEST,
    file_record,
    write_json_atomic,
)

SOURCE_FORMAT = "onnx-community"


def _io(path: Path) -> dict:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return {
        "inputs": [i.name for i in graph.input if i.name not in initializers],
        "outputs": [o.name for o in graph.output],
    }


def describe(folder: Path) -> dict:
    """The manifest of a folder without one."""
    require_graphs(folder)
    config = read_json(folder, "config.json")
    preprocessor = read_json(folder, "preprocessor_config.json")
    shape = model_shape(None, config, preprocessor)
    fp32 = select(folder, None, "fp32").files
    data = [
        str(path.relative_to(folder))
        for graph in fp32.values()
        for path in sorted((folder / graph).parent.glob(f"{Path(graph).name}*data*"))
    ]
    files = [*fp32.values(), *data, *(name for name in CONFIG_FILES if (folder / name).is_file())]
    size = preprocessor.get("size") or {}
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "id": str(folder.resolve()),
            "format": SOURCE_FORMAT,
            # the folder's own graphs, which flonnx must never write over
            "own_graphs": sorted(str(p.relative_to(folder)) for p in folder.glob("onnx/*.onnx")),
        },
        "model": {
            "image_size": size.get("height"),
            "num_image_tokens": shape.num_image_tokens,
            "d_model": shape.heads * shape.head_dim,
            "decoder_layers": shape.layers,
            "decoder_heads": shape.heads,
            "head_dim": shape.head_dim,
            "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_positions,
        },
        "variants": {"fp32": {name: {"file": fp32[name], "dtype": "fp32"} for name in COMPONENTS}},
        "io": {name: _io(folder / fp32[name]) for name in COMPONENTS},
        "files": {name: file_record(folder, name) for name in files},
        "validation": None,
    }


def adopt(folder: str | Path) -> dict:
    """Write `flonnx.json` for a folder that has none; returns it."""
    folder = Path(folder)
    manifest = describe(folder)
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def foreign_files(manifest: dict, targets: list[str]) -> list[str]:
    """Targets that are an adopted folder's own graphs (onnx-community's variants), not flonnx's."""
    source = manifest.get("source", {})
    if source.get("format") != SOURCE_FORMAT:
        return []
    fp32 = {entry["file"] for entry in manifest["variants"]["fp32"].values()}
    own = set(source.get("own_graphs", [])) - fp32
    return [t for t in targets if t in own]
