"""DaViT's window attention fused into MultiHeadAttention (quantize/attention.py) on the tiny export."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

from flonnx.quantize import get_recipe  # noqa: E402
from flonnx.quantize.attention import fuse_attention, fuse_window_attention  # noqa: E402
from flonnx.quantize.quantizer import quantize_component  # noqa: E402
from flonnx.quantize.recipes import ComponentRecipe  # noqa: E402
from flonnx.runtime.errors import InputError  # noqa: E402

# The tiny shape's DaViT depths are 1, 1, 2, 1: one spatial (window) block per layer.
TINY_WINDOW_BLOCKS = 5
TINY_CHANNEL_BLOCKS = 5


@pytest.fixture(scope="module")
def vision(tiny_export_dir) -> onnx.ModelProto:
    return onnx.load(str(tiny_export_dir / "onnx" / "vision_encoder.onnx"))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


def _run(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})[0]


def _pixels(batch: int, size: int = 768) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)


def test_every_window_attention_is_fused_and_channel_attention_is_left(vision):
    fused = _copy(vision)
    assert fuse_window_attention(fused) == TINY_WINDOW_BLOCKS
    assert _count(fused, "MultiHeadAttention") == TINY_WINDOW_BLOCKS
    assert _count(fused, "Softmax") == TINY_CHANNEL_BLOCKS == _count(vision, "Softmax") - TINY_WINDOW_BLOCKS
    heads = sorted(
        helper.get_attribute_value(a)
        for node in fused.graph.node
        if node.op_type == "MultiHeadAttention"
        for a in node.attribute
        if a.name == "num_heads"
    )
    assert heads == [1, 2, 3, 3, 4]  # the tiny shape's num_heads per stage, stage 3 twice
    assert len(fused.graph.node) < len(vision.graph.node)
    onnx.checker.check_model(fused)
    assert fuse_window_attention(fused) == 0  # nothing left to fuse: the rewrite is idempotent


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_graph_keeps_the_vision_output(vision, batch):
    fused = _copy(vision)
    fuse_window_attention(fused)
    pixels = _pixels(batch)
    expected = _run(vision, pixels)
    np.testing.assert_allclose(_run(fused, pixels), expected, rtol=0, atol=1e-5)


def test_channel_attention_fuses_exactly_when_asked(vision):
    """Not in the recipes (slower on the CPU measured, see attention.py), but kept exact."""
    fused = _copy(vision)
    assert fuse_attention(fused, ("window", "channel")) == {
        "window": TINY_WINDOW_BLOCKS,
        "channel": TINY_CHANNEL_BLOCKS,
    }
    assert _count(fused, "Softmax") == 0
    pixels = _pixels(2)
    np.testing.assert_allclose(_run(fused, pixels), _run(vision, pixels), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="window, channel"):
        fuse_attention(_copy(vision), ("global",))


def test_attention_that_does_not_match_is_left_as_it_is(vision):
    changed = _copy(vision)
    softmax = next(node for node in changed.graph.node if node.op_type == "Softmax")
    del softmax.attribute[:]
    softmax.attribute.append(helper.make_attribute("axis", 2))  # not over the keys: no attention
    assert fuse_window_attention(changed) == TINY_WINDOW_BLOCKS - 1
    assert softmax in changed.graph.node
    pixels = _pixels(1)
    kept = _copy(vision)
    next(n for n in kept.graph.node if n.op_type == "Softmax").attribute[0].i = 2
    np.testing.assert_allclose(_run(changed, pixels), _run(kept, pixels), rtol=0, atol=1e-5)


def test_recipe_flag_turns_the_rewrite_on_and_off(vision):
    preset = get_recipe("int8").component("vision_encoder")
    assert preset.fused_attention and get_recipe("int4").component("vision_encoder").fused_attention
    assert preset.as_dict()["fused_attention"] is True  # in the recorded recipe: caches re-quantize
    assert not get_recipe("fp16").component("vision_encoder").fused_attention
    with pytest.raises(InputError, match="fused_attention"):
        ComponentRecipe("fp32", fused_attention=True)
    with pytest.raises(InputError, match="fused_attention"):
        ComponentRecipe("fp16", float16=True, fused_attention=True)

    on = quantize_component(vision, preset, vocab_size=51289)
    off = quantize_component(vision, replace(preset, fused_attention=False), vocab_size=51289)
    assert _count(on, "MultiHeadAttention") == TINY_WINDOW_BLOCKS and _count(off, "MultiHeadAttention") == 0
    # Both quantize the same MatMul weights; the fused graph answers like the unfused one.
    assert _count(on, "DynamicQuantizeLinear") == _count(off, "DynamicQuantizeLinear")
    pixels = _pixels(1)
    fp32, with_fusion, without = _run(vision, pixels), _run(on, pixels), _run(off, pixels)
    norms = np.linalg.norm(with_fusion) * np.linalg.norm(fp32)
    cosine = float(np.dot(with_fusion.ravel(), fp32.ravel()) / norms)
    assert cosine > 0.995
    assert np.abs(with_fusion - fp32).max() <= 2 * np.abs(without - fp32).max() + 1e-3


def test_int4_vision_form_fuses_too(vision):
    recipe = get_recipe("int8").with_overrides({"vision_encoder": "int4"}).component("vision_encoder")
    model = quantize_component(vision, recipe, vocab_size=51289)
    assert _count(model, "MultiHeadAttention") == TINY_WINDOW_BLOCKS
    assert np.isfinite(_run(model, _pixels(1))).all()
