"""flonnx.quantize."""
