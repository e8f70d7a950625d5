"""flonnx.export."""
