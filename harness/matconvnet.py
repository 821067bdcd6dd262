"""Reading the authors' MatConvNet ``simplenn`` networks (MATLAB v7.3 / HDF5 ``.mat``) into our modules.

A simplenn file holds one variable ``net`` whose ``layers`` is a cell array of structs; each
struct has ``type`` (``conv``, ``relu``, ``concat``, ``SubP`` in the DnCNN/FFDNet releases) and,
for ``conv``, ``weights = {filters, biases}``, ``pad`` and ``stride``. MATLAB stores arrays
column-major, so h5py hands them over with the axes reversed: filters (H, W, Cin, Cout) arrive
as (Cout, Cin, W, H), and trailing singleton axes that MATLAB drops (Cout = 1) are missing.

The k-th ``conv`` layer of the file becomes the k-th ``nn.Conv2d`` of the model (module order),
so the model needs no knowledge of MatConvNet. Two facts of the file format are applied here:

* MatConvNet convolves by cross-correlation, like PyTorch: filters are only re-laid out, never
  flipped.
* FFDNet's ``SubP`` layer (cszn/FFDNet ``vl_nnSubP.m``) orders the four sub-images of a channel
  with the row offset varying fastest, ``(0,0), (1,0), (0,1), (1,1)``; ``F.pixel_unshuffle``
  varies the column offset fastest. The first convolution's input channels and the last one's
  output channels are permuted accordingly when the file has ``SubP`` layers.

Errors are :class:`MatConvNetError` (a :class:`~harness.checkpoints.CheckpointError`) naming the
file and the problem: not HDF5 / truncated, not a simplenn network, a layer type we do not
implement, or a network that does not fit the model (conv count, kernel, padding, noise-level
input, shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harness.checkpoints import CheckpointError

#: Layer types of the released networks; anything else is refused rather than skipped.
SUPPORTED_TYPES = ("conv", "relu", "concat", "SubP")


class MatConvNetError(CheckpointError):
    """A MatConvNet ``.mat`` file that cannot be read or does not fit the model."""


@dataclass
class Layer:
    """One simplenn layer: ``type``, ``name`` and, for ``conv``, torch-layout weights."""

    type: str
    name: str
    weight: torch.Tensor | None = None  # (Cout, Cin, kH, kW)
    bias: torch.Tensor | None = None  # (Cout,)
    attrs: dict[str, Any] = field(default_factory=dict)  # pad, stride, dilate, leak, scale


def _text(dataset) -> str:
    """A MATLAB char array (uint16 code units) as a str."""
    return "".join(map(chr, np.asarray(dataset[()]).flatten()))


def _numbers(dataset) -> list[float]:
    return [float(v) for v in np.asarray(dataset[()]).flatten()]


def _conv_weights(f, layer, path: Path, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    refs = np.asarray(layer["weights"][()]).flatten()
    if len(refs) != 2:
        raise MatConvNetError(f"{path}: conv layer {index} has {len(refs)} weight arrays, expected filters and biases")
    filters, biases = (np.asarray(f[r][()], dtype=np.float32) for r in refs)
    if filters.ndim > 4:
        raise MatConvNetError(f"{path}: conv layer {index} filters have {filters.ndim} axes")
    filters = filters.reshape((1,) * (4 - filters.ndim) + filters.shape)  # restore dropped Cout/Cin = 1
    weight = torch.from_numpy(np.ascontiguousarray(filters.transpose(0, 1, 3, 2)))  # (Cout, Cin, H, W)
    bias = torch.from_numpy(np.ascontiguousarray(biases.reshape(-1)))
    if bias.numel() != weight.shape[0]:
        raise MatConvNetError(f"{path}: conv layer {index} has {weight.shape[0]} filters but {bias.numel()} biases")
    return weight, bias


def read_simplenn(path: str | Path) -> list[Layer]:
    """The layers of the simplenn network in a v7.3 ``.mat`` file, weights in torch layout."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MatConvNetError(f"MatConvNet file not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(128)
    if head.startswith(b"MATLAB 5.0"):
        raise MatConvNetError(f"{path} is a MATLAB v5 file; only v7.3 (HDF5) MatConvNet files are read "
                              "(re-save it in MATLAB with save(..., '-v7.3'))")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise MatConvNetError(f"cannot read {path} as a MATLAB v7.3 (HDF5) file, it is corrupt or truncated: "
                              f"{err}") from err
    with f:
        try:
            if "net" not in f:
                raise MatConvNetError(f"{path} holds no MatConvNet network: no variable 'net' "
                                      f"(found {sorted(k for k in f.keys() if not k.startswith('#'))})")
            net = f["net"]
            if "layers" not in net:
                kind = "a DagNN network (vars/params)" if "params" in net else f"fields {sorted(net.keys())}"
                raise MatConvNetError(f"{path}: 'net' is not a simplenn network (it has {kind}); "
                                      "only simplenn networks are read")
            layers = []
            for i, ref in enumerate(np.asarray(net["layers"][()]).flatten()):
                entry = f[ref]
                kind, name = _text(entry["type"]), _text(entry["name"]) if "name" in entry else f"layer{i + 1}"
                if kind not in SUPPORTED_TYPES:
                    raise MatConvNetError(f"{path}: layer {i} ({name}) has type {kind!r}; supported: "
                                          f"{', '.join(SUPPORTED_TYPES)} (batch norm must be folded into "
                                          "the convolutions, as in the released files)")
                attrs = {k: _numbers(entry[k]) for k in ("pad", "stride", "dilate", "leak", "scale") if k in entry}
                layer = Layer(kind, name, attrs=attrs)
                if kind == "conv":
                    layer.weight, layer.bias = _conv_weights(f, entry, path, i)
                layers.append(layer)
        except MatConvNetError:
            raise
        except (KeyError, OSError, ValueError, TypeError) as err:
            raise MatConvNetError(f"{path}: unreadable MatConvNet structure ({type(err).__name__}: {err}); "
                                  "the file may be corrupt") from err
    if not any(layer.type == "conv" for layer in layers):
        raise MatConvNetError(f"{path}: the network has no conv layers")
    return layers


