"""benchmarks/deform_conv.py's --peers, --small and --grads modes at a tiny size.

They check that each mode runs and prints its table, and that the peers compute what we compute; they
never assert on time.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcnv2

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH = BENCH_DIR / "deform_conv.py"
HAVE_PEERS = all(importlib.util.find_spec(p) for p in ("openvino", "onnxruntime", "onnx"))


def run_bench(*args: str) -> str:
    cmd = [sys.executable, str(BENCH), *args, "--tiny", "--repeats", "1", "--batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def load_module(name: str):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH_DIR))


@pytest.mark.slow  # a subprocess that builds both runtimes twice; CI runs it
@pytest.mark.skipif(not HAVE_PEERS, reason="needs openvino, onnxruntime and onnx (pip install -e '.[bench]')")
def test_peer_mode_prints_every_runtime_at_each_thread_count():
    out = run_bench("--peers", "--threads", "1", "2")
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    assert [row.split("|")[3].strip() for row in rows] == ["1", "2"]
    header = next(line for line in out.splitlines() if line.startswith("| layer"))
    for column in ("ours", "dense conv", "ours, channels-last", "dense conv, channels-last", "OpenVINO",
                   "ONNX Runtime", "torchvision", "ours, channels-last, packed weights"):
        assert column in header
    assert all(row.count(" ms") == 8 for row in rows)


@pytest.mark.skipif(not HAVE_PEERS, reason="needs openvino, onnxruntime and onnx (pip install -e '.[bench]')")
def test_peers_compute_our_modulated_deformable_conv():
    peers = load_module("deform_conv_peers")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 7, 9, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g)
    off = torch.randn(2, 18, 7, 9, generator=g) * 3  # many samples outside the map
    mask = torch.rand(2, 9, 7, 9, generator=g)
    ours = dcnv2.ops.deform_conv2d(x, off, w, padding=1, mask=mask)
    for make in (peers.openvino_runner, peers.onnxruntime_runner):
        torch.testing.assert_close(torch.from_numpy(make(x, w, off, mask, threads=1)()), ours, rtol=1e-4, atol=1e-4)


def test_peer_mode_names_the_missing_package(monkeypatch, capsys):
    peers = load_module("deform_conv_peers")
    monkeypatch.setattr(peers, "missing", lambda: ["openvino"])
    monkeypatch.setitem(sys.modules, "deform_conv_peers", peers)
    bench = load_module("deform_conv")
    x, w, off, mask = bench.make_case(4, 5, 5, 1, requires_grad=False)
    with pytest.raises(SystemExit, match=r"--peers needs openvino: pip install -e '\.\[bench\]'"):
        bench.peer_runners(x, w, off, mask, threads=1)


@pytest.mark.slow  # the benchmark script in a subprocess (~10 s)
def test_small_map_and_gradient_modes_print_their_tables():
    out = run_bench("--small", "--grads", "--threads", "1")
    assert "fwd+bwd ours/dense" in out and "fwd ours/dense all taps" in out
    small = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny | 8 |")]
    # the zero-padded dense conv, channels-last and packed weights are timed too
    assert len(small) == 1 and len(small[0]) == 13
    assert "fwd ours/dense, channels-last" in out
    grads = [line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| tiny C=8")]
    assert grads == ["all", "input only", "weight only"]
