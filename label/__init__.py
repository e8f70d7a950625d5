"""flonnx.label: label images in bulk on one machine or a Ray cluster (`flonnx label`). flonnx.runtime never
imports it.

from flonnx.label import label
summary = label("photos/", "labels/", model="florence2-base-onnx", tasks=["<OD>"])
"""

from .runner import LabelSummary, label

__all__ = ["LabelSummary", "label"]
