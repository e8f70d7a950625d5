"""flonnx.quantize: int8 / int4 variants of an export folder (and fp16 / q4f16 for GPUs and
WebGPU), measured against fp32.

from flonnx.quantize import quantize
result = quantize("florence2-onnx", "int8", keep={"vision_encoder": "fp32"})
print(result.report.table())  # then Florence2.load("florence2-onnx", variant="int8")
"""

from .quantizer import QuantizeError
from .recipes import RECIPES, ComponentRecipe, Recipe, get_recipe
from .report import Report, ReportOptions, measure
from .stage import QuantizeResult, quantize

__all__ = [
    "quantize",
    "measure",
    "get_recipe",
    "RECIPES",
    "Recipe",
    "ComponentRecipe",
    "Report",
    "ReportOptions",
    "QuantizeResult",
    "QuantizeError",
]
