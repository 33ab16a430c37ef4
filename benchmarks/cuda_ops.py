"""The dcnv2 ops on CUDA: our Triton kernels vs torchvision's CUDA kernel vs a dense conv, and the
deformable RoI pooling vs torchvision's roi_align.

Convolution: the 3x3 layers of ResNet-50 stages c3, c4, c5 at 800 px shorter side, modulated.
RoI pooling: 512 proposal-like RoIs pooled 7x7 (sampling ratio 2) from a C=256, 50x84 map.
Forward and forward+backward, default and deterministic (``torch.use_deterministic_algorithms``)
backward. Everything runs side by side in one process; each time is the best of --repeats runs
(CUDA events around each call, after a warm-up that also compiles the Triton kernels), and the
table prints ratios.

    python benchmarks/cuda_ops.py [--dtype float32|float16|bfloat16] [--batches 1 2] [--repeats 10]
    python benchmarks/cuda_ops.py --smoke   # no GPU: tiny shapes through Triton's CPU interpreter,
                                            # checks that the script runs; its times mean nothing
"""
from __future__ import annotations

import argparse
import os
import sys
import time

LAYERS = [("c3", 128, 100, 167), ("c4", 256, 50, 84), ("c5", 512, 25, 42)]  # (stage, C, H, W)
SMOKE_LAYERS = [("tiny", 16, 6, 7)]
ROI = dict(C=256, H=50, W=84, stride=16, num_rois=512)
SMOKE_ROI = dict(C=16, H=6, W=7, stride=16, num_rois=3)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=10, help="repetitions per measurement; the best is kept")
    p.add_argument("--smoke", action="store_true", help="no GPU: run tiny shapes in Triton's CPU interpreter")
    return p.parse_args()


args = parse()
if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import dcnv2  # noqa: E402,F401
from dcnv2.ops.triton import deform_conv as tconv  # noqa: E402
from dcnv2.ops.triton import roi_pool as troi  # noqa: E402


class _Conv(torch.autograd.Function):
    """Smoke mode only: the Triton launch wrappers under autograd, on CPU tensors (on a GPU the
    benchmark calls the public op, which the dispatcher sends to the same wrappers)."""

    @staticmethod
    def forward(ctx, x, w, off, mask, b):
        ctx.save_for_backward(x, w, off, mask, b)
        return tconv.conv_forward(x, w, off, mask, b, (1, 1), (1, 1), (1, 1), 1, 1)

    @staticmethod
    def backward(ctx, g):
        x, w, off, mask, b = ctx.saved_tensors
        gi, gw, go, gm, gb = tconv.conv_backward(g.contiguous(), x, w, off, mask, b, (1, 1), (1, 1), (1, 1), 1, 1)
        return gi, gw, go, gm, gb


class _Roi(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rois, off, mask):
        ctx.save_for_backward(x, rois, off, mask)
        return troi.roi_pool_forward(x, rois, off, mask, 7, 7, 1 / 16, 2, 0.1, True)

    @staticmethod
    def backward(ctx, g):
        x, rois, off, mask = ctx.saved_tensors
        gi, go, gm = troi.roi_pool_backward(g.contiguous(), x, rois, off, mask, 7, 7, 1 / 16, 2, 0.1, True)
        return gi, None, go, gm


def sync():
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.synchronize()


def timed(fn) -> float:
    if args.smoke:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def best_times(fns, repeats: int) -> list:
    """Best time of each fn, taking turns round by round so that a noisy spell hits all alike."""
    for fn in fns:
        fn()  # warm-up (and Triton compilation)
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn))
    return best


def conv_rows(dev, dtype, layers, batches, repeats):
    rows = []
    for stage, C, H, W in layers:
        for N in batches:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(N, C, H, W, generator=g).to(dev, dtype).requires_grad_()
            w = (torch.randn(C, C, 3, 3, generator=g) * 0.05).to(dev, dtype).requires_grad_()
            b = torch.zeros(C).to(dev, dtype).requires_grad_()
            off = torch.randn(N, 18, H, W, generator=g).to(dev, dtype).requires_grad_()
            mask = torch.rand(N, 9, H, W, generator=g).to(dev, dtype).requires_grad_()
            leaves = (x, w, b, off, mask)

            def ours():
                if args.smoke:
                    return _Conv.apply(x, w, off, mask, b)
                return dcnv2.ops.deform_conv2d(x, off, w, b, padding=1, mask=mask)

            impls = {
                "ours": ours,
                "torchvision": lambda: torchvision.ops.deform_conv2d(x, off, w, b, padding=1, mask=mask),
                "dense": lambda: F.conv2d(x, w, b, padding=1),
            }

            def fwd(fn):
                def step():
                    with torch.no_grad():
                        fn()
                return step

            def fwd_bwd(fn, deterministic=False):
                def step():
                    for t in leaves:
                        t.grad = None
                    torch.use_deterministic_algorithms(deterministic)
                    try:
                        fn().sum().backward()
                    finally:
                        torch.use_deterministic_algorithms(False)
                return step

            names = list(impls)
            f = best_times([fwd(impls[n]) for n in names], repeats)
            fb = best_times([fwd_bwd(impls[n]) for n in names] + [fwd_bwd(ours, True)], repeats)
            rows.append(dict(stage=stage, N=N, C=C, H=H, W=W, fwd=dict(zip(names, f)),
                             fb=dict(zip(names + ["ours_det"], fb))))
    return rows


