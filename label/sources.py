"""What `flonnx label` reads: the images a SRC names, in a fixed order.

SRC is a folder (searched recursively for image files), a list file (one path per line), or a
manifest of image paths (`.jsonl`: one JSON object or string per line; `.parquet`: one column).
Each image gets a key: its path relative to the folder, or the path as the list or manifest writes
it (relative paths there are resolved against the list's folder). Keys name images in every output
file and decide what a resumed run has already done, so the order and the keys depend only on SRC.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from flonnx.runtime.errors import InputError, MissingExtraError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
DEFAULT_COLUMN = "path"


@dataclass(frozen=True)
class SourceImage:
    key: str  # how outputs name the image
    path: Path  # where it is read from


def list_images(src: str | os.PathLike, column: str | None = None) -> list[SourceImage]:
    """The images SRC names, without duplicates, in SRC's order (a folder's: sorted by key)."""
    src = Path(src)
    if not src.exists():
        raise InputError(
            f"SRC {src} not found: pass a folder of images, a list file (one path per line), "
            "or a .jsonl / .parquet manifest"
        )
    if src.is_dir():
        if column is not None:
            raise InputError(f"--column {column!r} is for .jsonl / .parquet manifests; SRC {src} is a folder")
        return _folder(src)
    suffix = src.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        raise InputError(
            f"SRC {src} is an image file: pass its folder, a list file (one path per line), "
            "or a .jsonl / .parquet manifest"
        )
    kind = MANIFEST_SUFFIXES.get(suffix, "list")
    if kind == "list" and column is not None:
        raise InputError(f"--column {column!r} is for .jsonl / .parquet manifests; SRC {src} is a list file")
    if kind == "parquet":
        entries = _parquet(src, column or DEFAULT_COLUMN)
    elif kind == "jsonl":
        entries = _jsonl(src, column or DEFAULT_COLUMN)
    else:
        entries = _list_file(src)
    return _unique(src.parent, entries)


def _folder(src: Path) -> list[SourceImage]:
    found = []
    # Hidden folders (.git, a resumed OUT's state) are skipped; symlinked folders are not followed,
    # so a link loop cannot make the listing endless.
    for root, folders, files in os.walk(src):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = Path(root, name)
                found.append(SourceImage(path.relative_to(src).as_posix(), path))
    return sorted(found, key=lambda image: image.key)


def _read_text(src: Path) -> str:
    try:
        return src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"SRC {src} is not a UTF-8 text file: a list file holds one image path per line"
        ) from None
    except OSError as error:
        raise InputError(f"cannot read SRC {src}: {error.strerror or error}") from None


def _list_file(src: Path) -> list[str]:
    return [line.strip() for line in _read_text(src).splitlines() if line.strip()]


def _jsonl(src: Path, column: str) -> list[str]:
    entries = []
    for number, line in enumerate(_read_text(src).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{src} line {number} is not JSON: {error.msg}") from None
        if isinstance(value, dict):
            if column not in value:
                raise InputError(
                    f"{src} line {number} has no {column!r} key (keys: {', '.join(value) or 'none'}); "
                    "pass --column to name the key holding the image path"
                )
            value = value[column]
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{src} line {number}: expected an image path, got {value!r}")
        entries.append(value.strip())
    return entries


def _parquet(src: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise MissingExtraError("label", "pyarrow") from None
    try:
        schema = pq.read_schema(src)
        if column not in schema.names:
            raise InputError(
                f"{src} has no column {column!r} (columns: {', '.join(schema.names)}); "
                "pass --column to name the column holding image paths"
            )
        values = pq.read_table(src, columns=[column]).column(column).to_pylist()
    except InputError:
        raise
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError... for a damaged file
        raise InputError(f"cannot read the Parquet manifest {src}: {error}") from None
    entries = []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{src} row {row}, column {column!r}: expected an image path, got {value!r}")
        entries.append(value.strip())
    return entries


def _unique(base: Path, entries: list[str]) -> list[SourceImage]:
    seen: set[str] = set()
    images = []
    for entry in entries:
        if entry not in seen:
            seen.add(entry)
            path = Path(entry).expanduser()
            images.append(SourceImage(entry, path if path.is_absolute() else base / path))
    return images


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as an image file, or None. Checked before an image goes to a
    worker, so that every backend reports a missing or unreadable file the same way."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(mode):
        return "not a regular file"  # opening a FIFO would block
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        return f"cannot read the file: {error.strerror or error}"
    return None
