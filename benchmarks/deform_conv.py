"""Deformable convolution on CPU: ours vs torchvision's op vs a dense conv of the same shape.

The 3x3 layers of ResNet-50 stages c3, c4, c5 at 800 px shorter side, modulated, float32, all cores.
``--dtype bfloat16`` instead times ours and the dense conv in float32 and in bfloat16 side by side.
``--peers`` times the forward of ours, the dense conv, OpenVINO's DeformableConvolution, ONNX Runtime's
DeformConv and torchvision's op (each peer's output checked against ours), at each ``--threads`` count
(e.g. ``--threads 1 2``: one column is our speed-up from the first count to the others); ours and
the dense conv run once more on channels-last tensors (torch.channels_last: a CPU model's usual layout,
which our kernel reads in place), and the peers' ratios are given against both of ours; a last column
times ours channels-last inside ``dcnv2.ops.packed_weights()`` (each weight packed once, as a runtime
does with its constant weights) beside the dense conv and OpenVINO.
``--small`` times the small maps of the demo's models (a batch of 64 crops at 12x12 stride 2 ... 2x2, a
batch of 8 at 16x16 ... 4x4), forward and forward+backward, against the dense conv (and the forward
against the dense conv on the zero-padded input, which cannot skip the taps that read the border, and
channels-last inside ``dcnv2.ops.packed_weights()``).
``--grads`` times the backward with all gradients, the input's alone (a frozen layer, the analysis
passes) and the weight's alone (frozen offsets), against the dense conv asked for the same.
Everything runs side by side in one process; each time is the best of --repeats runs, and the table
prints ratios (the absolute times of a shared machine mean little on their own).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
import torchvision

import dcnv2

LAYERS = [  # (stage, channels, height, width)
    ("c3", 128, 100, 167),
    ("c4", 256, 50, 84),
    ("c5", 512, 25, 42),
]
SMALL_MAPS = [  # (name, batch, channels, height, width, stride): the demo's crop and detector steps
    ("64x12 s2", 64, 128, 12, 12, 2),
    ("64x6", 64, 256, 6, 6, 1),
    ("64x3", 64, 512, 3, 3, 1),
    ("64x2", 64, 512, 2, 2, 1),
    ("8x16", 8, 128, 16, 16, 1),
    ("8x8", 8, 256, 8, 8, 1),
    ("8x4", 8, 512, 4, 4, 1),
]
TINY = [("tiny", 8, 6, 6)]  # --tiny: a test-sized layer for every mode


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_memory(fn) -> int:
    """Peak resident memory during ``fn`` beyond what was resident before it.

    The larger of Linux's peak-RSS watermark (VmHWM, reset before the call) and a 0.2 ms poll of the
    resident set from a watcher thread (the kernel's watermark can miss pages touched by worker
    threads). Meaningful in a process started with a small ``MALLOC_MMAP_THRESHOLD_`` (see
    ``measure_memory``), so that freed buffers go back to the system and large allocations show up.
    """
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open("/proc/self/statm", os.O_RDONLY)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], int(os.pread(fd, 64, 0).split()[1]) * page)
            time.sleep(0.0002)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark
    before = _rss_bytes("VmRSS")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
        os.close(fd)
    return max(0, max(_rss_bytes("VmHWM"), peak[0]) - before)


def measure_memory(batches) -> dict:
    """Each measurement runs in a fresh child process (so no buffer cached by an earlier call hides an
    allocation) whose allocator returns freed memory to the system."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = {}
    for stage, *_ in LAYERS:
        for N in batches:
            for mode in ("fwd", "fwdbwd"):
                for impl in ("ours", "tv"):
                    cmd = [sys.executable, __file__, "--memory-case", stage, str(N), mode, impl]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    result[(stage, str(N), mode, impl)] = int(out.strip().splitlines()[-1])
    return result


def memory_case(stage: str, N: int, mode: str, impl: str) -> None:
    C, H, W = next((c, h, w) for s, c, h, w in LAYERS if s == stage)
    op = dcnv2.ops.deform_conv2d if impl == "ours" else torchvision.ops.deform_conv2d
    x, w, off, mask = make_case(C, H, W, N, requires_grad=mode == "fwdbwd")
    # workspace = peak extra memory minus the results themselves (the output; for fwd+bwd also the
    # four gradients), which every implementation must allocate
    out_bytes = N * C * H * W * 4
    if mode == "fwd":
        with torch.no_grad():
            print(peak_extra_memory(lambda: op(x, off, w, padding=1, mask=mask)) - out_bytes)
    else:
        go = torch.randn(N, C, H, W)
        grads = sum(t.numel() * 4 for t in (x, w, off, mask))
        print(peak_extra_memory(lambda: op(x, off, w, padding=1, mask=mask).backward(go)) - out_bytes - grads)


