"""Exception types shared by every layer of reparam."""

from __future__ import annotations


class ReparamError(Exception):
    """Base class of every error reparam raises on purpose (bad input, unsupported model)."""


class NotFusable(ReparamError):
    """The algebra cannot prove a fusion exact; the message names the failed condition and its values."""
