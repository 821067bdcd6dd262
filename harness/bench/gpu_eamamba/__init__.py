"""EAMamba on one GPU, in one run: the fast paths against our torch backend and a released-style path.

    python -m harness.bench.gpu_eamamba --out OUT [--sizes 128 256 512 1024 2048]
        [--train 8x128 2x256 1x384] [--torch-train 8x128] [--compile [--compile-dynamic]]
        [--deadline-s 480] [--point-limit-s 20] [--no-checks] [--no-kernel] [--no-sweep]
        [--profile-path fast_eager]

Paths (one model, one set of random weights; fp32 unless the name says otherwise):
- ``fast``: triton scan backend with its default forward kernel (the step kernel), routes fused
  into the kernels on channels-last activations at every size, + the whole forward captured as
  one CUDA graph (inference) / the whole training step, AdamW included, captured (training);
- ``fast_eager``: the same without the graph; ``fast_cl``: ``fast`` with the model and input in
  the channels_last memory format;
- ``fast_default``: ``fast`` at PyTorch's default precision (TF32 in cuDNN convolutions, not in
  matrix products: how the release's timings were taken); ``release_default``: its reference;
- ``fast_tf32``: TF32 convolutions and matrix products; ``fast_bf16``: bf16 autocast (the scan
  itself stays fp32);
- ``tile_fused``: the tile forward kernel, routes fused up to 2¹⁷ positions (the first version);
- ``triton_unfused``: triton scan, permutations materialised;
- ``release``: the released structure: permuted copies materialised (gather in, gather back) and
  a plain per-channel scan (one program per channel walking the whole sequence, no segments:
  what mamba_ssm's kernel does at batch 1), in Triton;
- ``torch``: our chunked ``torch`` backend (the GPU correctness oracle);
- ``fast_compiled`` (with ``--compile``): ``fast`` with the model under
  ``torch.compile`` (``--compile-dynamic``: one compilation for every size; otherwise one per
  size; the fused scan is a custom operator, so the graph has no break), then captured as a
  CUDA graph.
TF32 is off everywhere except the ``*_default`` and ``fast_tf32`` paths. Output differences are
taken against the torch/release path of the same precision.

Phases, each written to OUT as soon as it ends (a run cut short still leaves its tables):
1. checks: the triton scan (forward and every gradient) against the torch backend in float64,
   the fused multi-route scan against ``multi_route_scan`` in float64, the whole model's
   output and parameter gradients against a float64 torch-backend model;
2. scan kernel: time and achieved bandwidth at the model's scan shapes (vs 4.8 TB/s datasheet,
   and vs a measured device copy);
3. inference: batch 1 at each size, ms (median), peak memory (the model's weights plus the most
   the point allocated during warm-up, capture and timed calls: what a fresh process would
   see), max relative difference to the torch backend's output (or to the release path's where
   the torch path is too slow);
4. training: forward + backward + AdamW step, L1 loss, per (batch, size);
5. a small sweep of the kernels' tile and segment settings (informative).
Points that run out of memory or would take too long are recorded, not fatal.
Outputs: gpu_eamamba.md (all tables), inference.csv, training.csv, scan_kernel.csv, checks.csv,
plots.png (latency and peak memory vs size, training step).

Modules: ``paths`` (the paths, as public settings: ``use_backend``, ``use_route_mode``,
``scan_settings``; the released-style scan backend; timing through ``harness.profile.timing``),
``checks`` (phase 1), ``kernels`` (phases 2 and 5), ``model_runs`` (phases 3 and 4, profile,
torch.compile), ``report`` (tables, CSV, figure), ``cli`` (the command line).
"""

from __future__ import annotations

from harness.bench.gpu_eamamba.cli import main

__all__ = ["main"]