def make_case(C: int, H: int, W: int, N: int, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) * 0.01
    off = torch.randn(N, 18, H, W, generator=g) * 2
    mask = torch.rand(N, 9, H, W, generator=g)
    tensors = [x, w, off, mask]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors


def best_times_interleaved(fns, repeats: int) -> list[float]:
    """Best time of each function, taking turns round by round so that a noisy spell of a shared
    machine hits all of them alike (their ratio is what the table reports)."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def run(repeats: int, batches) -> list[dict]:
    memory = measure_memory(batches)
    rows = []
    for stage, C, H, W in LAYERS:
        for N in batches:
            x, w, off, mask = make_case(C, H, W, N, requires_grad=False)
            ours = lambda: dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask)  # noqa: E731
            tv = lambda: torchvision.ops.deform_conv2d(x, off, w, padding=1, mask=mask)  # noqa: E731
            dense = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
            with torch.no_grad():
                f_ours, f_dense = best_times_interleaved([ours, dense], repeats)
                f_tv = best_time(tv, repeats)

            xg, wg, offg, maskg = make_case(C, H, W, N, requires_grad=True)
            go = torch.randn(N, C, H, W)

            def fb(fn):
                def step():
                    y = fn()
                    y.backward(go)
                    for t in (xg, wg, offg, maskg):
                        t.grad = None
                return step

            b_ours, b_dense = best_times_interleaved(
                [fb(lambda: dcnv2.ops.deform_conv2d(xg, offg, wg, padding=1, mask=maskg)),
                 fb(lambda: F.conv2d(xg, wg, padding=1))], repeats)
            b_tv = best_time(fb(lambda: torchvision.ops.deform_conv2d(xg, offg, wg, padding=1, mask=maskg)),
                             max(1, repeats // 2))
            m = {k[2:]: v for k, v in memory.items() if k[:2] == (stage, str(N))}
            rows.append(dict(stage=stage, C=C, H=H, W=W, N=N, f_ours=f_ours, f_tv=f_tv, f_dense=f_dense,
                             b_ours=b_ours, b_tv=b_tv, b_dense=b_dense, m_ours=m[("fwd", "ours")],
                             m_tv=m[("fwd", "tv")], mb_ours=m[("fwdbwd", "ours")], mb_tv=m[("fwdbwd", "tv")]))
            print_row(rows[-1], header=len(rows) == 1)
    return rows


def run_dtype(repeats: int, batches, stages, dtype: torch.dtype) -> list[dict]:
    """Ours and the dense conv, each in float32 and in ``dtype``, side by side (interleaved rounds)."""
    rows = []
    for stage, C, H, W in LAYERS:
        if stages and stage not in stages:
            continue
        for N in batches:
            base = make_case(C, H, W, N, requires_grad=False)
            go32 = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(1))
            fwd, fb = [], []
            for dt in (torch.float32, dtype):
                x, w, off, mask = (t.to(dt) for t in base)
                fwd += [lambda x=x, w=w, off=off, mask=mask: dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask),
                        lambda x=x, w=w: F.conv2d(x, w, padding=1)]
                leaves = [t.to(dt).requires_grad_() for t in base]
                go = go32.to(dt)

                def step(fn, leaves=leaves, go=go):
                    def run():
                        fn(*leaves).backward(go)
                        for t in leaves:
                            t.grad = None
                    return run
                fb += [step(lambda x, w, off, mask: dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask)),
                       step(lambda x, w, off, mask: F.conv2d(x, w, padding=1))]
            with torch.no_grad():
                f = best_times_interleaved(fwd, repeats)
            b = best_times_interleaved(fb, repeats)
            rows.append(dict(stage=stage, C=C, H=H, W=W, N=N, f=f, b=b))
            print_dtype_row(rows[-1], header=len(rows) == 1, name=str(dtype).replace("torch.", ""))
    return rows


def print_dtype_row(r: dict, header: bool, name: str) -> None:
    if header:
        print(f"| layer | N | pass | ours fp32 | ours {name} | dense fp32 | dense {name} "
              f"| ours {name}/fp32 | dense {name}/fp32 | ours/dense in {name} |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (o32, d32, o16, d16) in (("fwd", r["f"]), ("fwd+bwd", r["b"])):
        print(f"| {r['stage']} C={r['C']} {r['H']}x{r['W']} | {r['N']} | {label} | {o32 * 1e3:.1f} ms "
              f"| {o16 * 1e3:.1f} ms | {d32 * 1e3:.1f} ms | {d16 * 1e3:.1f} ms | {o16 / o32:.2f}x "
              f"| {d16 / d32:.2f}x | {o16 / d16:.2f}x |", flush=True)


def print_row(r: dict, header: bool) -> None:
    if header:
        print("| layer | N | fwd ours/dense | fwd tv/ours | fwd+bwd ours/dense | fwd+bwd tv/ours "
              "| workspace fwd ours / tv (MB) | workspace fwd+bwd ours / tv (MB) |")
        print("|---|---|---|---|---|---|---|---|")
    mb = 1 << 20
    print(f"| {r['stage']} C={r['C']} {r['H']}x{r['W']} | {r['N']} "
          f"| {r['f_ours'] / r['f_dense']:.2f}x | {r['f_tv'] / r['f_ours']:.1f}x "
          f"| {r['b_ours'] / r['b_dense']:.2f}x | {r['b_tv'] / r['b_ours']:.1f}x "
          f"| {r['m_ours'] / mb:.0f} / {r['m_tv'] / mb:.0f} | {r['mb_ours'] / mb:.0f} / {r['mb_tv'] / mb:.0f} |",
          flush=True)


def best_times_blocked(fns, repeats: int, rounds: int = 3, pause: float = 0.05) -> list[float]:
    """Best time of each function, timed in blocks: ``rounds`` rounds in which each function runs
    ``repeats / rounds`` times in a row after a short pause. The runtimes keep their worker threads
    spinning for a while after a call (ONNX Runtime's and OpenVINO's pools, torch's OpenMP team); on a
    2-core machine, timing them turn by turn would charge one's spinning to the next one's time."""
    best = [float("inf")] * len(fns)
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            time.sleep(pause)
            fn()  # warm-up
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def peer_runners(x, w, off, mask, threads: int) -> dict:
    """The peers' forward of this layer on ``threads`` threads, each checked against ours (<= 1e-4)."""
    import deform_conv_peers as peers

    lacking = peers.missing()
    if lacking:
        raise SystemExit(f"--peers needs {' and '.join(lacking)}: pip install -e '.[bench]' "
                         f"(or pip install {' '.join(lacking)})")
    with torch.no_grad():
        ours = dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask)
    runners = {"OpenVINO": peers.openvino_runner(x, w, off, mask, threads),
               "ONNX Runtime": peers.onnxruntime_runner(x, w, off, mask, threads)}
    for name, fn in runners.items():
        err = (torch.from_numpy(fn()) - ours).abs().max().item()
        if not err <= 1e-4 * max(1.0, ours.abs().max().item()):
            raise SystemExit(f"{name}'s output differs from ours by {err:.3g} (> 1e-4)")
    return runners


