"""Load reference-implementation checkpoints into zoo models (no network access: local files or dicts)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from reparam.core.errors import ReparamError

__all__ = ["CheckpointError", "LoadResult", "extract_state_dict", "load_checkpoint"]

# Wrapper keys of training scripts (timm saves both ``state_dict`` and ``state_dict_ema``).
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model")
# Keys left in checkpoints by profilers (thop) that belong to no model.
_JUNK_SUFFIXES = ("total_ops", "total_params")
_MAX_LISTED = 20


class CheckpointError(ReparamError, ValueError):
    """A checkpoint does not fit the model: the message lists the missing, unexpected and mis-shaped keys."""


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def extract_state_dict(checkpoint: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict_ema': ...}`` / ``{'state_dict': ...}`` and strip ``module.`` prefixes.

    With ``prefer_ema`` the EMA weights are taken when a checkpoint holds both (the reference's reported
    accuracies are of the EMA weights).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint must be a mapping, got {type(checkpoint).__name__}")
    order = (*_EMA_KEYS, *_PLAIN_KEYS) if prefer_ema else (*_PLAIN_KEYS, *_EMA_KEYS)
    for key in order:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    state: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str):
            raise CheckpointError(f"state-dict key {key!r} is not a string")
        while key.startswith("module."):
            key = key[len("module."):]
        if key.endswith(_JUNK_SUFFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state-dict entry {key!r} is a {type(value).__name__}, not a tensor "
                                  f"(top-level keys: {sorted(map(str, checkpoint))[:_MAX_LISTED]})")
        if key in state:
            raise CheckpointError(f"key {key!r} appears both with and without a 'module.' prefix")
        state[key] = value
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_checkpoint(
    model: nn.Module,
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    strict: bool = True,
    prefer_ema: bool = True,
) -> LoadResult:
    """Load a checkpoint (path to a ``.pth``/``.pt`` file, or a dict) into ``model`` in place.

    Accepts a plain state dict, ``{'state_dict': ...}``, ``{'state_dict_ema': ...}`` (preferred when both
    are present and ``prefer_ema``) and ``module.``-prefixed keys.  Files are read with
    ``torch.load(weights_only=True, map_location='cpu')``.  Keys of a head the model does not have
    (``features_only``) are ignored.

    With ``strict`` any missing key, unexpected key or shape mismatch raises :class:`CheckpointError`;
    otherwise matching entries are loaded and the leftovers returned.  Shape mismatches always raise.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        try:
            raw = torch.load(os.fspath(path_or_dict), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file not found: {os.fspath(path_or_dict)!r}") from None
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {os.fspath(path_or_dict)!r} with "
                                  f"torch.load(weights_only=True): {exc}") from exc
    else:
        raw = path_or_dict
    state = extract_state_dict(raw, prefer_ema=prefer_ema)

    ignore = tuple(getattr(model, "checkpoint_ignore_prefixes", ()))
    if ignore:
        state = {k: v for k, v in state.items() if not k.startswith(ignore)}

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]

    if mismatched or (strict and (missing or unexpected)):
        parts = [f"checkpoint does not match {type(model).__name__}"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        hint = _form_hint(model, missing, unexpected)
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts))

    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadResult(missing, unexpected)


def _form_hint(model: nn.Module, missing: list[str], unexpected: list[str]) -> str:
    deploy = getattr(model, "deploy", None)
    if deploy is None:
        return ""
    bn_like = (".running_mean", ".running_var", ".num_batches_tracked")
    if deploy and any(k.endswith(bn_like) for k in unexpected):
        return ("hint: the checkpoint looks like a training-form one; build the model with deploy=False, "
                "load it, then call convert_to_deploy()")
    if not deploy and any(k.endswith(".bias") for k in unexpected) and any(
            k.endswith(bn_like) for k in missing):
        return "hint: the checkpoint looks like a deploy-form one; build the model with deploy=True"
    return ""
