"""`flonnx label` on one machine: sources, the JSONL and COCO it writes (against `Florence2.run` on
each image), resume after SIGKILL, unreadable images, bad inputs, and the CLI. Runs the synthetic
model (exported at 160 px) on rendered scenes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flonnx.label import label
from flonnx.label.coco import instances, polygon_area
from flonnx.label.sources import list_images
from flonnx.label.writers import ERRORS, JOB_FILE, LABELS, SHARDS, OutFolder, coco_name
from flonnx.runtime import cli
from flonnx.runtime.errors import FlonnxError, InputError, MissingExtraError
from flonnx.runtime.staging import Progress

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"
IMAGE_SIZE = 160
SEED = 9090  # held-out scenes
SCENES = 24
TASKS = ("<OD>", "<CAPTION>", "<REFERRING_EXPRESSION_SEGMENTATION>", "<OCR_WITH_REGION>")
TEXT = "the red circle"
QUIET = Progress(quiet=True)
OUTPUTS = (LABELS, ERRORS, *(coco_name(t) for t in TASKS if t != "<CAPTION>"))


def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped synthetic model exported once per session (test_label_ray.py shares it)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"no trained model in {SHIPPED}")
    out = tmp_path_factory.getbasetemp() / "label-synthetic-export"
    if not (out / "flonnx.json").is_file():
        from flonnx.export.exporter import export

        export(str(SHIPPED), out, image_size=IMAGE_SIZE, force=True, progress=QUIET)
    return out


def write_scenes(folder: Path, count: int = SCENES, seed: int = SEED) -> list[Path]:
    """Rendered scenes: PNGs, some in a subfolder, one JPEG whose EXIF says "rotate 90°"."""
    from flonnx.runtime.synthetic import make_scene

    paths = []
    for index in range(count):
        image = make_scene(seed, index).image
        path = folder / ("sub" if index % 3 == 0 else "") / f"scene-{index:03d}.png"
        if index == 5:
            path = path.with_suffix(".jpg")
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: the viewer rotates it 90° clockwise
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, quality=95, exif=exif)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return synthetic_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_scenes(folder)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def labelled(synthetic, scenes, tmp_path_factory) -> Path:
    """One uninterrupted local run: the reference other runs must reproduce."""
    out = tmp_path_factory.mktemp("labelled") / "out"
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, progress=QUIET)
    assert (summary.images, summary.labelled, summary.errors, summary.processed) == (
        SCENES,
        SCENES,
        0,
        SCENES,
    )
    return out


@pytest.fixture(scope="module")
def model(synthetic):
    from flonnx.runtime import Florence2

    return Florence2.load(synthetic, threads=2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- sources ---------------------------------------------------------------------------------------


def test_folder_is_searched_recursively_in_key_order(tmp_path):
    for name in ("b.png", "a/c.JPG", "a/d.webp", "z.txt", ".hidden/e.png", "a/.f.png", "a/b/g.tiff"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    images = list_images(tmp_path)
    assert [i.key for i in images] == ["a/b/g.tiff", "a/c.JPG", "a/d.webp", "b.png"]
    assert all(i.path == tmp_path / i.key for i in images)


def test_list_jsonl_and_parquet_manifests_name_the_same_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    other = tmp_path / "elsewhere" / "x.png"
    entries = ["imgs/a.png", str(other), "imgs/b.jpg"]
    expected = [
        ("imgs/a.png", tmp_path / "imgs/a.png"),
        (str(other), other),
        ("imgs/b.jpg", tmp_path / "imgs/b.jpg"),
    ]
    (tmp_path / "list.txt").write_text(
        "\n".join([entries[0], "", f"  {entries[1]}  ", entries[2], entries[0]])
    )
    jsonl = [
        json.dumps({"path": entries[0], "w": 1}),
        json.dumps(entries[1]),
        json.dumps({"path": entries[2]}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(jsonl) + "\n\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"file": e}) + "\n" for e in entries))
    pq.write_table(pa.table({"path": entries, "n": [1, 2, 3]}), tmp_path / "m.parquet")
    pq.write_table(pa.table({"image": entries}), tmp_path / "c.parquet")
    for src, column in (("list.txt", None), ("m.jsonl", None), ("c.jsonl", "file"), ("m.parquet", None)):
        images = list_images(tmp_path / src, column)
        assert [(i.key, i.path) for i in images] == expected, src
    assert [i.key for i in list_images(tmp_path / "c.parquet", "image")] == entries


@pytest.mark.parametrize(
    ("name", "content", "column", "fragment"),
    [
        ("missing", None, None, "SRC {src} not found: pass a folder of images, a list file"),
        ("photo.png", b"x", None, "is an image file: pass its folder"),
        ("m.jsonl", b'{"file": "a.png"}\n', None, "line 1 has no 'path' key (keys: file); pass --column"),
        ("m.jsonl", b'{"path": "a.png"}\n{"pa', None, "line 2 is not JSON"),
        ("m.jsonl", b'{"path": 3}\n', None, "line 1: expected an image path, got 3"),
        ("m.parquet", "table", "nope", "has no column 'nope' (columns: path)"),
        ("m.parquet", b"PAR1 not parquet", None, "cannot read the Parquet manifest"),
        ("list.txt", b"\xff\xfe\x00", None, "is not a UTF-8 text file"),
        ("list.txt", b"a.png\n", "path", "--column 'path' is for .jsonl / .parquet manifests"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, name, content, column, fragment):
    src = tmp_path / name
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
    if content == "table":
        pq.write_table(pa.table({"path": ["a.png"]}), src)
    elif content is not None:
        src.write_bytes(content)
    with pytest.raises(InputError) as caught:
        list_images(src, column)
    assert fragment.format(src=src) in str(caught.value)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingExtraError, match=r"'label' extra \(pyarrow is missing\)"):
        list_images(tmp_path / "m.parquet")


# -- COCO conversion -------------------------------------------------------------------------------


def test_instances_of_every_answer_shape():
    od = {"bboxes": [[10, 20, 50, 80], [30, 40, 20, 10]], "labels": ["cat", ""]}
    assert instances(od, "object") == [("cat", [10, 20, 40, 60], []), ("object", [20, 10, 10, 30], [])]
    quad = {"quad_boxes": [[1, 2, 11, 2, 11, 7, 1, 7]], "labels": ["hello"]}
    assert instances(quad, "object") == [("hello", [1, 2, 10, 5], [[1, 2, 11, 2, 11, 7, 1, 7]])]
    polygons = {"polygons": [[[0, 0, 4, 0, 4, 3], [10, 10, 12, 10]], [[1, 1, 2, 2]]], "labels": ["", "x"]}
    # a 2-point polygon is no COCO polygon: dropped, and with it an instance left with none
    assert instances(polygons, "the red car") == [("the red car", [0, 0, 4, 3], [[0, 0, 4, 0, 4, 3]])]
    ovd = {
        "bboxes": [[0, 0, 2, 2]],
        "bboxes_labels": ["car"],
        "polygons": [[[0, 0, 2, 0, 2, 2]]],
        "polygons_labels": ["bus"],
    }
    assert [i[0] for i in instances(ovd, "object")] == ["car", "bus"]
    assert instances("a caption", "object") == [] and instances({"bboxes": []}, "object") == []
    assert polygon_area([0, 0, 4, 0, 4, 3]) == 6.0 and polygon_area([0, 0, 2, 0, 2, 2, 0, 2]) == 4.0


# -- labelling -------------------------------------------------------------------------------------


def test_jsonl_holds_what_run_answers_for_each_image(labelled, scenes, model):
    records = read_jsonl(labelled / LABELS)
    keys = [i.key for i in list_images(scenes)]
    assert [r["path"] for r in records] == keys and len(keys) == SCENES
    for record in records:
        path = scenes / record["path"]
        answers = {}
        for task in TASKS:
            answers.update(
                model.run(path, task, TEXT if task == "<REFERRING_EXPRESSION_SEGMENTATION>" else None)
            )
        assert record == {"path": record["path"], **_oriented_size(path), "answers": answers}
    rotated = next(r for r in records if r["path"].endswith(".jpg"))
    with Image.open(scenes / rotated["path"]) as raw:
        assert (rotated["width"], rotated["height"]) == (raw.height, raw.width)  # EXIF applied
    assert sum(len(r["answers"]["<OD>"]["bboxes"]) for r in records) >= SCENES  # real boxes
    assert (labelled / ERRORS).read_text() == ""
    assert not (labelled / coco_name("<CAPTION>")).exists()


def _oriented_size(path: Path) -> dict:
    from PIL import ImageOps

    with Image.open(path) as image:
        width, height = ImageOps.exif_transpose(image).size
    return {"width": width, "height": height}


@pytest.mark.parametrize("task", ["<OD>", "<REFERRING_EXPRESSION_SEGMENTATION>", "<OCR_WITH_REGION>"])
def test_coco_files_are_valid_and_follow_the_answers(labelled, task):
    records = read_jsonl(labelled / LABELS)
    coco = json.loads((labelled / coco_name(task)).read_text())
    assert [i["id"] for i in coco["images"]] == list(range(1, len(records) + 1))
    assert [(i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (r["path"], r["width"], r["height"]) for r in records
    ]
    names = [c["name"] for c in coco["categories"]]
    assert names == sorted(set(names)) and [c["id"] for c in coco["categories"]] == list(
        range(1, len(names) + 1)
    )
    category = {c["id"]: c["name"] for c in coco["categories"]}
    annotations = coco["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1)) and annotations
    expected = []
    for image_id, record in enumerate(records, 1):
        answer = record["answers"][task]
        if task == "<OD>":
            for (x1, y1, x2, y2), name in zip(answer["bboxes"], answer["labels"]):
                expected.append((image_id, name, [x1, y1, x2 - x1, y2 - y1], (x2 - x1) * (y2 - y1), []))
        elif task == "<OCR_WITH_REGION>":
            for quad, name in zip(answer["quad_boxes"], answer["labels"]):
                xs, ys = quad[0::2], quad[1::2]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                expected.append((image_id, name, box, polygon_area(quad), [quad]))
        else:
            for polygons, name in zip(answer["polygons"], answer["labels"]):
                kept = [p for p in polygons if len(p) >= 6]
                xs = [x for p in kept for x in p[0::2]]
                ys = [y for p in kept for y in p[1::2]]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                expected.append((image_id, name or TEXT, box, sum(polygon_area(p) for p in kept), kept))
    got = [
        (a["image_id"], category[a["category_id"]], a["bbox"], a["area"], a["segmentation"])
        for a in annotations
    ]
    assert got == expected
    assert all(a["iscrowd"] == 0 and a["bbox"][2] >= 0 and a["bbox"][3] >= 0 for a in annotations)


def test_process_pool_writes_the_same_files(labelled, scenes, synthetic, tmp_path):
    out = tmp_path / "out"
    summary = label(
        scenes, out, synthetic, TASKS, text=TEXT, pool="processes", workers=2, batch_size=3, progress=QUIET
    )
    assert summary.labelled == SCENES
    assert_same_outputs(labelled, out)


def test_a_finished_job_runs_again_without_labelling(labelled, scenes, synthetic, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labelled, out)
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, progress=QUIET)
    assert (summary.skipped, summary.processed, summary.labelled) == (SCENES, 0, SCENES)
    assert_same_outputs(labelled, out)


def test_resume_after_sigkill_labels_each_image_once(labelled, scenes, synthetic, tmp_path):
    """The kill hits the parent only, as the OOM killer would: its worker process must leave too."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "flonnx.runtime.cli",
        "label",
        str(scenes),
        str(out),
        "--model",
        str(synthetic),
    ]
    command += [arg for task in TASKS for arg in ("--task", task)]
    command += [
        "--text",
        TEXT,
        "--pool",
        "processes",
        "--workers",
        "1",
        "--threads",
        "1",
        "--batch-size",
        "1",
    ]
    run = subprocess.Popen([*command, "--quiet"], stderr=subprocess.PIPE, start_new_session=True)
    shard = out / SHARDS / "run-0001.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and run.poll() is None:
            if shard.is_file() and shard.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.005)
        run.kill()
        run.wait()
        assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()
        while time.monotonic() < deadline and _group_alive(run.pid):
            time.sleep(0.1)
        assert not _group_alive(run.pid), "a worker outlived its killed parent"
    finally:
        if _group_alive(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    written = shard.read_bytes().count(b"\n")
    assert 4 <= written < SCENES and not (out / LABELS).exists()  # killed mid-run
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, progress=QUIET)
    assert summary.skipped == written and summary.processed == SCENES - written
    assert_same_outputs(labelled, out)
    lines = [
        json.loads(line) for s in sorted((out / SHARDS).iterdir()) for line in s.read_text().splitlines()
    ]
    assert sorted(r["path"] for r in lines) == sorted(i.key for i in list_images(scenes))  # once each


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_line_cut_by_a_kill_is_labelled_again(labelled, scenes, synthetic, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(labelled, out)
    (out / LABELS).unlink()
    shard = out / SHARDS / "run-0001.jsonl"
    data = shard.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    shard.write_bytes(data[: last + 25])  # the last record cut mid-line
    summary = label(scenes, out, synthetic, TASKS, text=TEXT, progress=QUIET)
    assert (summary.skipped, summary.processed) == (SCENES - 1, 1)
    assert_same_outputs(labelled, out)


def test_unreadable_images_go_to_the_errors_file(synthetic, scenes, tmp_path):
    src = tmp_path / "src"
    good = sorted(scenes.glob("*.png"))[:2]
    src.mkdir()
    for path in good:
        shutil.copy(path, src / path.name)
    png = good[0].read_bytes()
    (src / "corrupt.png").write_bytes(
        np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    )
    (src / "truncated.png").write_bytes(png[: len(png) // 2])
    (src / "empty.jpg").write_bytes(b"")
    (src / "dangling.png").symlink_to(tmp_path / "gone.png")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*(f"src/{p.name}" for p in sorted(src.iterdir())), "src/missing.png"]))
    out = tmp_path / "out"
    summary = label(listing, out, synthetic, ["<OD>"], progress=QUIET)
    assert (summary.images, summary.labelled, summary.errors) == (7, 2, 5)
    errors = {r["path"]: r["error"] for r in read_jsonl(out / ERRORS)}
    assert list(errors) == [
        f"src/{n}" for n in ("corrupt.png", "dangling.png", "empty.jpg", "truncated.png")
    ] + ["src/missing.png"]
    assert "not an image Pillow can read" in errors["src/corrupt.png"]
    assert "cannot decode" in errors["src/truncated.png"] and "empty (0 bytes)" in errors["src/empty.jpg"]
    assert errors["src/dangling.png"] == errors["src/missing.png"] == "file not found"
    assert [r["path"] for r in read_jsonl(out / LABELS)] == [f"src/{p.name}" for p in good]
    assert [i["file_name"] for i in json.loads((out / coco_name("<OD>")).read_text())["images"]] == [
        f"src/{p.name}" for p in good
    ]
    again = label(listing, out, synthetic, ["<OD>"], progress=QUIET)
    assert (again.processed, again.errors) == (0, 5)
    shutil.copy(good[0], src / "corrupt.png")  # repaired
    retried = label(listing, out, synthetic, ["<OD>"], retry_errors=True, progress=QUIET)
    assert (retried.processed, retried.labelled, retried.errors) == (5, 3, 4)