def run_peers(repeats: int, batches, layers, thread_counts) -> list[dict]:
    """Forward of ours, the dense conv, OpenVINO, ONNX Runtime and torchvision, per thread count."""
    rows = []
    for stage, C, H, W in layers:
        for N in batches:
            x, w, off, mask = make_case(C, H, W, N, requires_grad=False)
            xc, wc, offc, maskc = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, off, mask))
            with torch.no_grad():  # the same bits in either layout
                if not torch.equal(dcnv2.ops.deform_conv2d(xc, offc, wc, padding=1, mask=maskc),
                                   dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask)):
                    raise SystemExit("our channels-last output differs from our NCHW output")
            by_threads = {}
            for threads in thread_counts:
                torch.set_num_threads(threads)
                peer = peer_runners(x, w, off, mask, threads)
                fns = [lambda: dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask),
                       lambda: F.conv2d(x, w, padding=1), *peer.values(),
                       lambda: torchvision.ops.deform_conv2d(x, off, w, padding=1, mask=mask),
                       lambda: dcnv2.ops.deform_conv2d(xc, offc, wc, padding=1, mask=maskc),
                       lambda: F.conv2d(xc, wc, padding=1)]
                with torch.no_grad():
                    t = best_times_blocked(fns, repeats)
                    with dcnv2.ops.packed_weights():  # ours as a runtime runs it: weights packed once
                        p = best_times_blocked([fns[5], fns[6], fns[2]], repeats)
                by_threads[threads] = t
                row = dict(stage=stage, C=C, H=H, W=W, N=N, threads=threads, ours=t[0], dense=t[1],
                           openvino=t[2], onnxruntime=t[3], torchvision=t[4], ours_cl=t[5], dense_cl=t[6],
                           packed=p, scaling=by_threads[thread_counts[0]][0] / t[0])
                rows.append(row)
                print_peer_row(row, header=len(rows) == 1, base_threads=thread_counts[0])
                del peer
    return rows


