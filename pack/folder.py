"""The pack folder, written as `flonnx export` writes its folder (flonnx.runtime.staging): built
beside OUT and renamed into place only when complete; what a killed run left is cleared by the next."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from flonnx.runtime.errors import FlonnxError
from flonnx.runtime.manifest import COMPONENTS, component_data_files, variant_files
from flonnx.runtime.staging import Progress, move_into_place, recover  # noqa: F401 (pack's API)
from flonnx.runtime.staging import check_out as check_writable
from flonnx.runtime.staging import prepare as prepare_staging


class PackError(FlonnxError):
    """A variant that cannot be packed for the target, or a pack that cannot be written."""


def check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an OUT that cannot be written, or whose replacement would touch the source folder."""
    resolved, origin = out.resolve(), source.resolve()
    if resolved == origin or resolved in origin.parents or origin in resolved.parents:
        raise PackError(f"the pack {out} must be outside the model folder {source}, and not contain it")
    check_writable(out, force, "the pack", PackError)


def prepare(out: Path) -> Path:
    return prepare_staging(out, PackError)


def copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


@dataclass(frozen=True)
class SourceVariant:
    """The files one variant of the source folder reads, and the data files two graphs share."""

    files: dict[str, str]  # component -> its graph
    data: dict[str, list[str]]  # component -> the external-data files it reads
    reads: dict[str, int]  # component -> bytes of its graph and data
    shared: dict[str, dict]  # data file read by several graphs -> {"bytes", "read_by"}

    @property
    def duplicated(self) -> int:
        """Bytes a pack stores again when each graph must hold its own copy of what it shares."""
        return sum(item["bytes"] * (len(item["read_by"]) - 1) for item in self.shared.values())

    @property
    def source_bytes(self) -> int:
        return sum(self.reads.values()) - self.duplicated


def read_variant(source: Path, manifest: dict, variant: str, progress, how: str) -> SourceVariant:
    """`variant`'s graphs and data files in `source`; `how` ends the progress line about shared files."""
    files = variant_files(manifest, variant)
    not_onnx = [name for name in files.values() if not name.endswith(".onnx")]
    if not_onnx:
        raise PackError(
            f"variant {variant!r} is not ONNX graphs ({', '.join(not_onnx)}): pack an export folder"
        )
    size = lambda name: (source / name).stat().st_size  # noqa: E731
    data = {c: component_data_files(manifest, variant, c) for c in COMPONENTS}
    reads = {c: size(files[c]) + sum(size(d) for d in data[c]) for c in COMPONENTS}
    readers: dict[str, list[str]] = {}
    for component in COMPONENTS:
        for name in data[component]:
            readers.setdefault(name, []).append(component)
    shared = {name: {"bytes": size(name), "read_by": who} for name, who in readers.items() if len(who) > 1}
    if shared:
        names = ", ".join(f"{name} ({item['bytes'] / 1e6:.1f} MB)" for name, item in shared.items())
        progress(f"shared by two graphs: {names}; {how}")
    return SourceVariant(files, data, reads, shared)
