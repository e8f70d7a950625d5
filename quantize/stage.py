"""`quantize(folder, recipe)`: add a quantized variant to an export folder, then measure it.

Consistency, in order: every new graph is written under a temporary name and loaded by
onnxruntime; the manifest first forgets files about to be replaced; the files are renamed into
place; the manifest then lists the variant. An interruption anywhere leaves the fp32 export
untouched and a manifest whose every listed file matches its record. The same recipe gives the
same bytes, so running it again rewrites nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flonnx.export.onnxfile import move_weights_out
from flonnx.runtime.errors import FlonnxError, InputError, ModelFolderError
from flonnx.runtime.manifest import (
    COMPONENTS,
    MANIFEST,
    read_manifest,
    sha256_file,
    stale_work,
    update_manifest,
    variant_data_files,
    variant_files,
    verify_files,
)

from .calibration import load_images
from .quantizer import QuantizeError, float_bytes, quantize_component, tie_embedding
from .recipes import VARIANT_NAME, ComponentRecipe, Recipe, get_recipe
from .report import Report, ReportOptions, measure

PROTOBUF_LIMIT = 2**31 - 1  # a single-file ONNX model cannot be larger
# How a variant's files are laid out; a variant written another way is rewritten, not kept.
LAYOUT = "graph + page-aligned .onnx.data per component; tied embedding once (format 2)"


class Progress:
    """One line per stage with the seconds elapsed since the run started."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.start = time.perf_counter()
        self.stream = stream
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=self.stream, flush=True)


@dataclass(frozen=True)
class QuantizeResult:
    folder: Path
    variant: str
    recipe: Recipe
    files: dict[str, str]  # component -> file, relative to the folder
    written: list[str]  # files this run wrote (empty when every file was already up to date)
    report: Report


def describe(recipe: ComponentRecipe) -> str:
    parts = []
    if recipe.matmul_bits == 8 and recipe.kernel == "dynamic":
        parts.append("dynamic int8 MatMuls" + (" per channel" if recipe.per_channel else ""))
    elif recipe.matmul_bits == 8:
        parts.append(f"8-bit MatMulNBits (block {recipe.block_size})")
    elif recipe.matmul_bits == 4:
        parts.append(f"4-bit MatMuls (block {recipe.block_size}, accuracy level {recipe.accuracy_level})")
        if recipe.eight_bit_roles:
            parts.append(f"{' and '.join(recipe.eight_bit_roles)} at 8 bits")
    if recipe.gather_tables_int8:
        parts.append("int8 embedding tables")
    if recipe.conv_weights_int8:
        parts.append("int8-stored conv weights")
    if recipe.fused_attention:
        parts.append("fused window attention")
    if recipe.float16:
        parts.append(("then " if parts else "") + "float16 with float32 inputs and outputs")
    return ", ".join(parts) or "fp32"


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError, onnx's own errors, OSError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelFolderError(f"cannot read {path}: not a valid ONNX model ({first})") from None


def _write_staged(staging: Path, name: str, data: bytes) -> Path:
    """Write a new file under its final name in a staging folder beside its destination: external
    data resolves there while the graph is checked, and a rename moves it into place."""
    staging.mkdir(exist_ok=True)
    path = staging / name
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    return path


def _stage_existing(staging: Path, path: Path) -> None:
    """Make an unchanged data file visible in the staging folder, for the load check: a copy, as
    onnxruntime (1.32) refuses external data with more than one hard link ("potential hardlink
    attack")."""
    target = staging / path.name
    if not target.exists():
        staging.mkdir(exist_ok=True)
        shutil.copyfile(path, target)


def _quantize_one(component: str, source, component_recipe: ComponentRecipe, vocab_size: int):
    try:
        return quantize_component(source, component_recipe, vocab_size)
    except FlonnxError:
        raise
    except Exception as error:  # onnxruntime's quantizer raises many types on odd graphs
        first = (str(error).strip().splitlines() or [""])[0]
        raise QuantizeError(f"cannot quantize {component}: {type(error).__name__}: {first}") from error


