"""Compiles every dcnv2 Triton kernel ahead of time for an NVIDIA target, without a GPU.

``python tests/triton_compile_check.py [arch ...] [--dtypes float32 ...]`` runs Triton's full compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas shipped in the triton wheel) for each kernel and
dtype, with the launch options the wrappers use, and checks the shared memory each needs against
64 KB (what the smallest supported GPUs offer per block). The interpreter tests cannot catch
compiler-only problems (types of loop-carried values, unsupported dot types, pipelining buffers);
this does. Prints one line per kernel and exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SHARED_LIMIT = 64 * 1024


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("archs", type=int, nargs="*", default=[80, 90])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16", "float64"])
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's

    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dcnv2.ops.triton import deform_conv as dc
    from dcnv2.ops.triton import roi_pool as rp

    ptr = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.int64: "*i64"}

    def compile_kernel(fn, values, arch, num_stages):
        sig, const = {}, {}
        for prm in fn.params:
            v = values[prm.name]
            if prm.is_constexpr:
                sig[prm.name], const[prm.name] = "constexpr", v
            elif isinstance(v, torch.dtype):
                sig[prm.name] = ptr[v]
            else:
                sig[prm.name] = "i64" if isinstance(v, int) else "fp32"
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": 4, "num_stages": num_stages})

    failures = 0
    for arch in args.archs:
        for name in args.dtypes:
            dt = getattr(torch, name)
            ct, CDT, _, DOT = dc._types(dt)
            ints = dict(NL=1000, C=64, H=10, W=11, Cout=64, Cg=64, Coutg=64, Cog=64, OG=1, K=9, L=100, Wo=10, kw=3,
                        sh=2, sw=2, ph=1, pw=1, dh=2, dw=2, S=64, NSEG=1, NBN=1, NCK=2, ROWS_PER_SPLIT=640, row0=0,
                        HW=110, PW=7, PP=49, N=2)
            values = dict(x_ptr=dt, w_ptr=dt, off_ptr=dt, mask_ptr=dt, b_ptr=dt, out_ptr=dt, go_ptr=dt, gin_ptr=ct,
                          goff_ptr=ct, gmask_ptr=ct, gcol_ptr=ct, dest_ptr=torch.int64, cw_ptr=ct, part_ptr=ct,
                          order_ptr=torch.int64, keys_ptr=torch.int64, starts_ptr=torch.int64, geo_ptr=ct,
                          grid_ptr=torch.int64, start_ptr=torch.int64, HAS_MASK=True, HAS_BIAS=True, HAS_OFF=True,
                          NEED_POS=True, ATOMIC=True, CDT=CDT, PREC="ieee", DOT=DOT, BM=64, BN=64, BK=32, BB=16,
                          BC=32, WALK=rp.WALK_WHOLE, **ints)
            roi = dict(off_ptr=ct, mask_ptr=ct)
            stages = dc._stages(dt)
            jobs = [("conv forward", dc._dcn_fwd_kernel, {}, stages),
                    ("conv backward data (atomic)", dc._dcn_bwd_data_kernel, {}, stages),
                    ("conv backward data (ordered)", dc._dcn_bwd_data_kernel, dict(ATOMIC=False), stages),
                    ("conv backward weight", dc._dcn_bwd_weight_kernel, {}, stages),
                    ("conv ordered scatter", dc._ordered_scatter_kernel, dict(BK=64), 3),
                    ("roi forward", rp._roi_fwd_kernel, roi, 3),
                    ("roi backward (atomic)", rp._roi_bwd_atomic_kernel, roi, 3),
                    ("roi backward (ordered)", rp._roi_bwd_ordered_kernel, roi, 1)]
            if dt == torch.float32:
                jobs.append(("conv forward tf32", dc._dcn_fwd_kernel, dict(PREC="tf32"), stages))
            for label, fn, over, num_stages in jobs:
                t0 = time.perf_counter()
                try:
                    k = compile_kernel(fn, dict(values, **over), arch, num_stages)
                except Exception as exc:  # noqa: BLE001  (reported, counted)
                    failures += 1
                    print(f"FAIL sm_{arch} {name} {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                    continue
                shared = k.metadata.shared
                ok = shared <= SHARED_LIMIT
                failures += not ok
                print(f"{'ok' if ok else 'FAIL'} sm_{arch} {name} {label}: shared {shared / 1024:.0f} KB, "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
