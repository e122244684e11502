"""Errors of the ONNX frontend (all :class:`~reparam.core.errors.ReparamError`, so the CLI prints one line)."""

from __future__ import annotations

from reparam.core.errors import ReparamError


class OnnxModelError(ReparamError):
    """The input is not a usable ONNX model: unreadable, not ONNX, truncated, invalid or an unsupported opset."""


class OnnxCheckError(ReparamError):
    """ONNX Runtime could not run a model for ``--check`` (bad input shapes, unsupported op, ...)."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """A message on one line (checker and protobuf errors span several), shortened to ``limit`` chars."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["OnnxCheckError", "OnnxModelError", "one_line"]