def print_peer_row(r: dict, header: bool, base_threads: int) -> None:
    if header:
        print("| layer | N | threads | ours | dense conv | ours, channels-last | dense conv, channels-last "
              f"| OpenVINO | ONNX Runtime | torchvision | ours, speed-up from {base_threads} thread(s) "
              "| ours, channels-last, packed weights |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    o, oc = r["ours"], r["ours_cl"]
    cols = [f"{o * 1e3:.1f} ms ({o / r['dense']:.2f}x dense)", f"{r['dense'] * 1e3:.1f} ms",
            f"{oc * 1e3:.1f} ms ({oc / r['dense_cl']:.2f}x dense)", f"{r['dense_cl'] * 1e3:.1f} ms"]
    cols += [f"{r[k] * 1e3:.1f} ms ({r[k] / o:.2f}x ours, {r[k] / oc:.2f}x channels-last)"
             for k in ("openvino", "onnxruntime")]
    cols += [f"{r['torchvision'] * 1e3:.1f} ms ({r['torchvision'] / o:.2f}x ours)"]
    p = r["packed"]  # [ours, dense conv, OpenVINO], timed together inside dcnv2.ops.packed_weights()
    print(f"| {r['stage']} C={r['C']} {r['H']}x{r['W']} | {r['N']} | {r['threads']} | " + " | ".join(cols)
          + f" | {r['scaling']:.2f}x | {p[0] * 1e3:.1f} ms ({p[0] / p[1]:.2f}x dense, OpenVINO {p[2] / p[0]:.2f}x) |",
          flush=True)


def small_case(N: int, C: int, H: int, W: int, stride: int):
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1  # 3x3, padding 1
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, C, H, W, generator=g), torch.randn(C, C, 3, 3, generator=g) * 0.01,
            torch.randn(N, 18, Ho, Wo, generator=g) * 2, torch.rand(N, 9, Ho, Wo, generator=g),
            torch.randn(N, C, Ho, Wo, generator=g))


def backward_step(fn, leaves, go):
    def step():
        fn(*leaves).backward(go)
        for t in leaves:
            t.grad = None
    return step


def run_small(repeats: int, shapes) -> list[dict]:
    """Forward and forward+backward of ours and the dense conv on small maps.

    On maps this small, padding is a large share of the 3x3 taps (on a 3x3 map 40 % of them read the zero
    border) and oneDNN's dense conv skips those taps; a deformable conv cannot, since its taps move with
    the offsets. So the table also times the dense conv on the zero-padded input (the same output, with
    every tap computed): the dense arithmetic a deformable layer has to do, and the "all taps" ratio.
    The last two columns time ours against the dense conv once more with every tensor channels-last.
    """
    rows = []
    ours = lambda x, w, off, mask, conf: dcnv2.ops.deform_conv2d(x, off, w, mask=mask, **conf)  # noqa: E731
    dense = lambda x, w, off, mask, conf: F.conv2d(x, w, **conf)  # noqa: E731
    for name, N, C, H, W, stride in shapes:
        x, w, off, mask, go = small_case(N, C, H, W, stride)
        conf = dict(stride=stride, padding=1)
        x_padded = F.pad(x, (1, 1, 1, 1))
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, w, off, mask, go)]
        with torch.no_grad():
            f = best_times_blocked([lambda: ours(x, w, off, mask, conf), lambda: dense(x, w, off, mask, conf),
                                    lambda: F.conv2d(x_padded, w, stride=stride),
                                    lambda: ours(*cl[:4], conf), lambda: dense(*cl[:4], conf)], repeats)
        b = []
        for fn, tensors in ((ours, (x, w, off, mask, go)), (dense, (x, w, off, mask, go)), (ours, cl), (dense, cl)):
            leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in tensors[:4]]
            b.append(backward_step(lambda *a, fn=fn: fn(*a, conf), leaves, tensors[4]))
        b = best_times_blocked(b, repeats)
        with torch.no_grad(), dcnv2.ops.packed_weights():
            p = best_times_blocked([lambda: ours(*cl[:4], conf), lambda: dense(*cl[:4], conf)], repeats)
        rows.append(dict(name=name, C=C, f=f, b=b, packed=p))
        if len(rows) == 1:
            print("| batch x map | C | fwd ours | fwd dense | fwd dense, all taps | fwd ours/dense "
                  "| fwd ours/dense all taps | fwd+bwd ours | fwd+bwd dense | fwd+bwd ours/dense "
                  "| fwd ours/dense, channels-last | fwd+bwd ours/dense, channels-last "
                  "| fwd ours/dense, channels-last, packed weights |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {name} | {C} | {f[0] * 1e3:.2f} ms | {f[1] * 1e3:.2f} ms | {f[2] * 1e3:.2f} ms | {f[0] / f[1]:.2f}x "
              f"| {f[0] / f[2]:.2f}x | {b[0] * 1e3:.2f} ms | {b[1] * 1e3:.2f} ms | {b[0] / b[1]:.2f}x "
              f"| {f[3] / f[4]:.2f}x | {b[2] / b[3]:.2f}x | {p[0] / p[1]:.2f}x |", flush=True)
    return rows


