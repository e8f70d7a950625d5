"""`--target web`: one variant of an export folder as a folder a browser loads with transformers.js,
and an offline page that runs it.

transformers.js in a browser hands onnxruntime-web each graph's external data by name: it fetches
`<graph><suffix>.onnx_data` (then `_data_1`, `_data_2`, ...) when `config.json`'s
`transformers.js_config.use_external_data_format` names the graph, and passes the bytes under that
name, so a graph must read its own file by exactly that name. flonnx's folders name weights
`<graph>.onnx.data`, and quantized variants keep the tied embedding table once for two graphs: in
the pack every graph is rewritten to read `<graph><suffix>.onnx_data` alone (a table two graphs
share is stored in each; the pack reports the cost). The graphs compute exactly what the source's
do: the tensors are the same bytes, only where they live changes.

Limits (onnxruntime-web on WebAssembly): an ArrayBuffer and a fetched file hold at most 2 GB, and
the whole WebAssembly heap holds 4 GB, where every weight is copied and the GEMM weights are
prepacked once more. A graph or data file past 2 GB, or a variant past 4 GB, is refused; past
2 GB the pack warns that the page will likely run out of memory (Florence-2 large in fp32, 3.1 GB).

The page (`index.html`, `app.js`) loads transformers.js and the onnxruntime-web WebAssembly files
from the pack itself (`lib/`, copied from the pinned npm package): no CDN, no remote model, no
browser cache of model files (a re-packed folder is never shadowed by an old copy).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from flonnx.runtime.folder import DTYPE_SUFFIXES
from flonnx.runtime.manifest import COMPONENTS

from .folder import PackError, read_variant

FILE_LIMIT = 2**31 - 1  # one ArrayBuffer / one fetched file in a browser
MEMORY_LIMIT = 2**32  # WebAssembly (wasm32) heap: weights, their prepacked copies, activations
MEMORY_WARNING = 2**31  # above this the weights and their prepacked copies leave little room
MODEL_DIR = "model"  # the pack's model folder: what `Florence2.load` and transformers.js read
LIBRARY_DIR = "lib"
PAGE_FILES = ("index.html", "app.js")
# What the page needs from the npm packages: transformers.js's browser bundle (onnxruntime-web's
# JavaScript included) and onnxruntime-web's WebAssembly build that transformers.js picks by
# default (asyncify: runs on WASM and on WebGPU). lib/NOTICE.txt names each package's version and
# licence, with its licence file where the package ships one.
TRANSFORMERS_JS = "@huggingface/transformers"
ONNXRUNTIME_WEB = "onnxruntime-web"
LIBRARY = {
    TRANSFORMERS_JS: ("dist/transformers.min.js",),
    ONNXRUNTIME_WEB: (
        "dist/ort-wasm-simd-threaded.asyncify.mjs",
        "dist/ort-wasm-simd-threaded.asyncify.wasm",
    ),
}
NOTICE = "NOTICE.txt"
INSTALL_HINT = (
    "install the pinned transformers.js with `npm ci --ignore-scripts` in flonnx's js/ folder "
    "(`make setup` does), or `npm install --ignore-scripts @huggingface/transformers` anywhere, and "
    "pass that node_modules folder as --node-modules"
)
SIZE_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file, as the export does


@dataclass(frozen=True)
class WebBuild:
    entry: dict  # component -> {"file", "dtype", "data"} relative to the model folder
    written: list[str]  # files written into the pack's model folder (relative to it)
    details: dict  # what goes under "pack" in flonnx.json
    warnings: list[str]


def default_node_modules() -> Path | None:
    """The node_modules flonnx's own js/ folder installs (a source checkout), if present."""
    candidate = Path(__file__).resolve().parents[1] / "js" / "node_modules"
    return candidate if (candidate / TRANSFORMERS_JS).is_dir() else None