def test_region_tasks_get_the_region(synthetic, scenes, model, tmp_path):
    region = [20, 40, 140, 160]
    tasks = ["<OD>", "<REGION_TO_CATEGORY>"]
    label(scenes / "sub", tmp_path / "out", synthetic, tasks, region=region, progress=QUIET)
    records = read_jsonl(tmp_path / "out" / LABELS)
    assert len(records) == len(list((scenes / "sub").iterdir()))
    for record in records:
        path = scenes / "sub" / record["path"]
        assert record["answers"] == {**model.run(path, "<OD>"), **model.run(path, tasks[1], region=region)}


def test_a_file_name_that_is_not_utf8_is_labelled(synthetic, scenes, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # "caf\udce9.png"
    shutil.copy(sorted(scenes.glob("*.png"))[0], src / name)
    label(src, tmp_path / "out", synthetic, ["<OD>"], progress=QUIET)
    (record,) = read_jsonl(tmp_path / "out" / LABELS)
    assert record["path"] == name and "<OD>" in record["answers"]
    assert json.loads((tmp_path / "out" / coco_name("<OD>")).read_text())["images"][0]["file_name"] == name


# -- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_fail_before_any_labelling(synthetic, scenes, labelled, tmp_path):
    def fails(fragment: str, src=scenes, out=None, tasks=("<OD>",), **options) -> None:
        out = out or tmp_path / "new"
        with pytest.raises(FlonnxError) as caught:
            label(src, out, options.pop("model", synthetic), tasks, progress=QUIET, **options)
        assert fragment in str(caught.value), str(caught.value)
        assert not (out / LABELS).exists() or out == labelled

    fails("unknown task '<DETECT>', expected one of: <OCR>, <OCR_WITH_REGION>", tasks=["<DETECT>"])
    fails("task <OD> given twice", tasks=["<OD>", "<OD>"])
    fails("task <CAPTION_TO_PHRASE_GROUNDING> needs text input", tasks=["<CAPTION_TO_PHRASE_GROUNDING>"])
    fails(
        "--text 'a cat' is not used by <OD>, <CAPTION>: it takes no input",
        tasks=["<OD>", "<CAPTION>"],
        text="a cat",
    )
    fails("--region is not used by <OD>; tasks that take a region: ", region=[1, 2, 3, 4])
    fails(f"SRC {tmp_path / 'nowhere'} not found", src=tmp_path / "nowhere")
    fails(f"model folder {tmp_path / 'nomodel'} not found", model=tmp_path / "nomodel")
    fails("batch_size must be a positive integer, got 0", batch_size=0)
    fails(
        "region must be four numbers x1, y1, x2, y2 in pixels, got [1, 2]",
        tasks=["<REGION_TO_CATEGORY>"],
        region=[1, 2],
    )
    fails("'nope'", variant="nope", pool="processes")
    fails("pool must be one of threads, processes, got 'fork'", pool="fork")
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    fails(f"OUT {a_file} is a file", out=a_file)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    fails(f"OUT {foreign} is not empty and holds no {JOB_FILE} from flonnx label", out=foreign)
    before = {p.name: p.read_bytes() for p in labelled.iterdir() if p.is_file()}
    fails("tasks: ['<OD>', '<CAPTION>'", out=labelled, tasks=["<OD>"])  # another task set than OUT's
    fails("text: 'the red circle' there, 'a cat' now", out=labelled, tasks=TASKS, text="a cat")
    fails("source: ", out=labelled, tasks=TASKS, text=TEXT, src=tmp_path)
    assert before == {p.name: p.read_bytes() for p in labelled.iterdir() if p.is_file()}
    busy = tmp_path / "busy"
    with OutFolder.open(busy, _job_of(labelled)):
        fails("is being written by another flonnx label run", out=busy, tasks=TASKS, text=TEXT)


def test_a_job_that_labelled_nothing_may_be_redefined(synthetic, labelled, scenes, tmp_path):
    out = tmp_path / "out"
    OutFolder.open(out, _job_of(labelled)).close()  # as a run that failed before its first image
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted(scenes.glob("*.png"))[0], src / "a.png")
    summary = label(src, out, synthetic, ["<OD>"], progress=QUIET)
    assert summary.labelled == 1 and json.loads((out / JOB_FILE).read_text())["tasks"] == ["<OD>"]


