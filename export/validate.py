"""Export is done only when the ONNX graphs agree with PyTorch.

Like optimum's `validate_model_outputs`: every graph runs on several shapes next to its PyTorch
module, every difference is recorded, and all failures are collected before one error is raised.
Then greedy generation driven by the ONNX graphs must give the same tokens as `generate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from flonnx.runtime.errors import ValidationError

from .graphs import Decoder, DecoderShape, EmbedTokens, TextEncoder, past_names

TOLERANCE = 1e-4
PARITY_TASKS = ("<CAPTION>", "<OD>")


@dataclass(frozen=True)
class Check:
    graph: str
    case: str
    output: str
    max_abs_diff: float
    passed: bool


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _compare(graph: str, case: str, actual: dict, expected: dict, tolerance: float) -> list[Check]:
    checks = []
    for name, reference in expected.items():
        reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
        value = actual[name]
        if value.shape != reference.shape:
            checks.append(Check(graph, case, name, float("inf"), False))
            continue
        diff = float(np.abs(value - reference).max()) if value.size else 0.0
        checks.append(Check(graph, case, name, diff, bool(diff <= tolerance)))
    return checks


def _padded_mask(batch: int, length: int, pad: int) -> np.ndarray:
    mask = np.ones((batch, length), np.int64)
    if batch > 1 and pad:
        mask[-1, length - pad :] = 0
    return mask


class GraphValidator:
    """Runs each exported graph against its PyTorch module on several shapes."""

    def __init__(self, model, onnx_dir: Path, image_size: int, tolerance: float = TOLERANCE, seed: int = 0):
        self.model = model
        self.dir = onnx_dir
        self.image_size = image_size
        self.tolerance = tolerance
        self.rng = np.random.default_rng(seed)
        self.shape = DecoderShape.of(model)
        self.d_model = model.config.text_config.d_model
        self.vocab = model.config.text_config.vocab_size
        self.checks: list[Check] = []

    def _random_ids(self, batch: int, length: int) -> np.ndarray:
        return self.rng.integers(3, min(self.vocab, 51289), size=(batch, length), dtype=np.int64)

    def vision(self) -> np.ndarray:
        session = _session(self.dir / "vision_encoder.onnx")
        features = None
        for batch in (1, 2):
            pixels = self.rng.standard_normal((batch, 3, self.image_size, self.image_size)).astype(np.float32)
            actual = _run(session, {"pixel_values": pixels})
            with torch.no_grad():
                # transformers itself: the wrapper computes it in another layout (graphs.py)
                expected = {
                    "image_features": self.model.get_image_features(torch.from_numpy(pixels)).pooler_output
                }
            self.checks += _compare("vision_encoder", f"batch={batch}", actual, expected, self.tolerance)
            features = expected["image_features"].numpy()
        return features

    def embed(self) -> None:
        session = _session(self.dir / "embed_tokens.onnx")
        module = EmbedTokens(self.model).eval()
        for batch, length in ((1, 7), (2, 12)):
            ids = self._random_ids(batch, length)
            with torch.no_grad():
                expected = {"inputs_embeds": module(torch.from_numpy(ids))}
            actual = _run(session, {"input_ids": ids})
            self.checks += _compare(
                "embed_tokens", f"batch={batch} length={length}", actual, expected, self.tolerance
            )

    def encoder(self, image_features: np.ndarray) -> None:
        session = _session(self.dir / "encoder_model.onnx")
        module = TextEncoder(self.model).eval()
        n_image = image_features.shape[1]
        for batch, n_text in ((1, 8), (2, 20)):
            embeds = np.concatenate(
                [
                    np.repeat(image_features[:1], batch, axis=0),
                    self.rng.standard_normal((batch, n_text, self.d_model)).astype(np.float32),
                ],
                axis=1,
            )
            mask = _padded_mask(batch, n_image + n_text, pad=5)
            with torch.no_grad():
                expected = {"last_hidden_state": module(torch.from_numpy(embeds), torch.from_numpy(mask))}
            actual = _run(session, {"inputs_embeds": embeds, "attention_mask": mask})
            case = f"batch={batch} length={n_image + n_text}"
            self.checks += _compare("encoder_model", case, actual, expected, self.tolerance)

    def decoder(self) -> None:
        """Step 0 (no past) and a later step (past > 0), against the wrappers and `transformers`."""
        from transformers.modeling_outputs import BaseModelOutput

        session = _session(self.dir / "decoder_model_merged.onnx")
        embed = EmbedTokens(self.model).eval()
        first, later = Decoder(self.model, with_past=False).eval(), Decoder(self.model, with_past=True).eval()
        layers, heads, head_dim = self.shape.layers, self.shape.heads, self.shape.head_dim
        for batch, prefix, encoder_length in ((1, 1, 40), (2, 3, 60)):
            ids = self._random_ids(batch, prefix + 1)
            ids[:, 0] = self.model.config.text_config.decoder_start_token_id
            hidden = self.rng.standard_normal((batch, encoder_length, self.d_model)).astype(np.float32)
            mask = _padded_mask(batch, encoder_length, pad=7)
            with torch.no_grad():
                embeds = embed(torch.from_numpy(ids)).numpy()
                reference = self.model(
                    encoder_outputs=BaseModelOutput(last_hidden_state=torch.from_numpy(hidden)),
                    attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(ids),
                ).logits.numpy()
            empty = {name: np.zeros((batch, heads, 0, head_dim), np.float32) for name in past_names(layers)}
            feed = {
                "inputs_embeds": embeds[:, :prefix],
                "encoder_attention_mask": mask,
                "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([False]),
                **empty,
            }
            actual = _run(session, feed)
            with torch.no_grad():
                outputs = first(*(torch.from_numpy(feed[name]) for name in first.input_names()))
            case = f"batch={batch} past=0 length={prefix}"
            self.checks += _compare(
                "decoder_model_merged", case, actual, dict(zip(first.output_names(), outputs)), self.tolerance
            )
            self.checks += _compare(
                "decoder_model_merged",
                case + " vs transformers",
                {"logits": actual["logits"]},
                {"logits": reference[:, :prefix]},
                self.tolerance,
            )

            past = {name: actual[name.replace("past_key_values", "present")] for name in past_names(layers)}
            feed = {
                "inputs_embeds": embeds[:, prefix:],
                "encoder_attention_mask": mask,
                "encoder_hidden_states": np.zeros((batch, 0, self.d_model), np.float32),
                "use_cache_branch": np.array([True]),
                **past,
            }
            actual = _run(session, feed)
            with torch.no_grad():
                outputs = later(*(torch.from_numpy(feed[name]) for name in later.input_names()))
            case = f"batch={batch} past={prefix} length=1"
            self.checks += _compare(
                "decoder_model_merged", case, actual, dict(zip(later.output_names(), outputs)), self.tolerance
            )
            self.checks += _compare(
                "decoder_model_merged",
                case + " vs transformers",
                {"logits": actual["logits"]},
                {"logits": reference[:, prefix:]},
                self.tolerance,
            )

    def run(self) -> dict:
        features = self.vision()
        self.embed()
        self.encoder(features)
        self.decoder()
        return {
            "tolerance": self.tolerance,
            "checks": [asdict(check) for check in self.checks],
            "max_abs_diff": {
                graph: max(c.max_abs_diff for c in self.checks if c.graph == graph)
                for graph in dict.fromkeys(c.graph for c in self.checks)
            },
        }

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def onnx_greedy(sessions: dict, pixel_values: np.ndarray, text_ids: np.ndarray, options) -> list[int]:
    """Greedy tokens from the four graphs (`sessions` by component name), with the runtime's loop."""
    from flonnx.runtime.decoding import CacheLayout, greedy_decode

    embed, decoder = sessions["embed_tokens"], sessions["decoder_model_merged"]
    features = sessions["vision_encoder"].run(None, {"pixel_values": pixel_values})[0]
    embeds = np.concatenate([features, embed.run(None, {"input_ids": text_ids})[0]], axis=1)
    mask = np.ones(embeds.shape[:2], np.int64)
    hidden = sessions["encoder_model"].run(None, {"inputs_embeds": embeds, "attention_mask": mask})[0]
    key = next(i for i in decoder.get_inputs() if i.name.startswith("past_key_values"))
    layers = sum(1 for i in decoder.get_inputs() if i.name.endswith(".decoder.key"))
    layout = CacheLayout(layers=layers, heads=key.shape[1], head_dim=key.shape[3])
    return greedy_decode(embed, decoder, hidden, mask, options, layout)[0]


