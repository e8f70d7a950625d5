"""Web packs in a real browser: pack size, load time and answers against flonnx (README's table).

Each variant of FOLDER is packed (`flonnx pack --target web`), served on 127.0.0.1 and opened in
Debian's chromium (headless, js/browser.mjs); the page runs TASKS on synthetic scenes drawn at the
model's input size (so both sides see the same pixels) and its generated tokens are compared with
flonnx's on the source variant:

    python tools/web_report.py FOLDER [--variants fp32 int8] [--scenes 2] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("<CAPTION>", "<OD>")
SEED = 777


def _browse(url: str, requests: list[dict], max_new_tokens: int) -> dict:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed: run `make setup`")
    job = {"url": url, "chromium": chromium, "max_new_tokens": max_new_tokens, "requests": requests}
    job["timeout_ms"] = 3_600_000
    done = subprocess.run(
        ["node", str(ROOT / "js" / "browser.mjs"), json.dumps(job)], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"the page failed: {done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(folder: Path, variant: str, work: Path, scenes: int, max_new_tokens: int) -> dict:
    from PIL import Image

    from flonnx.pack import Progress, pack
    from flonnx.pack.serve import serve_in_thread, url_of
    from flonnx.runtime.model import Florence2, Request
    from flonnx.runtime.synthetic import make_scene

    started = time.perf_counter()
    result = pack(folder, "web", variant=variant, out=work / variant, force=True, progress=Progress())
    pack_seconds = time.perf_counter() - started
    model = Florence2.load(folder, variant=variant)
    side = int(model.manifest["model"]["image_size"])  # scenes at the input size: no resize on either side
    size = (side, side)
    requests, expected = [], []
    for index in range(scenes):
        image = make_scene(SEED, index).image.resize(size, Image.Resampling.BICUBIC)
        image.save(result.folder / f"scene-{index}.png")
        for task in TASKS:
            requests.append({"image": f"scene-{index}.png", "task": task, "text": ""})
            found = model.run_batch([Request(image, task)], max_new_tokens=max_new_tokens, num_beams=1)[0]
            expected.append(found.tokens)
    server = serve_in_thread(result.folder)
    try:
        page = _browse(url_of(server), requests, max_new_tokens)
    finally:
        server.shutdown()
        server.server_close()
    equal = sum(their.get("ids") == ours for their, ours in zip(page["results"], expected))
    sizes = result.manifest["pack"]["sizes"]
    return {
        "variant": variant,
        "pack_mb": round(sizes["pack_graphs"] / 1e6, 1),
        "source_mb": round(sizes["source_variant"] / 1e6, 1),
        "duplicated_mb": round(result.manifest["pack"]["duplicated_bytes"] / 1e6, 1),
        "pack_seconds": round(pack_seconds, 1),
        "browser_load_seconds": round(page["load_seconds"], 2),
        "browser_task_seconds": [round(r.get("seconds", float("nan")), 2) for r in page["results"]],
        "threads": page["threads"],
        "equal": equal,
        "total": len(expected),
        "errors": page["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, help="where the packs go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        for variant in args.variants:
            print(
                json.dumps(report(args.folder, variant, work, args.scenes, args.max_new_tokens)), flush=True
            )


if __name__ == "__main__":
    main()