def _package_dir(node_modules: Path, package: str) -> Path:
    # npm places a dependency beside its user or, when versions conflict, inside it
    for candidate in (node_modules / package, node_modules / TRANSFORMERS_JS / "node_modules" / package):
        if (candidate / "package.json").is_file():
            return candidate
    raise PackError(f"{package} is not installed in {node_modules}: {INSTALL_HINT}")


def find_library(node_modules: str | Path | None) -> dict[str, tuple[Path, dict]]:
    """package -> (its folder, its package.json), every file the page needs present."""
    if node_modules is None:
        node_modules = default_node_modules()
        if node_modules is None:
            raise PackError(f"transformers.js was not found: {INSTALL_HINT}")
    node_modules = Path(node_modules)
    if not node_modules.is_dir():
        raise PackError(f"--node-modules {node_modules} is not a folder: {INSTALL_HINT}")
    found = {}
    for package, files in LIBRARY.items():
        folder = _package_dir(node_modules, package)
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise PackError(
                f"{package} in {folder} has no {', '.join(missing)}: this version is not one the web "
                f"page was written for (transformers.js 4.x); {INSTALL_HINT}"
            )
        found[package] = (folder, json.loads((folder / "package.json").read_text()))
    return found


def transformers_js_dtype(component: str, file: str) -> str:
    """The transformers.js dtype whose suffix the graph's file name carries."""
    stem = Path(file).stem
    if not stem.startswith(component):
        raise PackError(f"{file} is not named after {component}: transformers.js could not find it")
    suffix = stem[len(component) :]
    for dtype, known in DTYPE_SUFFIXES.items():
        if suffix == known:
            return dtype
    expected = ", ".join(f"{component}{s}.onnx" for s in DTYPE_SUFFIXES.values())
    raise PackError(f"{file}: transformers.js loads only {expected}")


