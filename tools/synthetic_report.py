"""The accuracy table of the shipped synthetic-scene model: PyTorch, then every variant of its export.

    python tools/synthetic_report.py --export artifacts/synthetic-onnx --count 300

Exports the checkpoint first when the folder has no flonnx.json. The PyTorch column is the checkpoint
as the exporter loads it (float32); the fp32 column must give the same tokens for every request, and
the report counts the requests where it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flonnx.runtime.evaluate import DEFAULT_SEED, evaluate, format_table

SHIPPED = Path(__file__).resolve().parents[1] / "export" / "data" / "synthetic-florence2"


def _trainer():
    """tools/train_synthetic.py, which holds the model's settings and the PyTorch generation."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_synthetic

    return train_synthetic


def torch_answerer(checkpoint: Path, tokens: list):
    from transformers import Florence2ForConditionalGeneration

    train_synthetic = _trainer()
    model = Florence2ForConditionalGeneration.from_pretrained(checkpoint, dtype="float32").eval()
    data = train_synthetic.Data(0, 1, 1, 1, checkpoint)

    def answer(pairs):
        answers, ids = train_synthetic.generate(model, data, pairs)
        tokens.extend(ids)
        return answers

    return answer


def runtime_answerer(model, tokens: list):
    from flonnx.runtime.model import Request

    def answer(pairs):
        features = {}
        for scene, _ in pairs:
            if id(scene) not in features:
                features[id(scene)] = model.encode_image(scene.image)
        results = model.run_batch(
            [Request(features[id(s)], e.task, e.text, e.region) for s, e in pairs], max_new_tokens=64
        )
        tokens.extend(r.tokens for r in results)
        return [r.answer for r in results]

    return answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED))
    parser.add_argument(
        "--export", default="artifacts/synthetic-onnx", help="export folder (made if missing)"
    )
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--variant", action="append", help="variants to score (default: all in the folder)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    parser.add_argument("--json", help="write the metrics and the parity count here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoint, folder = Path(args.checkpoint), Path(args.export)
    if not (folder / "flonnx.json").is_file():
        from flonnx.export.exporter import Progress, export

        export(str(checkpoint), folder, image_size=_trainer().IMAGE_SIZE, force=True, progress=Progress())

    from flonnx.runtime.model import Florence2

    rows, tokens, seconds = {}, {}, {}
    if not args.no_torch:
        tokens["pytorch"] = []
        started = time.perf_counter()
        rows["pytorch"] = evaluate(torch_answerer(checkpoint, tokens["pytorch"]), args.count, args.seed)[0]
        seconds["pytorch"] = time.perf_counter() - started
    variants = args.variant or list(json.loads((folder / "flonnx.json").read_text())["variants"])
    for variant in variants:
        tokens[variant] = []
        model = Florence2.load(folder, variant=variant, threads=1)
        started = time.perf_counter()
        rows[variant] = evaluate(runtime_answerer(model, tokens[variant]), args.count, args.seed)[0]
        seconds[variant] = time.perf_counter() - started
    print(format_table(rows))
    report = {"count": args.count, "seed": args.seed, "metrics": rows, "seconds": seconds}
    if "pytorch" in tokens and "fp32" in tokens:
        differ = sum(a != b for a, b in zip(tokens["pytorch"], tokens["fp32"]))
        report["pytorch_vs_fp32"] = {"requests": len(tokens["fp32"]), "different_tokens": differ}
        print(
            f"\nPyTorch vs fp32 export: {differ} of {len(tokens['fp32'])} requests generate different tokens"
        )
    for variant in variants:
        if variant != "fp32" and "fp32" in tokens:
            differ = sum(a != b for a, b in zip(tokens[variant], tokens["fp32"]))
            report[f"{variant}_vs_fp32"] = {"requests": len(tokens["fp32"]), "different_tokens": differ}
            print(f"{variant} vs fp32: {differ} of {len(tokens['fp32'])} requests generate different tokens")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
