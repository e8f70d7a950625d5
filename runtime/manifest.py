"""The export folder's manifest, `flonnx.json`: the one contract between the stages.

Export writes it, quantize adds variants to it, the runtime reads it. Everything a stage needs
to know about a folder is here or in the Hugging Face JSON files beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ModelFolderError

MANIFEST = "flonnx.json"
FORMAT_VERSION = 1

# Component name -> file stem, in the order a request uses them (onnx-community names).
COMPONENTS = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")

# Files every export folder holds besides the graphs.
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(folder: Path, relative: str) -> dict:
    path = folder / relative
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ModelFolderError(f"export folder not found: {folder}")
    if not path.is_file():
        raise ModelFolderError(f"{folder} is not a flonnx export folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"cannot read {path}: {error}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFolderError(
            f"{path} has format_version {version!r}; this flonnx reads format_version {FORMAT_VERSION}"
        )
    return manifest


def stale_work(folder: Path, pattern: str) -> list[Path]:
    """Entries of `folder` named `pattern` ("<prefix>-<pid>") whose writing process is gone: what
    an export or quantize killed mid-way left behind."""
    found = []
    for path in folder.glob(pattern):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            found.append(path)
        except PermissionError:
            pass  # alive, another user's
    return found


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=False)
            stream.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a manifest is not a secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


VERIFY_MODES = ("cached", "sha256", "size")


def cache_path() -> Path:
    """Where the hashes already checked are remembered: $FLONNX_CACHE, else ~/.cache/flonnx."""
    root = (
        os.environ.get("FLONNX_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flonnx"
    )
    return Path(root) / "verified.json"


def _identity(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verify_files(
    folder: str | os.PathLike, manifest: dict, names: list[str], full: bool = False, mode: str | None = None
) -> None:
    """Check that each file exists with its recorded size and, by mode, its sha256.

    "size": sizes only. "sha256" (or `full`): every file hashed. "cached": every file hashed once
    per identity (size, mtime, inode, device) and recorded sha256, remembered in `cache_path()`, so
    a folder costs a full read on its first load and a stat per file after that; a file changed in
    place (new mtime) is hashed again. Where the cache cannot be written, every load hashes.
    """
    folder = Path(folder)
    mode = "sha256" if full else (mode or "size")
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    records = manifest.get("files", {})
    cache_file = cache_path() if mode != "size" else None  # a full check also teaches the cache
    cache = _read_cache(cache_file) if cache_file else {}
    learned = {}
    for name in names:
        record = records.get(name)
        path = folder / name
        if record is None:
            raise ModelFolderError(f"{name} is not listed in {folder / MANIFEST}")
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != record["size"]:
            raise ModelFolderError(f"{path} has {size} bytes; {MANIFEST} records {record['size']}")
        if mode == "size":
            continue
        key = str(path.resolve())
        seen = [*_identity(path), record["sha256"]]
        if mode == "cached" and cache.get(key) == seen:
            continue
        if sha256_file(path) != record["sha256"]:
            raise ModelFolderError(
                f"{path} does not match the sha256 recorded in {MANIFEST}: the file is damaged or was changed"
            )
        learned[key] = seen
    if cache_file and learned:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, {**_read_cache(cache_file), **learned})
        except OSError:
            pass  # a read-only home: the next load hashes again, which is slower but as safe


def update_manifest(folder: str | os.PathLike, change: Callable[[dict], None]) -> dict:
    """Read flonnx.json, let `change(manifest)` edit it in place, and write it back atomically."""
    manifest = read_manifest(folder)
    change(manifest)
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def variant_files(manifest: dict, variant: str) -> dict[str, str]:
    """Component -> file (relative to the folder) of one variant listed in the manifest."""
    entry = manifest.get("variants", {}).get(variant)
    if entry is None:
        raise ModelFolderError(f"variant {variant!r} is not listed in {MANIFEST}")
    return {name: entry[name]["file"] for name in COMPONENTS}


def component_data_files(manifest: dict, variant: str, component: str) -> list[str]:
    """External-data files one component of a variant reads (relative to the folder).

    A variant entry lists them under "data": each graph's own weights (`<graph>.data`) and, for
    quantized variants, the tied embedding table two graphs share. A folder written before that
    field existed has `<graph>.data` listed only in "files"; it is found too.
    """
    entry = manifest.get("variants", {}).get(variant, {}).get(component, {})
    found = list(entry.get("data", []))
    legacy = f"{entry.get('file')}.data"
    if legacy in manifest.get("files", {}) and legacy not in found:
        found.append(legacy)
    return found


def variant_data_files(manifest: dict, variant: str) -> list[str]:
    """Every external-data file a variant reads, each once, in component order."""
    found: list[str] = []
    for component in COMPONENTS:
        found += [name for name in component_data_files(manifest, variant, component) if name not in found]
    return found
