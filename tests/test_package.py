"""flonnx as users get it: the wheel and sdist installed alone into fresh venvs, `--version`,
`flonnx info`, and the first-contact errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from flonnx.runtime import cli

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "export" / "data" / "synthetic-florence2"
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
# Run the CLI in a subprocess whose heavy stages cannot import, as on a runtime-only install.
WITHOUT_EXTRAS = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'onnx', 'onnxscript'): sys.modules[name] = None\n"
    "from flonnx.runtime.cli import main\n"
    "sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["export", "SRC", "OUT"], "export"),
        (["export", "SRC", "OUT", "--image-size", "768", "--force"], "export"),
        (["export"], "export"),
        (["quantize", "FOLDER", "--recipe", "int8"], "quantize"),
        (["bench", "--size", "base", "--threads", "2"], "export"),
    ],
)
def test_missing_extra_is_named_whatever_arguments_follow(args, extra):
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"flonnx {args[0]}: error: this needs the '{extra}' extra "
        f"({'onnx' if extra == 'quantize' else 'torch'} is missing): in a flonnx clone, pip install "
        f"'.[{extra}]' (or pip install 'flonnx-VERSION-py3-none-any.whl[{extra}]')"
    ]


def test_unknown_arguments_are_still_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_version_is_the_one_in_pyproject(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"flonnx {VERSION}"


def test_info_tells_what_this_machine_offers(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import onnxruntime

    assert info["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in info["providers"]
    assert info["default_threads"] == info["physical_cores"] >= 1
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert ("AVX2" in info["cpu_features"]) == (" avx2" in flags)
    assert cli.main(["info"]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_info_describes_a_folder_and_whether_it_verifies(tiny_export_dir, tmp_path, capsys):
    assert cli.main(["info", str(tiny_export_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["format"] == "native" and info["validation"]["passed"]
    fp32 = info["variants"]["fp32"]
    assert fp32["verified"] and set(fp32["dtypes"].values()) == {"fp32"}
    manifest = json.loads((tiny_export_dir / "flonnx.json").read_text())
    assert fp32["bytes"] == sum(r["size"] for n, r in manifest["files"].items() if n.startswith("onnx/"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export_dir, copy)
    graph = copy / "onnx" / "embed_tokens.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    assert cli.main(["info", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "NOT verified" in out and "embed_tokens.onnx does not match the sha256" in out


# -- the wheel, installed alone ----------------------------------------------------------------------


def _venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin"


def _pip(bin_dir: Path, *args: str) -> None:
    subprocess.run([bin_dir / "pip", "install", "--quiet", *args], check=True)


def _flonnx(bin_dir: Path, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [bin_dir / "flonnx", *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, "CI": "1"}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build`: the sdist and the wheel of this checkout."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    return out


def test_wheel_and_sdist_carry_what_users_need_and_nothing_else(dist):
    wheel = next(dist.glob(f"flonnx-{VERSION}-py3-none-any.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "flonnx/runtime/model.py" in names and "flonnx/export/exporter.py" in names
    assert "flonnx/export/data/synthetic-florence2/model.safetensors" in names
    assert "flonnx/export/data/florence2_tokenizer.json.gz" in names
    assert {"flonnx/pack/page/index.html", "flonnx/pack/page/app.js"} <= set(names)  # the web pack's page
    assert not [
        n for n in names if n.startswith(("tests/", "tools/", "artifacts/", ".venv")) or "/tests/" in n
    ]
    assert wheel.stat().st_size < 15_000_000
    with tarfile.open(next(dist.glob(f"flonnx-{VERSION}.tar.gz"))) as sdist:
        members = sdist.getnames()
    assert f"flonnx-{VERSION}/pyproject.toml" in members and f"flonnx-{VERSION}/README.md" in members
    assert not [m for m in members if "/artifacts/" in m or "/.venv/" in m or "/node_modules/" in m]


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory) -> Path:
    from flonnx.export.exporter import Progress, export

    out = tmp_path_factory.mktemp("shipped") / "export"
    export(str(SHIPPED), out, image_size=160, progress=Progress(quiet=True))
    return out


def test_runtime_only_wheel_runs_an_export(dist, shipped_export, tmp_path):
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, str(next(dist.glob("*.whl"))))
    assert _flonnx(bin_dir, "--version").strip() == f"flonnx {VERSION}"
    assert "onnxruntime" in _flonnx(bin_dir, "info")
    image = tmp_path / "scene.png"
    shutil.copy(REPO / "export" / "data" / "synthetic-sample.png", image)
    record = json.loads(_flonnx(bin_dir, "run", str(shipped_export), str(image), "--task", "<CAPTION>"))
    from flonnx.runtime import Florence2

    assert record["<CAPTION>"] == Florence2.load(shipped_export).run(str(image), "<CAPTION>")["<CAPTION>"]
    scores = _flonnx(bin_dir, "eval", str(shipped_export), "--synthetic", "4", "--threads", "2")
    assert "<CAPTION>" in scores
    importable = subprocess.run([bin_dir / "python", "-c", "import torch"], capture_output=True)
    assert importable.returncode != 0  # the runtime pulled no torch in
    # the first-contact error of a runtime-only install
    result = subprocess.run([bin_dir / "flonnx", "export", "SRC", "OUT"], capture_output=True, text=True)
    assert result.returncode == 2 and "needs the 'export' extra" in result.stderr


def test_export_extra_wheel_exports_the_shipped_model(dist, tmp_path):
    bin_dir = _venv(tmp_path / "venv")
    _pip(bin_dir, "torch==2.13.0")  # the CPU build first, as README says
    _pip(bin_dir, f"{next(dist.glob('*.whl'))}[export]")
    shipped = subprocess.run(
        [
            bin_dir / "python",
            "-c",
            "import flonnx.export, pathlib; "
            "print(pathlib.Path(flonnx.export.__file__).parent / 'data' / 'synthetic-florence2')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    _flonnx(bin_dir, "export", shipped, str(tmp_path / "out"), "--image-size", "160", "--quiet")
    manifest = json.loads((tmp_path / "out" / "flonnx.json").read_text())
    assert manifest["validation"]["passed"]


def test_readme_installs_the_way_the_smoke_tests_do():
    """README's install section names commands that work today: no package `flonnx` is published."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("pip install")]
    assert commands[0] == "pip install ."
    assert "pip install flonnx" not in commands and "pip install 'flonnx[export]'" not in commands
    assert "pip install '.[export,quantize]'" in commands
    for line in ("flonnx --version", "flonnx info"):  # run by test_runtime_only_wheel_runs_an_export
        assert line in section
