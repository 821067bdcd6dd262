"""Named, seeded, recorded synthetic degradations.

Every degradation is a callable object ``deg(gt, seed) -> (lq, record)``:

* ``gt``: clean float32 image ``(H, W, C)`` in [0, 1] (C = 1 or 3);
* ``seed``: an int; the same (gt, seed) always gives the same ``lq`` (numpy PCG64 generator);
* ``record``: a JSON-serialisable dict ``{"name", "params", "sampled", "seed"}`` where
  ``params`` are the configured parameters and ``sampled`` the values drawn for this image
  (e.g. the sigma a blind-noise draw picked). Results carry it so a number can be traced back to
  exactly how its input was made.

Registered names (:data:`DEGRADATIONS`, build with :func:`make_degradation`):

================== ===========================================================================
``identity``        lq = gt (for already-paired data or sanity runs)
``gaussian_noise``  lq = gt + sigma/255 * N(0, 1); float, **not clipped** (EAMamba/Restormer test)
``blind_gaussian_noise``  sigma ~ U[sigma_min, sigma_max] (default U[0, 50]) per call, then as above
``bicubic_down``    MATLAB bicubic ``imresize(gt, 1/scale)``; gt must be a multiple of scale
                    (datasets modcrop first); quantised to 8 bits by default like saved LR PNGs
``gaussian_blur``   isotropic Gaussian kernel (sigma, size 2*ceil(3 sigma)+1), symmetric padding
``motion_blur``     linear motion kernel (length px, angle deg; angle drawn from the seed if None)
``jpeg``            JPEG at IJG quality q through libjpeg (Pillow): MATLAB ``imwrite(img, f, 'jpg',
                    'Quality', q)`` (standard IJG tables scaled by quality, clamped to baseline
                    0..255, 4:2:0 chroma for colour; grey images are one component), then decoded
``haze``            atmospheric scattering I = J t + A (1 - t), t = exp(-beta * depth), with a
                    smooth synthetic depth map drawn from the seed; beta and A drawn if None
``chain``           several of the above in order (e.g. blur then noise)
================== ===========================================================================

Seeds: :func:`derive_seed` turns (base seed, image name, ...) into a stable 31-bit seed, so each
image of a test set gets its own fixed noise regardless of loading order or worker count.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .imageio import quantize_uint8
from .imresize import imresize

Record = dict[str, Any]


def derive_seed(base_seed: int, *keys: Any) -> int:
    """Stable 31-bit seed from a base seed and keys (e.g. an image name). Independent of
    Python's hash randomisation and of the order in which images are visited."""
    text = repr((int(base_seed),) + tuple(str(k) for k in keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def _check_image(gt: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(gt, np.ndarray) or gt.ndim != 3 or gt.shape[2] not in (1, 3):
        shape = getattr(gt, "shape", type(gt).__name__)
        raise ValueError(f"{name}: expected a float (H, W, C) image with C in (1, 3), got {shape}")
    return gt.astype(np.float32, copy=False)


class Degradation:
    """Base class. Subclasses set ``name``, store their params and implement ``_apply``."""

    name: str = "base"
    #: Integer downscaling factor between gt and lq (1 for same-size degradations).
    scale: int = 1

    def __init__(self, **params: Any) -> None:
        self.params = dict(params)

    def __call__(self, gt: np.ndarray, seed: int) -> tuple[np.ndarray, Record]:
        gt = _check_image(gt, self.name)
        rng = np.random.Generator(np.random.PCG64(int(seed)))
        lq, sampled = self._apply(gt, rng)
        record = {"name": self.name, "params": _jsonable(self.params), "sampled": _jsonable(sampled),
                  "seed": int(seed)}
        return lq.astype(np.float32, copy=False), record

    def _apply(self, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """Config dict that :func:`make_degradation` turns back into an equal degradation."""
        return {"name": self.name, **_jsonable(self.params)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class Identity(Degradation):
    name = "identity"

    def _apply(self, gt, rng):
        return gt.copy(), {}


class GaussianNoise(Degradation):
    """Additive white Gaussian noise, sigma on the 0..255 scale, float and unclipped."""

    name = "gaussian_noise"

    def __init__(self, sigma: float = 25.0, clip: bool = False) -> None:
        if sigma < 0:
            raise ValueError(f"gaussian_noise: sigma must be >= 0, got {sigma}")
        super().__init__(sigma=float(sigma), clip=bool(clip))

    def _noise(self, gt: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
        # float64 draw, then float32 image: matches np.random.normal(0, sigma/255, shape) usage.
        lq = gt + rng.standard_normal(gt.shape) * (sigma / 255.0)
        if self.params.get("clip", False):
            lq = np.clip(lq, 0.0, 1.0)
        return lq.astype(np.float32)

    def _apply(self, gt, rng):
        return self._noise(gt, rng, self.params["sigma"]), {"sigma": self.params["sigma"]}


class BlindGaussianNoise(GaussianNoise):
    """Gaussian noise with sigma ~ U[sigma_min, sigma_max] drawn per call (blind training)."""

    name = "blind_gaussian_noise"

    def __init__(self, sigma_min: float = 0.0, sigma_max: float = 50.0, clip: bool = False) -> None:
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"blind_gaussian_noise: need 0 <= sigma_min <= sigma_max, got "
                             f"[{sigma_min}, {sigma_max}]")
        Degradation.__init__(self, sigma_min=float(sigma_min), sigma_max=float(sigma_max), clip=bool(clip))

    def _apply(self, gt, rng):
        sigma = float(rng.uniform(self.params["sigma_min"], self.params["sigma_max"]))
        return self._noise(gt, rng, sigma), {"sigma": sigma}


class BicubicDown(Degradation):
    """MATLAB ``imresize(gt, 1/scale, 'bicubic')`` with antialiasing (see :mod:`.imresize`)."""

    name = "bicubic_down"

    def __init__(self, scale: int = 4, quantize: bool = True) -> None:
        if int(scale) != scale or scale < 1:
            raise ValueError(f"bicubic_down: scale must be a positive integer, got {scale}")
        super().__init__(scale=int(scale), quantize=bool(quantize))
        self.scale = int(scale)

    def _apply(self, gt, rng):
        s = self.scale
        h, w = gt.shape[:2]
        if h % s or w % s:
            raise ValueError(f"bicubic_down: image size {h}x{w} is not a multiple of scale {s}; "
                             "modcrop the ground truth first (datasets do this)")
        lq = imresize(gt, 1.0 / s)
        # Saved LR images are 8-bit: MATLAB rounds and saturates uint8 output.
        lq = quantize_uint8(lq) if self.params["quantize"] else lq.astype(np.float32)
        return lq, {}


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
    """Normalised 2-D isotropic Gaussian kernel; default size 2*ceil(3 sigma)+1."""
    if sigma <= 0:
        raise ValueError(f"gaussian kernel: sigma must be > 0, got {sigma}")
    size = size or 2 * int(math.ceil(3 * sigma)) + 1
    if size % 2 == 0:
        raise ValueError(f"gaussian kernel: size must be odd, got {size}")
    r = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return k / k.sum()


def motion_kernel(length: float, angle_deg: float, size: int | None = None) -> np.ndarray:
    """Normalised linear motion-blur kernel: a segment of ``length`` px through the centre at
    ``angle_deg`` (counter-clockwise from the x axis), rasterised by dense sampling with bilinear
    splatting so any length/angle gives a smooth, centred kernel."""
    if length < 1:
        raise ValueError(f"motion kernel: length must be >= 1 px, got {length}")
    size = size or (int(math.ceil(length)) | 1)  # odd, so the kernel has a centre pixel
    c = size // 2
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, int(math.ceil(length)) * 8))
    a = math.radians(angle_deg)
    xs, ys = c + t * math.cos(a), c - t * math.sin(a)  # image rows grow downwards
    k = np.zeros((size, size), dtype=np.float64)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                        (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        np.add.at(k, (yi[ok], xi[ok]), wgt[ok])
    return k / k.sum()


def convolve_image(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with ``kernel``; symmetric border (scipy 'reflect' = d c b a | a b)."""
    out = np.empty_like(img, dtype=np.float64)
    for ch in range(img.shape[2]):
        out[:, :, ch] = ndimage.correlate(img[:, :, ch].astype(np.float64), kernel, mode="reflect")
    return out


class GaussianBlur(Degradation):
    name = "gaussian_blur"

    def __init__(self, sigma: float = 2.0, size: int | None = None, quantize: bool = False) -> None:
        gaussian_kernel(sigma, size)  # validate now, not at first image
        super().__init__(sigma=float(sigma), size=size, quantize=bool(quantize))

    def _apply(self, gt, rng):
        k = gaussian_kernel(self.params["sigma"], self.params["size"])
        lq = convolve_image(gt, k)
        lq = quantize_uint8(lq) if self.params["quantize"] else lq
        return lq, {"kernel_size": int(k.shape[0])}


class MotionBlur(Degradation):
    name = "motion_blur"

    def __init__(self, length: float = 15.0, angle: float | None = None, quantize: bool = False) -> None:
        if length < 1:
            raise ValueError(f"motion_blur: length must be >= 1 px, got {length}")
        super().__init__(length=float(length), angle=angle, quantize=bool(quantize))

    def _apply(self, gt, rng):
        angle = self.params["angle"]
        angle = float(rng.uniform(0.0, 180.0)) if angle is None else float(angle)
        k = motion_kernel(self.params["length"], angle)
        lq = convolve_image(gt, k)
        lq = quantize_uint8(lq) if self.params["quantize"] else lq
        return lq, {"angle": angle, "kernel_size": int(k.shape[0])}


def synthetic_depth(h: int, w: int, rng: np.random.Generator, smoothness: float = 0.15) -> np.ndarray:
    """Smooth synthetic depth in [0, 1]: a vertical ramp (top = far, as in outdoor scenes) plus a
    low-frequency random field (Gaussian-filtered white noise, correlation length ``smoothness``
    times the image size). Depth has no edges, so haze never creates structure of its own."""
    ramp = np.linspace(1.0, 0.0, h)[:, None] * np.ones((1, w))
    field = rng.standard_normal((h, w))
    field = ndimage.gaussian_filter(field, sigma=(smoothness * h, smoothness * w), mode="reflect")
    field = (field - field.min()) / max(field.max() - field.min(), 1e-12)
    depth = 0.6 * ramp + 0.4 * field
    return (depth - depth.min()) / max(depth.max() - depth.min(), 1e-12)


class Haze(Degradation):
    """Atmospheric scattering model I = J t + A (1 - t), t = exp(-beta * depth).

    Defaults draw beta ~ U[0.6, 1.8] and A ~ U[0.7, 1.0] (the ranges RESIDE used); pass numbers
    to fix them. ``depth_scale`` multiplies the [0, 1] depth map.
    """

    name = "haze"

    def __init__(self, beta: float | None = None, airlight: float | None = None,
                 depth_scale: float = 1.0, smoothness: float = 0.15, quantize: bool = False) -> None:
        if beta is not None and beta < 0:
            raise ValueError(f"haze: beta must be >= 0, got {beta}")
        if airlight is not None and not 0 <= airlight <= 1:
            raise ValueError(f"haze: airlight must be in [0, 1], got {airlight}")
        super().__init__(beta=beta, airlight=airlight, depth_scale=float(depth_scale),
                         smoothness=float(smoothness), quantize=bool(quantize))

    def _apply(self, gt, rng):
        p = self.params
        beta = float(rng.uniform(0.6, 1.8)) if p["beta"] is None else float(p["beta"])
        a = float(rng.uniform(0.7, 1.0)) if p["airlight"] is None else float(p["airlight"])
        depth = synthetic_depth(gt.shape[0], gt.shape[1], rng, p["smoothness"]) * p["depth_scale"]
        t = np.exp(-beta * depth)[:, :, None]
        lq = gt.astype(np.float64) * t + a * (1.0 - t)
        lq = quantize_uint8(lq) if p["quantize"] else lq
        return lq, {"beta": beta, "airlight": a, "t_min": float(t.min()), "t_max": float(t.max())}


class Chain(Degradation):
    """Apply several degradations in order; each gets its own seed derived from the chain's."""

    name = "chain"

    def __init__(self, steps: Sequence[Degradation | Mapping[str, Any]]) -> None:
        self.steps = [s if isinstance(s, Degradation) else make_degradation(s) for s in steps]
        if not self.steps:
            raise ValueError("chain: needs at least one step")
        super().__init__(steps=[s.spec() for s in self.steps])
        self.scale = int(np.prod([s.scale for s in self.steps]))

    def __call__(self, gt, seed):
        gt = _check_image(gt, self.name)
        x, records = gt, []
        for i, step in enumerate(self.steps):
            x, rec = step(x, derive_seed(seed, "chain", i))
            records.append(rec)
        return x, {"name": self.name, "params": _jsonable(self.params), "sampled": {"steps": records},
                   "seed": int(seed)}


class JpegCompression(Degradation):
    """JPEG round trip at IJG quality ``quality`` (1..100), what MATLAB's ``imwrite(..., 'jpg',
    'Quality', q)`` + ``imread`` do: the image is rounded to 8 bits, encoded by libjpeg with the
    standard IJG quantisation tables scaled by ``jpeg_set_quality`` (baseline: entries clamped to
    1..255), integer DCT, and decoded with libjpeg's integer IDCT. Grey images are encoded as one
    component; colour images with 4:2:0 chroma subsampling (libjpeg's default, MATLAB's too).
    Deterministic: the seed is not used."""

    name = "jpeg"

    def __init__(self, quality: int = 10, subsampling: str = "4:2:0") -> None:
        if int(quality) != quality or not 1 <= quality <= 100:
            raise ValueError(f"jpeg: quality must be an integer in 1..100, got {quality}")
        if subsampling not in ("4:2:0", "4:2:2", "4:4:4"):
            raise ValueError(f"jpeg: subsampling must be '4:2:0', '4:2:2' or '4:4:4', got {subsampling!r}")
        super().__init__(quality=int(quality), subsampling=subsampling)

    def _apply(self, gt, rng):
        from PIL import Image, features

        u8 = np.round(np.clip(gt, 0.0, 1.0) * 255.0).astype(np.uint8)
        data = jpeg_bytes(u8, self.params["quality"], self.params["subsampling"])
        grey = u8.shape[2] == 1
        with Image.open(io.BytesIO(data)) as decoded:
            out = np.asarray(decoded.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
        out = out[:, :, None] if grey else out
        return out, {"bytes": len(data), "libjpeg": str(features.version("jpg"))}


def jpeg_bytes(u8: np.ndarray, quality: int, subsampling: str = "4:2:0") -> bytes:
    """Baseline JPEG file of a uint8 ``(H, W, 1|3)`` image at IJG ``quality`` (libjpeg's
    ``jpeg_set_quality`` with baseline clamping, integer DCT, no Huffman optimisation)."""
    from PIL import Image

    grey = u8.shape[2] == 1
    image = Image.fromarray(u8[:, :, 0] if grey else u8, "L" if grey else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality), subsampling=subsampling, optimize=False, progressive=False)
    return buffer.getvalue()


DEGRADATIONS: dict[str, Callable[..., Degradation]] = {
    "identity": Identity,
    "gaussian_noise": GaussianNoise,
    "blind_gaussian_noise": BlindGaussianNoise,
    "bicubic_down": BicubicDown,
    "gaussian_blur": GaussianBlur,
    "motion_blur": MotionBlur,
    "haze": Haze,
    "jpeg": JpegCompression,
    "chain": Chain,
}


def make_degradation(spec: str | Mapping[str, Any] | Degradation | None = None, **params: Any
                     ) -> Degradation:
    """Build a degradation from a name + params, or from a config dict ``{"name": ..., **params}``.

    ``make_degradation("gaussian_noise", sigma=50)`` == ``make_degradation({"name":
    "gaussian_noise", "sigma": 50})``. ``None`` gives ``identity``.
    """
    if isinstance(spec, Degradation):
        return spec
    if spec is None:
        spec = "identity"
    if isinstance(spec, Mapping):
        params = {**{k: v for k, v in spec.items() if k != "name"}, **params}
        if "name" not in spec:
            raise ValueError(f"degradation config needs a 'name' key, got {dict(spec)}")
        spec = spec["name"]
    if spec not in DEGRADATIONS:
        raise KeyError(f"unknown degradation {spec!r}; known: {', '.join(sorted(DEGRADATIONS))}")
    try:
        return DEGRADATIONS[spec](**params)
    except TypeError as e:
        raise TypeError(f"bad parameters for degradation {spec!r}: {params} ({e})") from e


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars / tuples so records survive json.dumps and default_collate."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