GRADIENT_SETS = {"all": (0, 1, 2, 3), "input only": (0,), "weight only": (1,)}  # of (x, w, off, mask)


def run_grads(repeats: int, batches, layers) -> list[dict]:
    """Forward+backward with each set of gradients asked for, ours and the dense conv."""
    rows = []
    for stage, C, H, W in layers:
        for N in batches:
            base = make_case(C, H, W, N, requires_grad=False)
            go = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(1))
            for label, wanted in GRADIENT_SETS.items():
                leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(base)]
                fns = [backward_step(lambda x, w, off, mask: dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask),
                                     leaves, go),
                       backward_step(lambda x, w: F.conv2d(x, w, padding=1), leaves[:2], go)]
                t = best_times_blocked(fns, repeats)
                rows.append(dict(stage=stage, N=N, grads=label, ours=t[0], dense=t[1]))
                if len(rows) == 1:
                    print("| layer | N | gradients | fwd+bwd ours | fwd+bwd dense | ours/dense |")
                    print("|---|---:|---|---:|---:|---:|")
                print(f"| {stage} C={C} {H}x{W} | {N} | {label} | {t[0] * 1e3:.1f} ms | {t[1] * 1e3:.1f} ms "
                      f"| {t[0] / t[1]:.2f}x |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per measurement; the best is kept")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="other than float32: ours and the dense conv in float32 and in this dtype, "
                             "side by side (no torchvision, no memory)")
    parser.add_argument("--layers", nargs="+", choices=[s for s, *_ in LAYERS], help="only these stages")
    parser.add_argument("--threads", type=int, nargs="+",
                        help="torch threads (default: torch's); --peers runs each count in turn")
    parser.add_argument("--peers", action="store_true",
                        help="forward against OpenVINO and ONNX Runtime (the bench extra) and torchvision")
    parser.add_argument("--small", action="store_true", help="the demo's small maps against the dense conv")
    parser.add_argument("--grads", action="store_true",
                        help="backward with all / the input's / the weight's gradients against the dense conv")
    parser.add_argument("--tiny", action="store_true", help="one test-sized layer (checks, not timings)")
    parser.add_argument("--memory-case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        stage, N, mode, impl = args.memory_case
        return memory_case(stage, int(N), mode, impl)
    layers = TINY if args.tiny else [layer for layer in LAYERS if not args.layers or layer[0] in args.layers]
    if args.peers:
        counts = args.threads or [torch.get_num_threads()]
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, float32, modulated, 3x3 pad 1, "
              f"forward; best of {args.repeats} in blocks; {os.cpu_count()} CPUs")
        run_peers(args.repeats, args.batches, layers, counts)
        return
    if args.threads:
        torch.set_num_threads(args.threads[0])
    if args.small or args.grads:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, modulated, 3x3 pad 1; "
              f"best of {args.repeats} in blocks")
        if args.small:
            run_small(args.repeats, [("tiny", 2, 8, 6, 6, 1)] if args.tiny else SMALL_MAPS)
        if args.grads:
            run_grads(args.repeats, args.batches, layers)
        return
    if args.dtype != "float32":
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 vs {args.dtype}, "
              f"modulated, 3x3 pad 1; best of {args.repeats} interleaved rounds")
        run_dtype(args.repeats, args.batches, args.layers, getattr(torch, args.dtype))
        return
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"float32, modulated, 3x3 pad 1; best of {args.repeats}")
    run(args.repeats, args.batches)


if __name__ == "__main__":
    main()