def parameter_count(layers: list[Layer]) -> int:
    """Number of weights and biases in the network, as the file stores them."""
    return sum(layer.weight.numel() + layer.bias.numel() for layer in layers if layer.type == "conv")


def _subp_to_pixel_unshuffle(channels: int) -> torch.Tensor:
    """Index map: torch channel c*4 + 2*dy + dx <- MatConvNet channel c*4 + dy + 2*dx."""
    groups = torch.arange(channels).reshape(-1, 4)
    return groups[:, [0, 2, 1, 3]].reshape(-1)


def state_dict_for(layers: list[Layer], model: nn.Module, path: str | Path = "<layers>") -> dict[str, torch.Tensor]:
    """The model's state dict filled from the network's conv layers, after structural checks."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    file_convs = [layer for layer in layers if layer.type == "conv"]
    model_name = type(model).__name__
    if len(file_convs) != len(convs):
        raise MatConvNetError(f"{path} has {len(file_convs)} conv layers but {model_name} has {len(convs)} "
                              "convolutions: the file is for another architecture or depth")
    takes_map = bool(getattr(model, "takes_noise_level", False))
    has_concat = any(layer.type == "concat" for layer in layers)
    if has_concat != takes_map:
        raise MatConvNetError(
            f"{path} {'takes a' if has_concat else 'takes no'} noise-level map (concat layer) but {model_name} "
            f"{'does' if takes_map else 'does not'}: use a {'FDnCNN/FFDNet' if has_concat else 'DnCNN'} preset")
    for layer in layers:
        if layer.type == "relu" and any(layer.attrs.get("leak", [0.0])):
            raise MatConvNetError(f"{path}: layer {layer.name} is a leaky ReLU; the harness models use plain ReLU")
    weights = [(layer.weight, layer.bias) for layer in file_convs]
    if any(layer.type == "SubP" for layer in layers):
        (w0, b0), (wl, bl) = weights[0], weights[-1]
        n_in = 4 * ((w0.shape[1] - 1) // 4)  # the unshuffled image channels; the noise map comes after
        if n_in == 0 or wl.shape[0] % 4:
            raise MatConvNetError(f"{path}: SubP network with first conv {tuple(w0.shape)} and last conv "
                                  f"{tuple(wl.shape)} is not a 2x2 unshuffle/shuffle pair")
        w0 = torch.cat((w0[:, _subp_to_pixel_unshuffle(n_in)], w0[:, n_in:]), dim=1)
        order = _subp_to_pixel_unshuffle(wl.shape[0])
        weights[0], weights[-1] = (w0, b0), (wl[order], bl[order])
    state: dict[str, torch.Tensor] = {}
    for (name, conv), (weight, bias), layer in zip(convs, weights, file_convs):
        pad = [int(p) for p in layer.attrs.get("pad", [0])]
        stride = [int(s) for s in layer.attrs.get("stride", [1])]
        if set(pad) != {conv.padding[0]} or conv.padding[0] != conv.padding[1] or set(stride) != set(conv.stride):
            raise MatConvNetError(f"{path}: conv {layer.name} has pad {pad} / stride {stride} but {model_name}.{name} "
                                  f"has padding {conv.padding} / stride {conv.stride}")
        state[f"{name}.weight"] = weight
        if conv.bias is not None:
            state[f"{name}.bias"] = bias
    return state
