"""flonnx.runtime: Florence-2 on onnxruntime, with numpy, pillow and tokenizers only.

from flonnx.runtime import Florence2
model = Florence2.load("florence2-onnx")
model.run("photo.jpg", "<OD>")  # {"<OD>": {"bboxes": [...], "labels": [...]}}
"""

from .errors import FlonnxError, ImageError, InputError, ModelFolderError, PromptError
from .model import Florence2, ImageFeatures, Request, Result

__all__ = [
    "Florence2",
    "ImageFeatures",
    "Request",
    "Result",
    "FlonnxError",
    "ImageError",
    "InputError",
    "ModelFolderError",
    "PromptError",
]
