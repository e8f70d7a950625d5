"""flonnx.pack: a variant of an export folder written for a device target (`flonnx pack`).

A room on top of the runtime: it reads an export folder through its flonnx.json and writes a new
folder that the runtime loads like any export. flonnx.runtime never imports it.

    from flonnx.pack import pack
    result = pack("florence2-base-onnx", "mobile", variant="int8")  # florence2-base-onnx-mobile-int8/
"""

from .folder import PackError, Progress
from .packer import TARGETS, PackResult, pack

__all__ = ["TARGETS", "PackError", "PackResult", "Progress", "pack"]