def _job_of(out: Path):
    from flonnx.label.job import Job

    stored = json.loads((out / JOB_FILE).read_text())
    stored.pop("format")
    return Job(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def test_ray_without_the_extra_names_it(synthetic, scenes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"the 'ray' extra \(ray is missing\)"):
        label(scenes, tmp_path / "out", synthetic, ["<OD>"], ray=True, progress=QUIET)


def test_an_unreachable_ray_address_fails_fast(synthetic, scenes, tmp_path):
    pytest.importorskip("ray")
    for address, fragment in (
        ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
        ("x", "expected auto"),
    ):
        with pytest.raises(InputError, match=fragment):
            label(scenes, tmp_path / "out", synthetic, ["<OD>"], ray=address, progress=QUIET)
    assert not (tmp_path / "out").exists()


# -- command line ----------------------------------------------------------------------------------


def test_cli_labels_and_reports_errors_in_one_line(synthetic, scenes, labelled, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["label", str(scenes), str(out), "--model", str(synthetic), "--text", TEXT]
    args += [arg for task in TASKS for arg in ("--task", task)]
    assert cli.main([*args, "--workers", "2", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert f"{SCENES} images in {scenes}: 0 done before, {SCENES} to label" in err
    assert f"labelled {SCENES}/{SCENES} images (100%)" in err and "images/s" in err
    assert_same_outputs(labelled, out)
    assert cli.main([*args[:-2], "--task", "<NOPE>"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flonnx label: error: unknown task '<NOPE>'")
    assert (
        cli.main(["label", str(scenes), str(out), "--model", str(synthetic), "--task", "<OD>", "--quiet"])
        == 2
    )
    assert "holds a job with other settings (tasks: " in capsys.readouterr().err