def _generate(model, inputs: dict, n_image: int, max_new_tokens: int) -> list[int]:
    """`generate` on the processor's inputs. A converted original checkpoint has no `<image>` row
    (its vocabulary is the original 51289): its image features are prepended to the text
    embeddings, as the original remote code did, and generate starts from the encoder's output."""
    options = {"num_beams": 1, "do_sample": False, "max_new_tokens": max_new_tokens}
    if model.config.image_token_id < model.config.text_config.vocab_size:
        return model.generate(**inputs, **options)[0].tolist()
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    text = model.get_input_embeddings()(inputs["input_ids"][:, n_image:])
    embeds = torch.cat([features, text], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    encoded = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
    return model.generate(encoder_outputs=encoded, attention_mask=mask, **options)[0].tolist()


def token_parity(
    model, processor, onnx_dir: Path, tasks=PARITY_TASKS, max_new_tokens: int = 24, seed: int = 0
) -> list[dict]:
    """Greedy tokens from the ONNX graphs against `model.generate(num_beams=1, do_sample=False)`,
    both under the checkpoint's own generation config (forced BOS/EOS, no-repeat n-grams)."""
    from PIL import Image

    from flonnx.runtime.decoding import GenerationOptions

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    options = GenerationOptions.from_config(
        model.generation_config.to_dict(),
        model.config.text_config.max_position_embeddings,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
    )
    n_image = processor.num_image_tokens
    names = ("vision_encoder", "embed_tokens", "encoder_model", "decoder_model_merged")
    sessions = {name: _session(onnx_dir / f"{name}.onnx") for name in names}
    results = []
    for task in tasks:
        inputs = processor(text=task, images=image, return_tensors="pt")
        with torch.no_grad():
            expected = _generate(model, inputs, n_image, max_new_tokens)
        actual = onnx_greedy(
            sessions, inputs["pixel_values"].numpy(), inputs["input_ids"][:, n_image:].numpy(), options
        )
        results.append(
            {
                "task": task,
                "tokens": len(expected) - 1,
                "equal": actual == expected,
                "expected": expected,
                "actual": actual,
            }
        )
    return results


def validate_export(model, processor, onnx_dir: Path, image_size: int, tolerance: float = TOLERANCE) -> dict:
    """The validation report; raises ValidationError listing every failure."""
    validator = GraphValidator(model, onnx_dir, image_size, tolerance)
    report = validator.run()
    parity = token_parity(model, processor, onnx_dir)
    report["token_parity"] = [
        {k: v for k, v in r.items() if k in ("task", "tokens", "equal")} for r in parity
    ]
    problems = [
        f"{c.graph} [{c.case}] {c.output}: max abs diff {c.max_abs_diff:.3g} > {tolerance:g}"
        for c in validator.failures()
    ]
    problems += [
        f"token parity {r['task']}: onnx {r['actual']} != torch {r['expected']}"
        for r in parity
        if not r["equal"]
    ]
    report["passed"] = not problems
    if problems:
        raise ValidationError("validation failed:\n  " + "\n  ".join(problems), report)
    return report
