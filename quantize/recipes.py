"""Quantization recipes: named, validated presets saying what happens to each component.

A recipe maps each of the four components to a `ComponentRecipe`; `with_overrides` swaps single
components for another dtype's form (fp32, int8, int4, fp16, q4f16), so a sensitive component can
stay at higher precision. fp16 and q4f16 compute in float16 with float32 inputs and outputs (see
float16.py): they are for GPUs and WebGPU, and slower than fp32 on x86 CPUs and in WASM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from flonnx.runtime.errors import InputError
from flonnx.runtime.manifest import COMPONENTS

DTYPES = ("fp32", "int8", "int4", "fp16", "q4f16")
# Labels of the forms that compute in float16 (transformers.js's names, as the runtime reads them).
FLOAT16_DTYPES = ("fp16", "q4f16")
# How 8-bit MatMuls run: "dynamic" quantizes activations per call (DynamicQuantizeMatMul, fast at
# many rows: encoders); "nbits" is the MatMulNBits kernel (fast at one row: decode steps).
KERNELS = ("dynamic", "nbits")
# MatMuls a 4-bit component can keep at 8 bits, found by graph structure (see quantizer.find_role).
ROLES = ("lm_head", "cross_attention_kv")
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class ComponentRecipe:
    """What happens to one graph. `dtype` is the label the manifest records for it."""

    dtype: str = "fp32"
    matmul_bits: int | None = None  # None: MatMuls stay fp32; else 8 or 4 bits per weight
    kernel: str = "dynamic"  # 8 bits: "dynamic" or "nbits" (see KERNELS); 4 bits: "nbits"
    per_channel: bool = True  # dynamic int8 weights: one scale per output column
    block_size: int = 32  # MatMulNBits: weights per scale
    accuracy_level: int = 4  # MatMulNBits computes with int8 activations: the fast CPU path
    eight_bit_roles: tuple[str, ...] = ()  # in a 4-bit component, MatMuls kept at 8 bits
    eight_bit_block_size: int = 256
    gather_tables_int8: bool = False  # embedding tables as int8 with a per-row scale
    conv_weights_int8: bool = False  # conv weights stored int8 (per output channel), computed in fp32
    float16: bool = False  # then float16 compute with float32 inputs and outputs (float16.py)
    # DaViT's window attention as com.microsoft.MultiHeadAttention nodes (attention.py), before
    # quantizing; a graph without that attention is left as it is.
    fused_attention: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}, expected one of: {', '.join(DTYPES)}")
        if self.matmul_bits not in (None, 4, 8):
            raise InputError(f"matmul_bits must be None, 4 or 8, got {self.matmul_bits!r}")
        if self.kernel not in KERNELS:
            raise InputError(f"unknown kernel {self.kernel!r}, expected one of: {', '.join(KERNELS)}")
        if self.matmul_bits == 4 and self.kernel != "nbits":
            raise InputError("4-bit MatMuls need kernel='nbits' (MatMulNBits)")
        for name in ("block_size", "eight_bit_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise InputError(f"{name} must be a power of two >= 16, got {value!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        unknown = [role for role in self.eight_bit_roles if role not in ROLES]
        if unknown:
            raise InputError(f"unknown MatMul role {', '.join(unknown)}, expected one of: {', '.join(ROLES)}")
        if self.eight_bit_roles and self.matmul_bits != 4:
            raise InputError("eight_bit_roles only apply to a component with 4-bit MatMuls")
        if self.dtype == "fp32" and self.changes_graph:
            raise InputError("an fp32 component recipe cannot quantize anything")
        if self.dtype != "fp32" and not self.changes_graph:
            raise InputError(f"a {self.dtype} component recipe must quantize something")
        if self.float16 != (self.dtype in FLOAT16_DTYPES):
            raise InputError(
                f"float16=True goes with the dtypes {', '.join(FLOAT16_DTYPES)}, not {self.dtype}"
            )
        if self.dtype == "fp16" and self.quantizes:
            raise InputError("an fp16 component recipe converts to float16 and quantizes nothing")
        if self.dtype == "q4f16" and not self.quantizes:
            raise InputError("a q4f16 component recipe must quantize something before float16")
        if self.fused_attention and self.dtype == "fp32":
            raise InputError("fused_attention rewrites a quantized graph; the fp32 graph is the export's own")
        if self.fused_attention and self.float16:
            raise InputError("fused_attention is for float32 compute (not measured with float16)")
        if self.float16 and self.kernel == "dynamic" and self.matmul_bits == 8:
            raise InputError("dynamic int8 MatMuls have no float16 kernel; use kernel='nbits'")
        if self.float16 and self.matmul_bits and self.accuracy_level == 4:
            # onnxruntime 1.32's CPU MatMulNBits with float16 activations at accuracy level 4 gave
            # wrong outputs inside the merged decoder (synthetic model: logits cosine 0.44; the
            # three fc2 MatMuls, K=320, alone; right in isolation): level 0 dequantizes instead.
            raise InputError("float16 MatMulNBits take accuracy_level 0..3, not 4 (wrong outputs measured)")

    @property
    def quantizes(self) -> bool:
        return bool(self.matmul_bits or self.gather_tables_int8 or self.conv_weights_int8)

    @property
    def changes_graph(self) -> bool:
        return self.quantizes or self.float16

    def as_dict(self) -> dict:
        values = asdict(self)
        values["eight_bit_roles"] = list(self.eight_bit_roles)
        return values


FP32 = ComponentRecipe()
FP16 = ComponentRecipe("fp16", float16=True)
_INT4_MATMULS = ComponentRecipe("int4", matmul_bits=4, kernel="nbits", gather_tables_int8=True)
_Q4F16_MATMULS = replace(_INT4_MATMULS, dtype="q4f16", float16=True, accuracy_level=0)

# The form each component takes at each dtype; `None`: that component has no such form.
COMPONENT_PRESETS: dict[str, dict[str, ComponentRecipe | None]] = {
    "fp32": dict.fromkeys(COMPONENTS, FP32),
    "int8": {
        # int8 Conv is several times slower than fp32 on CPU, so convolutions stay fp32. Their
        # weights stay fp32 too: stored int8 behind a DequantizeLinear they are dequantized on
        # every run and miss onnxruntime's NCHWc prepacking (base, 2 threads: vision 2.71 s against
        # 2.42 s, for 19 MB, 1.8% of the fp32 bundle). Window attention fused (attention.py):
        # base, 2 threads (AMD EPYC, AVX-512 VNNI), vision 1.052 -> 0.993 s, peak RSS -38 MB.
        "vision_encoder": ComponentRecipe("int8", matmul_bits=8, fused_attention=True),
        "embed_tokens": ComponentRecipe("int8", gather_tables_int8=True),
        "encoder_model": ComponentRecipe("int8", matmul_bits=8, gather_tables_int8=True),
        # A decode step multiplies one row: MatMulNBits reads int8 weights faster than
        # DynamicQuantizeMatMul (base, 1 thread: 7.5 ms against 10.1 ms; fp32 23.4 ms).
        "decoder_model_merged": ComponentRecipe(
            "int8", matmul_bits=8, kernel="nbits", block_size=256, gather_tables_int8=True
        ),
    },
    "int4": {
        "vision_encoder": ComponentRecipe(
            "int4", matmul_bits=4, kernel="nbits", conv_weights_int8=True, fused_attention=True
        ),
        "embed_tokens": None,
        "encoder_model": _INT4_MATMULS,
        "decoder_model_merged": replace(_INT4_MATMULS, eight_bit_roles=ROLES),
    },
    "fp16": dict.fromkeys(COMPONENTS, FP16),
    # int4's forms, then float16: MatMulNBits and GatherBlockQuantized take float16 scales and
    # activations. Vision's convolutions are float16, not int8-stored: an int8-stored weight would
    # be dequantized in float32 and cast on every run (DequantizeLinear takes a float16 scale only
    # from opset 19; the export's is 17).
    "q4f16": {
        "vision_encoder": replace(_Q4F16_MATMULS, gather_tables_int8=False),
        # 8-bit rows: the table lm_head's 8-bit codes share (see Recipe.tie_embedding)
        "embed_tokens": ComponentRecipe("q4f16", gather_tables_int8=True, float16=True),
        "encoder_model": _Q4F16_MATMULS,
        "decoder_model_merged": replace(_Q4F16_MATMULS, eight_bit_roles=ROLES),
    },
}


def component_preset(component: str, dtype: str) -> ComponentRecipe:
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}, expected one of: {', '.join(COMPONENTS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} for {component}, expected one of: {', '.join(DTYPES)}")
    preset = COMPONENT_PRESETS[dtype][component]
    if preset is None:
        valid = [d for d in DTYPES if COMPONENT_PRESETS[d][component] is not None]
        raise InputError(f"{component} has no {dtype} form, expected one of: {', '.join(valid)}")
    return preset


@dataclass(frozen=True)
class Recipe:
    """A named preset: the file suffix of its variant and one ComponentRecipe per component."""

    name: str
    suffix: str  # transformers.js file suffix: "_quantized" (8-bit), "_q4" (4-bit), "_fp16", "_q4f16"
    components: Mapping[str, ComponentRecipe]
    description: str = ""
    overrides: Mapping[str, str] = field(default_factory=dict)
    # Florence-2 ties lm_head to the token embedding: store that table once, as lm_head's 8-bit
    # codes (with float32 or float16 scales), read by embed_tokens too (applies when both are
    # quantized and lm_head is 8-bit).
    tie_embedding: bool = True

    def __post_init__(self):
        if not VARIANT_NAME.fullmatch(self.name):
            raise InputError(f"recipe name {self.name!r} must be lower-case letters, digits, '-' or '_'")
        if not re.fullmatch(r"_[a-z0-9_]+", self.suffix):
            raise InputError(f"recipe suffix {self.suffix!r} must look like '_quantized'")
        if set(self.components) != set(COMPONENTS):
            raise InputError(f"recipe {self.name!r} must define exactly: {', '.join(COMPONENTS)}")
        for component, value in self.components.items():
            if not isinstance(value, ComponentRecipe):
                raise InputError(f"recipe {self.name!r}: {component} is not a ComponentRecipe")
        if not isinstance(self.tie_embedding, bool):
            raise InputError(f"recipe {self.name!r}: tie_embedding must be True or False")

    def component(self, name: str) -> ComponentRecipe:
        return self.components[name]

    def with_overrides(self, overrides: Mapping[str, str]) -> Recipe:
        """This recipe with some components at another dtype, e.g. {"vision_encoder": "fp32"}."""
        if not overrides:
            return self
        components = dict(self.components)
        for component, dtype in overrides.items():
            components[component] = component_preset(component, dtype)
        return replace(self, components=components, overrides={**self.overrides, **overrides})

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "suffix": self.suffix,
            "overrides": dict(self.overrides),
            "tie_embedding": self.tie_embedding,
            "components": {name: self.components[name].as_dict() for name in COMPONENTS},
        }


RECIPES: dict[str, Recipe] = {
    "int8": Recipe(
        "int8",
        "_quantized",
        {name: COMPONENT_PRESETS["int8"][name] for name in COMPONENTS},
        "int8 MatMuls (dynamic in the encoders, MatMulNBits in the decoder); the tied embedding once, 8-bit; "
        "vision convolutions in fp32",
    ),
    "int4": Recipe(
        "int4",
        "_q4",
        {
            "vision_encoder": COMPONENT_PRESETS["int8"]["vision_encoder"],
            "embed_tokens": COMPONENT_PRESETS["int8"]["embed_tokens"],
            "encoder_model": COMPONENT_PRESETS["int4"]["encoder_model"],
            "decoder_model_merged": COMPONENT_PRESETS["int4"]["decoder_model_merged"],
        },
        "4-bit MatMulNBits in the text encoder and decoder (lm_head and cross-attention K/V at 8 bits); "
        "vision and embeddings as in int8",
    ),
    "fp16": Recipe(
        "fp16",
        "_fp16",
        dict(COMPONENT_PRESETS["fp16"]),
        "float16 graphs with float32 inputs and outputs, for GPUs and WebGPU (slower than fp32 on CPUs)",
        # lm_head is a float16 MatMul here, not 8-bit codes an embedding can share
        tie_embedding=False,
    ),
    "q4f16": Recipe(
        "q4f16",
        "_q4f16",
        {
            "vision_encoder": COMPONENT_PRESETS["fp16"]["vision_encoder"],
            "embed_tokens": COMPONENT_PRESETS["q4f16"]["embed_tokens"],
            "encoder_model": COMPONENT_PRESETS["q4f16"]["encoder_model"],
            "decoder_model_merged": COMPONENT_PRESETS["q4f16"]["decoder_model_merged"],
        },
        "int4's text encoder and decoder and the tied 8-bit embedding, in float16 with float32 inputs "
        "and outputs; vision in fp16 (WebGPU has no dynamic int8 MatMul); for GPUs and WebGPU",
    ),
}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}, expected one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["vision_encoder=fp32", ...]` (the --keep arguments) -> {"vision_encoder": "fp32"}."""
    overrides: dict[str, str] = {}
    for item in items or []:
        component, sep, dtype = item.partition("=")
        component, dtype = component.strip(), dtype.strip()
        if not sep or not component or not dtype:
            raise InputError(f"--keep takes COMPONENT=DTYPE (e.g. vision_encoder=fp32), got {item!r}")
        component_preset(component, dtype)  # validates both names
        overrides[component] = dtype
    return overrides
