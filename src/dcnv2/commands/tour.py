"""``dcnv2 tour``: a two-minute tour of the deformable convolution op (correctness and speed)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("tour", help="a short tour of the DCNv2 layer: forward/backward, checks, benchmark table")
    p.add_argument("--repeats", type=int, default=3, help="benchmark repetitions (best is kept)")
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark table")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    import torch
    import torchvision

    import dcnv2
    from dcnv2.nn import ModulatedDeformConv2d

    print(f"dcnv2 {dcnv2.__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads · "
          f"native CPU kernel: {dcnv2.ops._native.HAS_NATIVE}")
    from dcnv2.ops import triton as cuda_kernels

    gpu = "a CUDA GPU is present" if torch.cuda.is_available() else "no CUDA GPU here"
    print(f"CUDA backend: {cuda_kernels.describe()} ({gpu})\n")

    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(64, 64, 3, padding=1)
    print(layer, "\n")
    x = torch.randn(2, 64, 48, 64, requires_grad=True)
    offset, mask = layer.offset_and_mask(x)
    print(f"fresh layer: offsets all zero = {not offset.any().item()}, masks all 0.5 = "
          f"{bool((mask == 0.5).all())} -> it starts as a plain 3x3 conv with halved input")
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.05)  # pretend training moved the offsets
    t0 = time.perf_counter()
    y = layer(x)
    y.square().mean().backward()
    print(f"forward + backward of a 64->64 layer on 2x64x48x64: {1e3 * (time.perf_counter() - t0):.0f} ms; "
          f"|grad offset conv| = {layer.conv_offset.weight.grad.norm():.3g}\n")

    print("float64 check against torchvision.ops.deform_conv2d (random offsets, mask, groups):")
    print("| quantity | max abs difference |\n|---|---|")
    g = torch.Generator().manual_seed(1)
    D = torch.float64
    xs = torch.randn(2, 8, 11, 13, generator=g, dtype=D)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=D)
    off = torch.randn(2, 2 * 2 * 9, 11, 13, generator=g, dtype=D) * 3
    m = torch.rand(2, 2 * 9, 11, 13, generator=g, dtype=D)
    results = []
    for fn in (dcnv2.ops.deform_conv2d, torchvision.ops.deform_conv2d):
        leaves = [t.clone().requires_grad_() for t in (xs, off, w, m)]
        out = fn(leaves[0], leaves[1], leaves[2], padding=1, mask=leaves[3])
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("output", "grad input", "grad offset", "grad weight", "grad mask"), *results):
        print(f"| {name} | {(a - b).abs().max().item():.1e} |")
    print()

    if not args.no_bench:
        import runpy
        import sys
        from pathlib import Path

        path = Path(__file__).resolve().parents[3] / "benchmarks" / "deform_conv.py"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (benchmarks ship with the source checkout)")
        print("Benchmark (ResNet-50 3x3 layers at 800 px, batch 1; ratios measured side by side in one process;\n"
              "`make bench` runs the full table):")
        saved, sys.argv = sys.argv, [str(path), "--repeats", str(args.repeats), "--batches", "1"]
        try:
            runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.argv = saved
    return 0
