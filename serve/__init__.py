"""flonnx.serve: an HTTP server on top of the runtime (`flonnx serve`). flonnx.runtime never imports it."""
