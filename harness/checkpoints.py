"""Loading official and harness checkpoints into models, strictly and safely.

Containers understood (the first match wins, and the result says which key was used):
- EAMamba release: ``{"model": {"name", "args", "sd", "sd_e"}}`` — ``sd_e`` (EMA) preferred;
- BasicSR (Restormer, NAFNet, MambaIR, SwinIR): ``{"params_ema": ...}`` or ``{"params": ...}``,
  ``params_ema`` preferred when both exist (it is what their real-SR tests load);
- harness / Lightning style: ``{"state_dict": ...}``, ``{"ema": ...}``, ``{"model": state_dict}``;
- a plain state dict (KAIR's DnCNN);
- a MatConvNet ``simplenn`` network in a MATLAB v7.3 ``.mat`` file (the DnCNN/FFDNet authors'
  releases), read by :mod:`harness.matconvnet` (key ``matconvnet/simplenn``).
A ``module.`` prefix (DataParallel/DDP) is stripped. Files are read with
``torch.load(weights_only=True)``: a checkpoint that needs arbitrary pickled code is refused.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

_PREFERRED_KEYS = (("model", "sd_e"), ("model", "sd"), ("params_ema",), ("params",), ("state_dict",),
                   ("ema",), ("model",))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the given model; the message says why."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file with weights-only unpickling; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it needs more than tensors and plain containers to unpickle "
            f"(weights-only loading; it may contain pickled code). Detail: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def extract_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict inside a checkpoint container; returns (state_dict, key path used)."""
    for keys in _PREFERRED_KEYS:
        node = obj
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if _is_state_dict(node):
            return dict(node), "/".join(keys)
    if _is_state_dict(obj):
        return dict(obj), "<root>"
    top = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"no state dict found in checkpoint (top-level keys: {top})")


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def compare_state_dicts(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> dict:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected``."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [(k, tuple(given[k].shape), tuple(expected[k].shape))
                  for k in expected if k in given and given[k].shape != expected[k].shape]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": mismatched}


def _describe(diff: dict, limit: int = 5) -> str:
    parts = []
    if diff["missing"]:
        parts.append(f"{len(diff['missing'])} missing keys (first: {diff['missing'][:limit]})")
    if diff["unexpected"]:
        parts.append(f"{len(diff['unexpected'])} unexpected keys (first: {diff['unexpected'][:limit]})")
    if diff["shape_mismatch"]:
        shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in diff["shape_mismatch"][:limit]]
        parts.append(f"{len(diff['shape_mismatch'])} shape mismatches (first: {shown})")
    return "; ".join(parts)


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Load the checkpoint at ``path`` into ``model``.

    Returns ``{"key": container key used, "path", "sha256", "registered": name in
    :mod:`harness.weights` or None, "missing", "unexpected", "shape_mismatch"}``.
    With ``strict`` any difference is an error listing the first offending keys; without it,
    matching entries are loaded and the differences are only reported (shape mismatches are
    always skipped, never forced).
    """
    if Path(path).suffix.lower() == ".mat":
        from harness.matconvnet import read_simplenn, state_dict_for

        state_dict, key = state_dict_for(read_simplenn(path), model, path), "matconvnet/simplenn"
    else:
        state_dict, key = extract_state_dict(read_checkpoint(path))
    state_dict = _strip_prefix(state_dict)
    expected = model.state_dict()
    diff = compare_state_dicts(expected, state_dict)
    if strict and any(diff.values()):
        raise CheckpointError(
            f"checkpoint {path} (key '{key}') does not fit {type(model).__name__}: {_describe(diff)}"
        )
    bad_shapes = {k for k, _, _ in diff["shape_mismatch"]}
    loadable = {k: v for k, v in state_dict.items() if k in expected and k not in bad_shapes}
    model.load_state_dict(loadable, strict=strict)
    return {"key": key, "path": str(path), **file_identity(path), **diff}


def file_identity(path: str | Path) -> dict:
    """``{"sha256": hex digest, "registered": weights-registry name or None}`` of a weights file."""
    from harness.weights import WEIGHTS

    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    sha = digest.hexdigest()
    return {"sha256": sha, "registered": next((name for name, w in WEIGHTS.items() if w.sha256 == sha), None)}
