"""The runtimes a user would pick instead of flonnx, as the bench drives them.

- PyTorch (`transformers` generate) in float32, and in bfloat16 (`dtype=torch.bfloat16`, pixel
  values cast to bfloat16): on a CPU with AVX-512 BF16 or AMX a user gets the latter with one
  argument.
- transformers.js in Node (onnxruntime-node), through js/bench.mjs: one worker process per folder
  and dtype, loaded once, answering timed requests over stdin/stdout JSON lines. It runs our fp32
  and int8 folders, and an onnx-community-style q8 folder made from our fp32 graphs with
  transformers.js's own recipe (export/community.py): what its users download today.

Every side does the same work per request: preprocessing of an in-memory image, greedy generate
with a forced length (min_new_tokens = max_new_tokens), decoding and post-processing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from flonnx.runtime.errors import ExportError
from flonnx.runtime.folder import DTYPE_SUFFIXES
from flonnx.runtime.manifest import read_manifest, variant_data_files, variant_files

JS = Path(__file__).resolve().parents[1] / "js"
WORKER = JS / "bench.mjs"
STAMP = "bench-source.json"  # in the community folder: the fp32 files it was made from


class TorchSide:
    """`transformers` generate on the checkpoint, in float32 or (`bfloat16=True`) bfloat16."""

    def __init__(self, checkpoint: Path, threads: int, bfloat16: bool = False):
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.dtype = torch.bfloat16 if bfloat16 else torch.float32
        self.model = Florence2ForConditionalGeneration.from_pretrained(checkpoint, dtype=self.dtype).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)

    def _inputs(self, image, task: str):
        inputs = self.processor(text=task, images=image, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def run(self, image, task: str, new_tokens: int) -> tuple[list[int], float]:
        started = time.perf_counter()
        inputs = self._inputs(image, task)
        with self.torch.no_grad():
            ids = self.model.generate(
                **inputs, num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        text = self.processor.batch_decode(ids, skip_special_tokens=False)[0]
        self.processor.post_process_generation(text, task=task, image_size=image.size)
        return ids[0].tolist(), time.perf_counter() - started

    def vision_flops(self, image) -> dict[str, float]:
        """FLOPs of one vision encoder pass by aten op ("addmm", "convolution", ...), as PyTorch's
        FlopCounterMode counts them: a cross-check of bench_floors.graph_flops, which the floors use
        (the attention products inside scaled_dot_product_attention on CPU go uncounted here)."""
        from torch.utils.flop_counter import FlopCounterMode

        inputs = self._inputs(image, "<CAPTION>")
        with self.torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.model.get_image_features(inputs["pixel_values"])
        return {str(op).split(".")[-1]: float(n) for op, n in counter.get_flop_counts()["Global"].items()}

    def vision(self, image) -> float:
        inputs = self._inputs(image, "<CAPTION>")
        started = time.perf_counter()
        with self.torch.no_grad():
            self.model.get_image_features(inputs["pixel_values"])
        return time.perf_counter() - started


def bf16_reason(mode: str, cpu: dict) -> tuple[bool, str]:
    """Whether the PyTorch bfloat16 peer runs under `mode`, and why (for the progress line)."""
    supported = cpu["avx512_bf16"] or cpu["amx_bf16"]
    if mode == "off":
        return False, "--bf16 off"
    if mode == "on":
        return True, "--bf16 on" + ("" if supported else " (this CPU has no bf16 instructions: emulated)")
    if supported:
        return True, "the CPU has " + " and ".join(f for f in ("avx512_bf16", "amx_bf16") if cpu[f])
    return False, "the CPU has neither avx512_bf16 nor amx_bf16 (--bf16 on runs it anyway)"


def transformers_js_missing(js: Path = JS) -> str | None:
    """Why transformers.js cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (js / "node_modules" / "@huggingface" / "transformers").is_dir():
        return f"transformers.js is not installed in {js / 'node_modules'} (run `make setup`)"
    return None


class TransformersJsSide:
    """One js/bench.mjs worker: `folder` loaded once with the transformers.js `dtype`."""

    def __init__(self, folder: Path, dtype: str, threads: int, timeout: float = 600):
        self.timeout = timeout
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would stall the worker
        job = json.dumps({"folder": str(folder), "dtype": dtype, "threads": threads})
        self.process = subprocess.Popen(
            [shutil.which("node") or "node", str(WORKER), job],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.where = f"transformers.js ({dtype}) on {folder}"
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=self.timeout)
            self._stderr.seek(0)
            raise ExportError(
                f"{self.where} exited ({self.process.returncode}): {self._stderr.read().strip()[-2000:]}"
            )
        message = json.loads(line)
        if "error" in message:
            raise ExportError(f"{self.where} failed: {message['error']}")
        return message

    def run(self, image_path: Path, task: str, new_tokens: int) -> tuple[list[int], float]:
        request = {"image": str(image_path), "task": task, "new_tokens": new_tokens}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        return answer["ids"], answer["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def js_dtype(manifest: dict, variant: str) -> str | None:
    """The transformers.js dtype that loads `variant`'s files: the one whose suffix they carry."""
    file = Path(manifest["variants"][variant]["vision_encoder"]["file"]).name
    for dtype, suffix in sorted(DTYPE_SUFFIXES.items(), key=lambda item: -len(item[1])):
        if file == f"vision_encoder{suffix}.onnx":
            return dtype
    return None


def community_folder(export_dir: Path, out: Path, progress) -> Path:
    """`out` as onnx-community would publish `export_dir`'s fp32 graphs, with transformers.js's q8
    recipe (export/community.py); made when missing or when the fp32 graphs changed."""
    manifest = read_manifest(export_dir)
    names = [*variant_files(manifest, "fp32").values(), *variant_data_files(manifest, "fp32")]
    source = {name: manifest["files"][name]["sha256"] for name in sorted(names)}
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == source:
        return out
    from .community import make_community_folder

    progress(f"making an onnx-community-style q8 folder (transformers.js's recipe) in {out}")
    make_community_folder(export_dir, out, dtypes=("q8",), progress=lambda line: progress(f"  {line}"))
    stamp.write_text(json.dumps(source, indent=2) + "\n")
    return out