def roi_rows(dev, dtype, cfg, repeats):
    C, H, W, stride, K = cfg["C"], cfg["H"], cfg["W"], cfg["stride"], cfg["num_rois"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, H, W, generator=g).to(dev, dtype).requires_grad_()
    img = torch.tensor([W * stride, H * stride], dtype=torch.float32)
    size = torch.exp(torch.empty(K, 2).uniform_(4 * 0.6931, 9 * 0.6931, generator=g)).minimum(img)
    xy = torch.rand(K, 2, generator=g) * (img - size)
    rois = torch.cat([torch.zeros(K, 1), xy, xy + size], 1).to(dev, dtype)
    off = (torch.randn(K, 2, 7, 7, generator=g) * 0.1).to(dev, dtype).requires_grad_()
    mask = torch.rand(K, 1, 7, 7, generator=g).to(dev, dtype).requires_grad_()

    def ours():
        if args.smoke:
            return _Roi.apply(x, rois, off, mask)
        return dcnv2.ops.deform_roi_pool(x, rois, off, mask, 7, 1 / stride, 2, 0.1, True)

    impls = {"ours": ours, "roi_align": lambda: torchvision.ops.roi_align(x, rois, 7, 1 / stride, 2, True)}

    def fwd(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    def fwd_bwd(fn, deterministic=False):
        def step():
            for t in (x, off, mask):
                t.grad = None
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            try:
                fn().sum().backward()
            finally:
                torch.use_deterministic_algorithms(False)
        return step

    names = list(impls)
    f = best_times([fwd(impls[n]) for n in names], repeats)
    fb = best_times([fwd_bwd(impls[n]) for n in names] + [fwd_bwd(ours, True)], repeats)
    return dict(fwd=dict(zip(names, f)), fb=dict(zip(names + ["ours_det"], fb)), K=K, C=C, H=H, W=W)


def main() -> int:
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/cuda_ops.py: no CUDA device here, nothing measured. Run it on a GPU machine, or "
              "`--smoke` to check the script through Triton's CPU interpreter.")
        return 0
    dev = "cpu" if args.smoke else "cuda"
    dtype = getattr(torch, args.dtype)
    name = "Triton CPU interpreter (smoke run: times are meaningless)" if args.smoke else torch.cuda.get_device_name()
    layers, roi_cfg = (SMOKE_LAYERS, SMOKE_ROI) if args.smoke else (LAYERS, ROI)
    repeats = 1 if args.smoke else args.repeats
    print(f"device: {name} · torch {torch.__version__} · dtype {args.dtype} · best of {repeats}")
    batches = [1] if args.smoke else args.batches

    print("\nmodulated deform_conv2d 3x3, C -> C (times in ms; ratios < 1 mean ours is faster)")
    print("| layer | N | fwd ours | fwd / torchvision | fwd / dense | f+b ours | f+b / torchvision | "
          "f+b / dense | f+b deterministic / default |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in conv_rows(dev, dtype, layers, batches, repeats):
        f, fb = r["fwd"], r["fb"]
        print(f"| {r['stage']} {r['C']}x{r['H']}x{r['W']} | {r['N']} | {1e3 * f['ours']:.2f} | "
              f"{f['ours'] / f['torchvision']:.2f} | {f['ours'] / f['dense']:.2f} | {1e3 * fb['ours']:.2f} | "
              f"{fb['ours'] / fb['torchvision']:.2f} | {fb['ours'] / fb['dense']:.2f} | "
              f"{fb['ours_det'] / fb['ours']:.2f} |")

    r = roi_rows(dev, dtype, roi_cfg, repeats)
    print(f"\nmodulated deform_roi_pool, {r['K']} RoIs 7x7 from C={r['C']}, {r['H']}x{r['W']} (times in ms)")
    print("| pass | ours | ours / roi_align | deterministic / default |\n|---|---|---|---|")
    print(f"| forward | {1e3 * r['fwd']['ours']:.2f} | {r['fwd']['ours'] / r['fwd']['roi_align']:.2f} | - |")
    print(f"| forward+backward | {1e3 * r['fb']['ours']:.2f} | {r['fb']['ours'] / r['fb']['roi_align']:.2f} | "
          f"{r['fb']['ours_det'] / r['fb']['ours']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
