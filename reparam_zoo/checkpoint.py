"""Load reference-implementation checkpoints into zoo models (no network access: local files or dicts)."""

from __future__ import annotations

import copy
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

    A deploy-form model (``deploy=True``) also takes checkpoints that still have BatchNorm layers where
    the deploy form has none, such as the output of the reference implementation's ``convert.py`` (it fuses
    only the cheap operations and keeps 48 BN): those BN are folded into their convs while loading.  Into
    a training-form model such a checkpoint raises, saying to use ``deploy=True``.
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

    target = model
    if getattr(model, "deploy", False):
        # A deploy model whose checkpoint still has BatchNorm layers (the reference converter's output):
        # load it into a copy with those slots restored, fold them with convert_, then copy the result.
        target = _with_bn_slots(model, state) or model
    elif (kept := _reference_converted(model, state)) is not None:
        raise CheckpointError(
            f"this checkpoint is the reference implementation's convert.py output: each RepGhost module's "
            f"cheap operation is already fused with its re-parameterization branch (cheap_operation.weight and "
            f".bias), while {kept} BatchNorm layers are kept, so it fits neither the training form nor our "
            f"deploy layout as it is; build the model with deploy=True and load it there: load_checkpoint "
            f"folds the {kept} remaining BatchNorm layers into their convs")
    own = target.state_dict()
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

    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if target is not model:
        from .conversion import convert_

        convert_(target)
        model.load_state_dict(target.state_dict())
    return LoadResult(missing, unexpected)


_BN_KEY = ".running_mean"
_BRANCH_KEYS = (".fusion_bn.", ".fusion_conv.")


def _key(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _bias_free_like(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)


def _with_bn_slots(model: nn.Module, state: Mapping[str, Any]) -> nn.Module | None:
    """A copy of deploy-form ``model`` with a conv+BN pair wherever ``state`` still has that BN, or None.

    Checkpoints that still carry re-parameterization branches (``fusion_bn``/``fusion_conv``) are left to
    the usual hint: which branch kinds they had (an identity branch has no keys) cannot be read from them.
    """
    from .conversion import bn_slots
    from .repghost import RepGhostModule

    if any(marker in f".{k}" for k in state for marker in _BRANCH_KEYS):
        return None
    twin = copy.deepcopy(model)
    restored = 0
    for name, module in twin.named_modules():
        for parent_path, conv_attr, bn_attr in bn_slots(module):
            parent = module.get_submodule(parent_path) if parent_path else module
            conv = getattr(parent, conv_attr)
            bn_key = _key(name, parent_path, bn_attr) + _BN_KEY
            if isinstance(getattr(parent, bn_attr), nn.Identity) and bn_key in state:
                setattr(parent, conv_attr, _bias_free_like(conv))
                setattr(parent, bn_attr, nn.BatchNorm2d(conv.out_channels, device=conv.weight.device,
                                                        dtype=conv.weight.dtype))
                restored += 1
        if isinstance(module, RepGhostModule) and isinstance(module.cheap_operation, nn.Conv2d) \
                and _key(name, "cheap_operation.1") + _BN_KEY in state:
            dw = module.cheap_operation
            module.cheap_operation = nn.Sequential(_bias_free_like(dw), nn.BatchNorm2d(
                dw.out_channels, device=dw.weight.device, dtype=dw.weight.dtype))
            restored += 1
    return twin if restored else None


def _reference_converted(model: nn.Module, state: Mapping[str, Any]) -> int | None:
    """The number of BatchNorm layers kept if ``state`` is the reference converter's output for training-form
    ``model`` (cheap operations fused into ``cheap_operation.weight``/``.bias``, no branches, BN elsewhere)."""
    own = model.state_dict()
    fused_cheap = [k for k in state if k.endswith(".cheap_operation.weight")
                   and k[: -len("weight")] + "0.weight" in own and k[: -len("weight")] + "bias" in state]
    if not fused_cheap or any(marker in f".{k}" for k in state for marker in _BRANCH_KEYS):
        return None
    kept = sum(k.endswith(_BN_KEY) for k in state)
    return kept or None


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
