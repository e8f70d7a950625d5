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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flonnx.runtime.errors import FlonnxError, InputError, ModelFolderError
from flonnx.runtime.manifest import (
    COMPONENTS,
    read_manifest,
    sha256_file,
    update_manifest,
    variant_files,
    verify_files,
)

from .calibration import load_images
from .quantizer import QuantizeError, float_bytes, quantize_component
from .recipes import VARIANT_NAME, ComponentRecipe, Recipe, get_recipe
from .report import Report, ReportOptions, measure

PROTOBUF_LIMIT = 2**31 - 1  # a single-file ONNX model cannot be larger


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
    return ", ".join(parts) or "fp32"


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError, onnx's own errors, OSError
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelFolderError(f"cannot read {path}: not a valid ONNX model ({first})") from None


def _write_temporary(path: Path, data: bytes) -> Path:
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _check_loads(path: Path, what: str) -> None:
    from flonnx.runtime.sessions import check_providers, create_session

    try:
        create_session(path, 1, check_providers(None))
    except ModelFolderError as error:
        raise QuantizeError(f"the {what} does not load: {str(error).split(': ', 1)[-1]}") from None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import onnx
    import onnxruntime

    try:
        flonnx_version = version("flonnx")
    except PackageNotFoundError:
        flonnx_version = "unknown"
    return {"flonnx": flonnx_version, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _referenced(manifest: dict) -> set[str]:
    return {entry["file"] for variant in manifest.get("variants", {}).values() for entry in variant.values()}


def _forget(manifest: dict, variant: str) -> list[str]:
    """Remove a variant and the records of files no other variant uses; returns those files."""
    manifest.get("variants", {}).pop(variant, None)
    manifest.get("quantization", {}).pop(variant, None)
    still = _referenced(manifest)
    dropped = [
        name
        for name in list(manifest.get("files", {}))
        if name.startswith("onnx/") and name.endswith(".onnx") and name not in still
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
    manifest = read_manifest(folder)
    if "fp32" not in manifest.get("variants", {}):
        raise ModelFolderError(
            f"{folder} holds no fp32 export to quantize (flonnx.json lists no fp32 variant)"
        )
    sources = variant_files(manifest, "fp32")
    data_files = [file for file in manifest.get("files", {}) if file.endswith(".data")]
    verify_files(folder, manifest, [*sources.values(), *data_files], full=True)
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
    _check_targets(manifest, name, targets)
    records: dict[str, dict] = {}
    pending: dict[str, Path] = {}
    weights: dict[str, dict] = {}
    try:
        for component in COMPONENTS:
            component_recipe = recipe.component(component)
            target = targets[component]
            if component_recipe.dtype == "fp32":
                progress(f"{component}: kept as fp32 ({target})")
                continue
            progress(f"{component}: {describe(component_recipe)} -> {target}")
            source = _load_onnx(folder / sources[component])
            try:
                model = quantize_component(source, component_recipe, vocab_size)
            except FlonnxError:
                raise
            except Exception as error:  # onnxruntime's quantizer raises many types on odd graphs
                first = (str(error).strip().splitlines() or [""])[0]
                raise QuantizeError(
                    f"cannot quantize {component}: {type(error).__name__}: {first}"
                ) from error
            weights[component] = {"fp32": float_bytes(source), "quantized": float_bytes(model)}
            del source
            data = model.SerializeToString()
            del model
            if len(data) > PROTOBUF_LIMIT:
                raise QuantizeError(f"the quantized {component} is larger than 2 GB; it cannot be one file")
            digest = hashlib.sha256(data).hexdigest()
            records[target] = {"size": len(data), "sha256": digest}
            existing = folder / target
            if (
                existing.is_file()
                and existing.stat().st_size == len(data)
                and sha256_file(existing) == digest
            ):
                progress(f"{component}: {target} is up to date")
                continue
            pending[target] = _write_temporary(existing, data)
            del data
            _check_loads(pending[target], f"{recipe.component(component).dtype} {component}")

        progress(f"listing variant {name!r} in flonnx.json")
        entry = {
            component: {"file": targets[component], "dtype": recipe.component(component).dtype}
            for component in COMPONENTS
        }
        quantization = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.as_dict(),
            "source": {file: manifest["files"][file]["sha256"] for file in sources.values()},
            "tools": _versions(),
            "float_bytes": weights,
            "report": None,
        }
        stale = _commit(folder, name, entry, records, pending, quantization)
    finally:
        for temporary in pending.values():
            temporary.unlink(missing_ok=True)
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
    )
    if not same:
        return False
    try:
        verify_files(folder, manifest, list(variant_files(manifest, name).values()), full=True)
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
    if set(pending) & listed:
        # Forget the files about to change first, so the manifest never lists a file it does not describe.
        def forget_changed(m: dict) -> None:
            _forget(m, name)
            for file in pending:
                m["files"].pop(file, None)

        update_manifest(folder, forget_changed)
    for file, temporary in pending.items():
        os.replace(temporary, folder / file)
    stale: list[str] = []

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
