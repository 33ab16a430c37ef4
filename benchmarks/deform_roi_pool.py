"""Deformable RoI pooling on CPU: ours against torchvision's roi_align.

The paper's detector head: 512 RoIs pooled 7x7 (sampling ratio 2) from a C=256, 50x84 map (conv4
at stride 16 of an 800x1344 image), float32, all cores. Everything runs side by side in one process;
each time is the best of --repeats runs, and the table prints ratios to roi_align (the absolute
times of a shared machine mean little on their own). Target: deform_roi_pool with offset and mask
at most 2x roi_align, forward and forward+backward.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from dcnv2.nn import ModulatedDeformRoIPool
from dcnv2.ops import deform_roi_pool

C, H, W, STRIDE, OUT, SAMPLING = 256, 50, 84, 16, 7, 2


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_case(num_rois: int, seed: int = 0):
    """Proposal-like boxes: sizes from 16 to 512 px (log-uniform), anywhere on the image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, H, W, generator=g)
    img_w, img_h = W * STRIDE, H * STRIDE
    size = torch.exp(torch.empty(num_rois, 2).uniform_(4 * 0.6931, 9 * 0.6931, generator=g))  # 16..512 px
    xy = torch.rand(num_rois, 2, generator=g) * (torch.tensor([img_w, img_h]) - size)
    rois = torch.cat([torch.zeros(num_rois, 1), xy, xy + size], 1)
    offset = torch.randn(num_rois, 2, OUT, OUT, generator=g) * 0.5
    mask = torch.rand(num_rois, 1, OUT, OUT, generator=g)
    return x, rois, offset, mask


def forward_backward(fn, leaves, grad_out):
    def step():
        fn().backward(grad_out)
        for t in leaves:
            t.grad = None
    return step


def run(repeats: int, num_rois: int) -> None:
    x, rois, offset, mask = make_case(num_rois)
    scale = 1.0 / STRIDE
    tv = lambda inp: torchvision.ops.roi_align(inp, rois, OUT, scale, SAMPLING, aligned=True)  # noqa: E731
    variants = {
        "deform_roi_pool, offset + mask (DCNv2)": (True, True),
        "deform_roi_pool, offset (DCNv1)": (True, False),
        "deform_roi_pool, no offset (RoIAlign)": (False, False),
    }
    go = torch.randn(num_rois, C, OUT, OUT)
    with torch.no_grad():
        f_tv = best_time(lambda: tv(x), repeats)
    xg = x.clone().requires_grad_()
    b_tv = best_time(forward_backward(lambda: tv(xg), [xg], go), repeats)

    rows = []
    for name, (use_off, use_mask) in variants.items():
        off = offset if use_off else None
        m = mask if use_mask else None
        with torch.no_grad():
            f = best_time(lambda: deform_roi_pool(x, rois, off, m, OUT, scale, SAMPLING), repeats)
        leaves = [x.clone().requires_grad_()]
        leaves += [offset.clone().requires_grad_()] if use_off else []
        leaves += [mask.clone().requires_grad_()] if use_mask else []

        def call(leaves=leaves, use_off=use_off, use_mask=use_mask):
            o = leaves[1] if use_off else None
            mm = leaves[-1] if use_mask else None
            return deform_roi_pool(leaves[0], rois, o, mm, OUT, scale, SAMPLING)

        b = best_time(forward_backward(call, leaves, go), repeats)
        rows.append((name, f / f_tv, b / b_tv))

    # the whole DCNv2 layer: RoIAlign, fc 1024 -> fc 1024 -> fc 3K offset branch, deformed pooling
    layer = ModulatedDeformRoIPool(C, OUT, SAMPLING, spatial_scale=scale)
    with torch.no_grad():
        layer.offset_fc[4].weight.normal_(0, 0.01)  # non-zero offsets, as after some training
        f = best_time(lambda: layer(x, rois), repeats)
    b = best_time(forward_backward(lambda: layer(xg, rois), [xg] + list(layer.parameters()), go), repeats)
    rows.append(("ModulatedDeformRoIPool layer (2 poolings + fc 1024, 1024, 147)", f / f_tv, b / b_tv))

    print("| op | fwd / roi_align | fwd+bwd / roi_align's |")
    print("|---|---|---|")
    for name, rf, rb in rows:
        print(f"| {name} | {rf:.2f}x | {rb:.2f}x |")
    ok = rows[0][1] <= 2.0 and rows[0][2] <= 2.0
    print(f"\ntarget (offset + mask <= 2x roi_align, fwd and fwd+bwd): {'met' if ok else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per measurement; the best is kept")
    parser.add_argument("--rois", type=int, default=512, help="number of RoIs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"float32, {args.rois} RoIs on C={C} {H}x{W}, {OUT}x{OUT}, sampling ratio {SAMPLING}; best of {args.repeats}\n")
    run(args.repeats, args.rois)


if __name__ == "__main__":
    main()
