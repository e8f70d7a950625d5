"""OUT: the job, the append-only record shards, and the files assembled from them.

    OUT/job.json                 the job's settings; a resumed run must ask for the same
    OUT/shards/run-NNNN.jsonl    one record per line, appended and fsynced per batch, one file per run
    OUT/labels.jsonl             assembled: one line per labelled image, in SRC's order
    OUT/errors.jsonl             assembled: one line per image that could not be used, with the reason
    OUT/coco-<task>.json         assembled: a COCO dataset per task with boxes or polygons

A kill can only cut the last line of its run's shard; that line does not parse and its image is
labelled again by the next run, which starts a new shard. An image whose record was written is
never labelled again. The assembled files are rewritten whole (write aside, fsync, rename) from
the shards at the end of every complete run, so they always describe a finished job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from flonnx.runtime.errors import InputError

from .coco import to_coco
from .job import Job
from .sources import SourceImage

FORMAT = "flonnx-label/1"
JOB_FILE = "job.json"
SHARDS = "shards"
LABELS = "labels.jsonl"
ERRORS = "errors.jsonl"
LOCK = ".lock"


def coco_name(task: str) -> str:
    return f"coco-{task.strip('<>').lower()}.json"


def dumps(value: dict) -> str:
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (lone surrogates): as \udcXX escapes
        text = json.dumps(value)
    return text


class OutFolder:
    """An OUT folder opened for one run; holds a lock so that two runs cannot write it at once."""

    def __init__(self, path: Path, lock_fd: int | None):
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, out: str | os.PathLike, job: Job) -> OutFolder:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise InputError(f"OUT {path} is a file: pass a folder (new, or one flonnx label wrote before)")
        job_file = path / JOB_FILE
        ours = {LOCK, SHARDS}  # what a run killed before writing job.json leaves
        if path.is_dir() and not job_file.is_file() and any(p.name not in ours for p in path.iterdir()):
            raise InputError(
                f"OUT {path} is not empty and holds no {JOB_FILE} from flonnx label: "
                "pass a new or empty folder, or the OUT of the run to resume"
            )
        try:
            (path / SHARDS).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot write OUT {path}: {error.strerror or error}") from None
        folder = cls(path, _lock(path / LOCK))
        for stale in path.glob(".*.tmp-*"):  # an assembly a kill cut short; the lock says it is not running
            stale.unlink(missing_ok=True)
        try:
            folder._check_job(job)
        except BaseException:
            folder.close()
            raise
        return folder

    def _check_job(self, job: Job) -> None:
        wanted = {"format": FORMAT, **job.as_dict()}
        job_file = self.path / JOB_FILE
        if not job_file.is_file():
            write_atomic(job_file, json.dumps(wanted, indent=2) + "\n")
            return
        try:
            stored = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read {job_file}: {error}") from None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise InputError(f"{job_file} is not a {FORMAT} job file")
        differ = [key for key in wanted if stored.get(key) != wanted[key]]
        if differ and not any(shard.stat().st_size for shard in (self.path / SHARDS).glob("run-*.jsonl")):
            # a job that never labelled an image (a run that failed to start) may be redefined
            write_atomic(job_file, json.dumps(wanted, indent=2) + "\n")
        elif differ:
            details = "; ".join(f"{key}: {stored.get(key)!r} there, {wanted[key]!r} now" for key in differ)
            raise InputError(
                f"OUT {self.path} holds a job with other settings ({details}): "
                "resume it with the same SRC, model, tasks and options, or pass a new OUT"
            )

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def __enter__(self) -> OutFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shards ---------------------------------------------------------------------------------

    def records(self) -> dict[str, dict]:
        """The record of each image done so far; a label beats an error for the same image (an
        error retried with success)."""
        done: dict[str, dict] = {}
        for shard in sorted((self.path / SHARDS).glob("run-*.jsonl")):
            for line in shard.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # empty, or the tail a kill cut
                if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                    continue
                previous = done.get(record["path"])
                if previous is None or ("error" in previous and "error" not in record):
                    done[record["path"]] = record
        return done

    def new_shard(self) -> Shard:
        numbers = [int(p.stem.split("-")[1]) for p in (self.path / SHARDS).glob("run-*.jsonl")]
        return Shard(self.path / SHARDS / f"run-{max(numbers, default=0) + 1:04d}.jsonl")

    # -- assembly -------------------------------------------------------------------------------

    def assemble(
        self, images: Sequence[SourceImage], coco_tasks: dict[str, str], description: str
    ) -> tuple[list[Path], int, int]:
        """Write labels.jsonl, errors.jsonl and a COCO file per task in `coco_tasks` (task -> the
        category of empty labels), in SRC's order. Returns (files, labelled, errors)."""
        done = self.records()
        labels, errors = [], []
        for image in images:
            record = done.get(image.key)
            if record is not None:
                (errors if "error" in record else labels).append(record)
        files = [self.path / LABELS, self.path / ERRORS]
        write_atomic(files[0], "".join(dumps(r) + "\n" for r in labels))
        write_atomic(files[1], "".join(dumps(r) + "\n" for r in errors))
        for task, fallback in coco_tasks.items():
            coco = to_coco(labels, task, fallback, f"{task} {description}")
            files.append(self.path / coco_name(task))
            write_atomic(files[-1], dumps(coco) + "\n")
        return files, len(labels), len(errors)


class Shard:
    """An append-only JSONL file: each `write` is one batch, on disk when it returns."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "ab")
        _fsync_folder(path.parent)

    def write(self, records: Sequence[dict]) -> None:
        if records:
            self._file.write("".join(dumps(r) + "\n" for r in records).encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Shard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs folders
    finally:
        os.close(fd)


def _lock(path: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per OUT is then up to the user
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise InputError(f"OUT {path.parent} is being written by another flonnx label run") from None
    return fd
