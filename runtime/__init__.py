"""flonnx.runtime."""
