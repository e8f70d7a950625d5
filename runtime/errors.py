"""The errors flonnx raises. Every one is a FlonnxError, so callers can catch one class."""

from __future__ import annotations


class FlonnxError(Exception):
    """Base class of every error flonnx raises on purpose."""


class InputError(FlonnxError, ValueError):
    """A bad argument from the caller: an image, a task, a prompt, an option."""


class ImageError(InputError):
    """An image that cannot be read or used."""


class PromptError(InputError):
    """A task or prompt that Florence-2 cannot take."""


class ModelFolderError(FlonnxError):
    """An export folder that is missing, incomplete or inconsistent with its manifest."""


class ExportError(FlonnxError):
    """A checkpoint that cannot be exported."""


class ValidationError(ExportError):
    """ONNX graphs whose outputs differ from PyTorch beyond tolerance; `report` lists every mismatch."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class MissingExtraError(FlonnxError):
    """A stage whose optional dependencies are not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(
            f"this needs the '{extra}' extra ({module} is missing): in a flonnx clone, "
            f"pip install '.[{extra}]' (or pip install 'flonnx-VERSION-py3-none-any.whl[{extra}]')"
        )
        self.extra = extra
        self.module = module