def _check_loads(path: Path, what: str) -> None:
    from flonnx.runtime.sessions import check_providers, create_session

    try:
        create_session(path, 1, check_providers(None))
    except ModelFolderError as error:
        raise QuantizeError(f"the {what} does not load: {str(error).split(': ', 1)[-1]}") from None


def _versions() -> dict:
    import onnx
    import onnxruntime

    from flonnx.runtime.info import version

    return {"flonnx": version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _variant_files(manifest: dict, variant: str) -> set[str]:
    """The graphs and external-data files a variant reads."""
    if variant not in manifest.get("variants", {}):
        return set()
    return {*variant_files(manifest, variant).values(), *variant_data_files(manifest, variant)}


def _forget(manifest: dict, variant: str) -> list[str]:
    """Remove a variant and the records of files no other variant uses; returns those files."""
    gone = _variant_files(manifest, variant)
    manifest.get("variants", {}).pop(variant, None)
    manifest.get("quantization", {}).pop(variant, None)
    still = set().union(*(_variant_files(manifest, other) for other in manifest.get("variants", {})))
    dropped = [
        name
        for name in list(manifest.get("files", {}))
        if name.startswith("onnx/") and (name.endswith(".onnx") or name in gone) and name not in still
    ]
    for name in dropped:
        del manifest["files"][name]
    return dropped


def _check_targets(manifest: dict, variant: str, targets: Mapping[str, str]) -> None:
    fp32 = set(variant_files(manifest, "fp32").values())
    for other, entry in manifest.get("variants", {}).items():
        if other == variant:
            continue
        for file in targets.values():
            if file in {e["file"] for e in entry.values()} and file not in fp32:
                raise InputError(
                    f"{file} belongs to variant {other!r}; choose another variant name with --variant"
                )


def quantize(
    folder: str | os.PathLike,
    recipe: str | Recipe = "int8",
    *,
    keep: Mapping[str, str] | None = None,
    variant: str | None = None,
    images: Sequence[str | os.PathLike] | None = None,
    options: ReportOptions | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Write `recipe`'s variant of the fp32 graphs in `folder`, list it in flonnx.json, and report.

    `keep` sets single components to another dtype (e.g. {"vision_encoder": "fp32"}); `variant`
    names the variant (default: the recipe's name; its files then carry the recipe's suffix).
    """
    folder = Path(folder)
    progress = progress or Progress()
    recipe = get_recipe(recipe).with_overrides(keep or {})
    name = variant or recipe.name
    if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or name == "fp32":
        raise InputError(
            f"variant name {name!r} must be lower-case letters, digits, '-' or '_', and not fp32"
        )
    suffix = recipe.suffix if name == recipe.name else f"_{name}"
    options = options or ReportOptions()
    calibration = load_images(list(images) if images else None)

    progress(f"checking the fp32 export in {folder}")
    if folder.is_dir() and not (folder / MANIFEST).exists():
        from .adopt import adopt

        progress(f"{folder} has no {MANIFEST}: describing its fp32 graphs in one (onnx-community layout)")
        adopt(folder)
    manifest = read_manifest(folder)
    if "fp32" not in manifest.get("variants", {}):
        raise ModelFolderError(
            f"{folder} holds no fp32 export to quantize (flonnx.json lists no fp32 variant)"
        )
    sources = variant_files(manifest, "fp32")
    verify_files(folder, manifest, sorted(_variant_files(manifest, "fp32")), full=True)
    vocab_size = int(manifest["model"]["vocab_size"])

    previous = manifest.get("quantization", {}).get(name)
    if _up_to_date(folder, manifest, name, previous, recipe, sources):
        progress(f"variant {name!r} is up to date (same recipe, fp32 graphs and tools): measuring only")
        return _measure(folder, name, recipe, [], calibration, options, progress)

    targets = {
        component: sources[component]
        if recipe.component(component).dtype == "fp32"
        else f"onnx/{component}{suffix}.onnx"
        for component in COMPONENTS
    }
    tie_target = f"onnx/embed_tokens{suffix}.onnx.data"
    _check_targets(manifest, name, targets)
    from .adopt import foreign_files

    theirs = foreign_files(manifest, list(targets.values()))
    if theirs:
        raise InputError(
            f"{', '.join(theirs)} came with the folder (not written by flonnx) and would be replaced; "
            f"choose a variant name with --variant (its files are then onnx/*_NAME.onnx)"
        )
    for stale in stale_work(folder / "onnx", ".quantize-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = folder / "onnx" / f".quantize-{os.getpid()}"
    records: dict[str, dict] = {}
    pending: dict[str, Path] = {}
    weights: dict[str, dict] = {}
    models: dict = {}
    data_of: dict[str, list[str]] = {}
    try:
        for component in COMPONENTS:
            component_recipe = recipe.component(component)
            if component_recipe.dtype == "fp32":
                progress(f"{component}: kept as fp32 ({targets[component]})")
                continue
            progress(f"{component}: {describe(component_recipe)} -> {targets[component]}")
            source = _load_onnx(folder / sources[component])
            models[component] = _quantize_one(component, source, component_recipe, vocab_size)
            if component_recipe.fused_attention:
                fused = sum(node.op_type == "MultiHeadAttention" for node in models[component].graph.node)
                progress(f"{component}: {fused} window attention blocks fused")
            weights[component] = {"fp32": float_bytes(source), "quantized": float_bytes(models[component])}
            del source

        outputs: dict[str, bytes] = {}
        if recipe.tie_embedding and {"embed_tokens", "decoder_model_merged"} <= set(models):
            embed = _load_onnx(folder / sources["embed_tokens"])
            tied = tie_embedding(embed, models["decoder_model_merged"], vocab_size, Path(tie_target).name)
            if tied is None:
                progress("lm_head is not the 8-bit embedding table: embed_tokens keeps its own table")
            else:
                progress(f"embed_tokens and lm_head: one tied 8-bit table -> {tie_target}")
                models["embed_tokens"] = embed
                weights["embed_tokens"]["quantized"] = float_bytes(embed)
                outputs[tie_target] = tied.data  # first: it is renamed into place before its readers
                data_of = {"embed_tokens": [tie_target], "decoder_model_merged": [tie_target]}
        for component in list(models):
            model = models.pop(component)
            weights_file = f"{targets[component]}.data"  # beside the graph, as the export does
            moved = move_weights_out(model, Path(weights_file).name)
            if moved:
                outputs[weights_file] = moved  # before its graph: renamed into place first
                data_of.setdefault(component, []).append(weights_file)
            data = model.SerializeToString()
            del model
            if len(data) > PROTOBUF_LIMIT:
                raise QuantizeError(f"the quantized {component} graph is larger than 2 GB")
            outputs[targets[component]] = data

        for target, data in outputs.items():
            digest = hashlib.sha256(data).hexdigest()
            records[target] = {"size": len(data), "sha256": digest}
            existing = folder / target
            if (
                existing.is_file()
                and existing.stat().st_size == len(data)
                and sha256_file(existing) == digest
            ):
                progress(f"{target} is up to date")
                continue
            pending[target] = _write_staged(staging, existing.name, data)
        del outputs
        for component in COMPONENTS:
            if targets[component] in pending:
                for file in data_of.get(component, []):  # a graph loads with the data it reads
                    _stage_existing(staging, folder / file)
                _check_loads(pending[targets[component]], f"{recipe.component(component).dtype} {component}")

        progress(f"listing variant {name!r} in flonnx.json")
        entry = {
            component: {"file": targets[component], "dtype": recipe.component(component).dtype}
            for component in COMPONENTS
        }
        for component, files in data_of.items():
            entry[component]["data"] = files
        quantization = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.as_dict(),
            "source": {file: manifest["files"][file]["sha256"] for file in sources.values()},
            "tools": _versions(),
            "layout": LAYOUT,
            "float_bytes": weights,
            "report": None,
        }
        stale = _commit(folder, name, entry, records, pending, quantization)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for file in stale:
        (folder / file).unlink(missing_ok=True)

    return _measure(folder, name, recipe, sorted(pending), calibration, options, progress)


def _up_to_date(
    folder: Path, manifest: dict, name: str, previous: dict | None, recipe: Recipe, sources: dict
) -> bool:
    if not previous or name not in manifest.get("variants", {}):
        return False
    same = (
        previous.get("recipe") == recipe.as_dict()
        and previous.get("source") == {file: manifest["files"][file]["sha256"] for file in sources.values()}
        and previous.get("tools") == _versions()
        and previous.get("layout") == LAYOUT
    )
    if not same:
        return False
    try:
        verify_files(folder, manifest, sorted(_variant_files(manifest, name)), full=True)
    except ModelFolderError:
        return False
    return True


def _measure(
    folder: Path,
    name: str,
    recipe: Recipe,
    written: list[str],
    calibration: list,
    options: ReportOptions,
    progress: Progress,
) -> QuantizeResult:
    """Load the listed variant as users will, measure it, store the report. A variant that does not
    run is taken out of the manifest again."""
    try:
        _check_runtime(folder, name, options)
        report = measure(folder, name, calibration, options, progress)
    except Exception as error:  # an interruption keeps the variant, listed with no report yet
        progress(f"variant {name!r} does not run; removing it from flonnx.json")
        dropped: list[str] = []
        update_manifest(folder, lambda m: dropped.extend(_forget(m, name)))
        for file in dropped:
            (folder / file).unlink(missing_ok=True)
        if isinstance(error, FlonnxError):
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        raise QuantizeError(f"variant {name!r} does not run: {type(error).__name__}: {first}") from error
    update_manifest(folder, lambda m: m["quantization"][name].update(report=report.as_dict()))
    verdict = (
        "passed" if report.passed else f"FAILED ({sum(f.kind == 'accuracy' for f in report.flags)} flags)"
    )
    share = report.size / report.fp32_size if report.fp32_size else 0
    progress(f"done: variant {name!r}, {report.size / 1e6:.1f} MB ({share:.1%} of fp32), report {verdict}")
    files = variant_files(read_manifest(folder), name)
    return QuantizeResult(folder, name, recipe, files, written, report)


def _commit(
    folder: Path, name: str, entry: dict, records: dict, pending: dict[str, Path], quantization: dict
) -> list[str]:
    """Move the new files into place and list the variant; returns files no variant uses anymore."""
    manifest = read_manifest(folder)
    listed = set(manifest.get("files", {}))
    stale: list[str] = []
    if set(pending) & listed:
        # Forget the files about to change first, so the manifest never lists a file it does not describe.
        def forget_changed(m: dict) -> None:
            stale.extend(_forget(m, name))
            for file in pending:
                m["files"].pop(file, None)

        update_manifest(folder, forget_changed)
    for file, temporary in pending.items():
        os.replace(temporary, folder / file)

    def register(m: dict) -> None:
        stale.extend(_forget(m, name))
        m.setdefault("variants", {})[name] = entry
        m.setdefault("files", {}).update(records)
        m.setdefault("quantization", {})[name] = quantization
        stale[:] = [file for file in stale if file not in records]

    update_manifest(folder, register)
    return stale


def _check_runtime(folder: Path, name: str, options: ReportOptions) -> None:
    """The variant as users open it: Florence2.load with every file's sha256 checked."""
    from flonnx.runtime.model import Florence2

    Florence2.load(folder, variant=name, threads=options.threads or 1, verify="sha256")