def portable_lookups(model) -> int:
    """Rewrite each 8-bit `GatherBlockQuantized` (flonnx's tied embedding lookup) into standard ONNX
    operators over the same tables; returns how many. onnxruntime-web's WebAssembly build has no
    kernel for it ("Could not find an implementation for GatherBlockQuantized(1)").

    The contrib operator computes `(code - 128) * scale` per block of `block_size` columns (uint8
    codes, no zero points: the default 128). The rewrite gathers the rows of codes and of scales and
    computes the same products in the scales' type: an 8-bit integer times a scale is exact before
    its one rounding, as in the contrib kernel, so the rows are bitwise equal (the pack's check
    compares every row of the vocabulary)."""
    import onnx
    from onnx import helper

    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    rewritten, nodes = 0, []
    for node in model.graph.node:
        if node.op_type != "GatherBlockQuantized":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        codes, scales = (weights.get(name) for name in (node.input[0], node.input[2]))
        supported = (
            len(node.input) == 3
            and attributes.get("bits") == 8
            and attributes.get("gather_axis", 0) == 0
            and attributes.get("quantize_axis") == 1
            and codes is not None
            and scales is not None
            and codes.data_type == onnx.TensorProto.UINT8
            and len(codes.dims) == 2
            and scales.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        )
        if not supported:
            raise PackError(
                f"node {node.name!r} is a GatherBlockQuantized that onnxruntime-web cannot run and flonnx "
                f"can rewrite only for 8-bit uint8 tables quantized along rows ({attributes})"
            )
        nodes += _lookup_nodes(model, node, int(attributes["block_size"]), codes, scales)
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def _lookup_nodes(model, node, block: int, codes, scales) -> list:
    """Standard operators computing what the GatherBlockQuantized `node` computes (see above)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    columns = int(codes.dims[1])
    blocks = columns // block
    if blocks * block != columns:
        raise PackError(f"node {node.name!r}: {columns} columns are not whole blocks of {block}")
    name = node.name or node.output[0]
    kind = np.float32 if scales.data_type == onnx.TensorProto.FLOAT else np.float16

    def constant(suffix: str, value) -> str:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"{name}/{suffix}"))
        return f"{name}/{suffix}"

    def step(op: str, inputs: list[str], suffix: str, **attributes):
        return helper.make_node(op, inputs, [f"{name}/{suffix}"], name=f"{name}/{suffix}", **attributes)

    zero_point = constant("zero_point", kind(128))
    by_block = constant("by_block", np.array([-1, blocks, block], np.int64))
    per_block = constant("per_block", np.array([-1, blocks, 1], np.int64))
    width = constant("width", np.array([columns], np.int64))
    ids = node.input[1]
    return [
        step("Gather", [node.input[0], ids], "codes", axis=0),
        step("Cast", [f"{name}/codes"], "codes_float", to=scales.data_type),
        step("Sub", [f"{name}/codes_float", zero_point], "centred"),
        step("Reshape", [f"{name}/centred", by_block], "blocks"),
        step("Gather", [node.input[2], ids], "scales", axis=0),
        step("Reshape", [f"{name}/scales", per_block], "scales_per_block"),
        step("Mul", [f"{name}/blocks", f"{name}/scales_per_block"], "rows"),
        step("Shape", [ids], "ids_shape"),
        step("Concat", [f"{name}/ids_shape", width], "rows_shape", axis=0),
        helper.make_node(
            "Reshape", [f"{name}/rows", f"{name}/rows_shape"], [node.output[0]], name=f"{name}/reshape"
        ),
    ]


def _rewrite(source: Path, target: Path, data_name: str) -> tuple[int, int]:
    """The graph at `source` (weights wherever they live) saved at `target`, the main graph's weights in
    `data_name` beside it; returns the bytes of that data file (0: every weight stays inline) and how
    many lookups `portable_lookups` rewrote.

    Weights inside `If` branches (the merged decoder's branch-only projections) stay inline:
    onnxruntime-web resolves external data it was handed by name for the main graph's initializers
    only ("external data path could not be canonicalized" for a branch's)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(source), load_external_data=True)
    lookups = portable_lookups(model)
    moved = 0
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) >= SIZE_THRESHOLD:
            set_external_data(tensor, location=data_name)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            moved += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    data = target.parent / data_name
    data.unlink(missing_ok=True)
    onnx.save(model, str(target))  # writes the tensors marked external to data_name, in order
    if not moved:
        return 0, lookups
    data.chmod(0o644)  # onnx writes it owner-only; a web server usually runs as another user
    return data.stat().st_size, lookups


def _size(path: Path) -> int:
    return path.stat().st_size


def check_fits(reads: dict[str, int], variant: str) -> list[str]:
    """Refuse what cannot load in a browser; the warnings for what likely cannot run there."""
    for component, size in reads.items():
        if size > MEMORY_LIMIT:
            raise PackError(
                f"{component} of variant {variant!r} holds {size / 2**30:.2f} GiB; a browser's WebAssembly "
                f"memory holds 4 GiB for all four graphs: pack a smaller variant (int8, int4)"
            )
    total = sum(reads.values())
    if total > MEMORY_LIMIT:
        raise PackError(
            f"variant {variant!r} holds {total / 2**30:.2f} GiB of weights; a browser's WebAssembly memory "
            f"holds 4 GiB: pack a smaller variant (int8, int4)"
        )
    if total > MEMORY_WARNING:
        return [
            f"variant {variant!r} holds {total / 2**30:.2f} GiB of weights: with their prepacked copies "
            f"and the activations, a page on WebAssembly (4 GiB) will likely run out of memory; int8 or "
            f"int4 fit"
        ]
    return []


def build(source: Path, manifest: dict, variant: str, staging: Path, progress) -> WebBuild:
    """Write `variant` of `source` as `MODEL_DIR/onnx/<graph><suffix>.onnx` + `.onnx_data` in `staging`."""
    found = read_variant(source, manifest, variant, progress, "a browser needs it in each graph's own file")
    files, reads = found.files, found.reads
    listed = manifest["variants"][variant]
    dtypes = {c: transformers_js_dtype(c, files[c]) for c in COMPONENTS}
    warnings = check_fits(reads, variant)

    model_dir = staging / MODEL_DIR
    entry, written, per_component, external = {}, [], {}, {}
    for component in COMPONENTS:
        graph = f"onnx/{component}{DTYPE_SUFFIXES[dtypes[component]]}.onnx"
        data_name = f"{Path(graph).name}_data"
        progress(f"{component}: {files[component]} -> {MODEL_DIR}/{graph} (+ {data_name})")
        data_bytes, lookups = _rewrite(source / files[component], model_dir / graph, data_name)
        if lookups:
            progress(f"{component}: {lookups} GatherBlockQuantized -> standard operators (onnxruntime-web)")
        graph_bytes = _size(model_dir / graph)
        for name, size in ((graph, graph_bytes), (data_name, data_bytes)):
            if size > FILE_LIMIT:
                raise PackError(
                    f"{name} would hold {size / 2**30:.2f} GiB; a browser loads at most 2 GiB a file"
                )
        entry[component] = {"file": graph, "dtype": listed[component].get("dtype")}
        written.append(graph)
        if data_bytes:
            entry[component]["data"] = [f"onnx/{data_name}"]
            written.append(f"onnx/{data_name}")
            external[Path(graph).name] = 1
        per_component[component] = {
            "source_reads": reads[component],
            "graph": graph_bytes,
            "data": data_bytes,
            "transformers_js_dtype": dtypes[component],
            "rewritten_lookups": lookups,
        }
    details = {
        "format": "transformers.js model folder (one external-data file per graph) and an offline page",
        "model_dir": MODEL_DIR,
        # transformers.js loads the text encoder by its file name (encoder_model) but lists the files
        # to load, when a page follows the progress, by its session name (model): name both
        "transformers_js": {
            "dtype": {**dtypes, "model": dtypes["encoder_model"]},
            "use_external_data_format": external,
        },
        "sizes": {
            "source_variant": found.source_bytes,
            "pack_graphs": sum(v["graph"] + v["data"] for v in per_component.values()),
            "per_component": per_component,
        },
        "shared_tables": found.shared,
        "duplicated_bytes": found.duplicated,
        "warnings": warnings,
    }
    return WebBuild(entry, written, details, warnings)


def write_config(source: Path, target: Path, details: dict) -> None:
    """config.json with the `transformers.js_config` that makes transformers.js load the pack's
    graphs and data files (what the folder had there is kept where the pack does not decide it)."""
    config = json.loads((source / "config.json").read_text())
    settings = dict(config.get("transformers.js_config") or {})
    settings.update(details["transformers_js"])
    config["transformers.js_config"] = settings
    target.write_text(json.dumps(config, indent=2) + "\n")


def write_page(staging: Path, library: dict[str, tuple[Path, dict]]) -> list[str]:
    """The page and the library it imports, from the pinned npm packages; returns what it wrote."""
    written = []
    page = Path(__file__).resolve().parent / "page"
    for name in PAGE_FILES:
        shutil.copyfile(page / name, staging / name)
        written.append(name)
    lib = staging / LIBRARY_DIR
    lib.mkdir(parents=True, exist_ok=True)
    notice = ["The files in this folder come from these npm packages, unchanged:", ""]
    for package, (folder, about) in library.items():
        for name in LIBRARY[package]:
            shutil.copyfile(folder / name, lib / Path(name).name)
            written.append(f"{LIBRARY_DIR}/{Path(name).name}")
        notice.append(f"{package} {about['version']} ({about.get('license', 'licence not stated')})")
        if (folder / "LICENSE").is_file():
            licence = f"LICENSE.{Path(package).name}"
            shutil.copyfile(folder / "LICENSE", lib / licence)
            written.append(f"{LIBRARY_DIR}/{licence}")
            notice[-1] += f": {licence}"
    (lib / NOTICE).write_text("\n".join(notice) + "\n")
    return [*written, f"{LIBRARY_DIR}/{NOTICE}"]
