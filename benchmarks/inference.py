"""Detector inference on CPU: PyTorch eager float32 and bfloat16 (autocast), ONNX Runtime, OpenVINO (float32,
when installed), and the same detector with torchvision's deform_conv2d as the peer, for ``regular`` vs
``mdconv-c3c5-mdpool``.

Two models:

* ``paper`` — the paper's R-50 Faster R-CNN (dilated conv5, RPN on conv4, 2fc 1024, 81 classes), one
  800x1333 image, torchvision's test settings (1000 proposals). Untrained weights: latency only.
* ``demo``  — the demo's ResNet-18-FPN detector (``SyntheticRecipe``) on a 128 px synthetic image. With
  ``--demo-checkpoint`` it loads trained weights and also scores float32, bfloat16, ONNX Runtime and OpenVINO
  on the synthetic validation split (COCO AP), side by side.

All variants of a model run in one process, round-robin (so a noisy neighbour hits them alike); each time is
the best of ``--repeats`` rounds after a warm-up, and the table prints ratios to our float32 eager time. The
peer swaps only the deformable convs to ``torchvision.ops.deform_conv2d`` (torchvision has no deformable
RoI pooling; mdpool stays ours).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from typing import Callable, Dict, List

import torch
import torchvision

import dcnv2
import dcnv2.nn.deform_conv as dcn_layers
from dcnv2.export.detector import ExportableDetector
from dcnv2.export.onnx import export_onnx, onnx_session, run_onnx
from dcnv2.export.precision import Bfloat16Detector

PRESETS = ("regular", "mdconv-c3c5-mdpool")


@contextlib.contextmanager
def torchvision_deform_conv():
    """The peer: our layers call torchvision's op (same arguments and layout)."""
    saved = dcn_layers.deform_conv2d
    dcn_layers.deform_conv2d = torchvision.ops.deform_conv2d
    try:
        yield
    finally:
        dcn_layers.deform_conv2d = saved


def build(kind: str, preset: str):
    from dcnv2.engine.config import ModelSpec, build_model
    from dcnv2.experiments.recipes import SyntheticRecipe

    torch.manual_seed(0)
    if kind == "paper":
        spec = ModelSpec(arch="faster_rcnn", preset=preset, backbone="resnet50", fpn=False, num_classes=81,
                         min_size=800, max_size=1333)
        image = torch.rand(3, 800, 1333, generator=torch.Generator().manual_seed(0))
    else:
        recipe = SyntheticRecipe()
        spec = ModelSpec(arch="faster_rcnn", preset=preset, backbone=recipe.backbone, fpn=recipe.fpn, num_classes=13,
                         min_size=recipe.image_size, max_size=recipe.image_size, kwargs=dict(recipe.model_kwargs))
        image = synthetic_image(recipe.image_size)
    model = build_model(spec, inference=True)
    calibrate_batch_norm(model, image)
    return model, image


@torch.no_grad()
def calibrate_batch_norm(model, image) -> None:
    """Sets BatchNorm statistics from the image itself. An untrained network's default statistics (mean 0,
    variance 1) let activations shrink into float32 denormals, which run many times slower on a CPU and
    would time an artifact, not the detector; trained weights do not do that."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.eval()
    for bn in bns:
        bn.train()
    images, _ = model.transform([image, image.flip(-1)])
    model.backbone(images.tensors)
    model.eval()


def synthetic_image(size: int) -> torch.Tensor:
    import numpy as np

    from dcnv2.data.synthetic import SynthConfig, render_image

    arr = render_image(np.random.default_rng(0), SynthConfig(image_size=size))[0]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


class ExportedDetector(torch.nn.Module):
    """An exported model's run function (one image -> boxes, scores, labels, ...) called like a detector (list of
    images -> list of dicts), for evaluation."""

    def __init__(self, run_one, transform):
        super().__init__()
        self.run_one = run_one
        self.transform = transform
        self._p = torch.nn.Parameter(torch.zeros(0))  # evaluation code reads the device off a parameter

    def forward(self, images, targets=None):
        out = []
        for image in images:
            boxes, scores, labels = self.run_one(image)[:3]
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


def openvino_runner(model, image_size):
    """OpenVINO float32 on the CPU plugin (run one image), or None when openvino is not installed."""
    try:
        from dcnv2.export.openvino import export_openvino, openvino_compile, require_openvino, run_openvino

        require_openvino()
    except ImportError:
        print("  (openvino is not installed: no OpenVINO row)", flush=True)
        return None
    t0 = time.perf_counter()
    compiled = openvino_compile(export_openvino(ExportableDetector(model), image_size=image_size),
                                threads=torch.get_num_threads())
    print(f"  (OpenVINO conversion {time.perf_counter() - t0:.0f} s)", flush=True)
    return lambda x: run_openvino(compiled, x)


def variants(model, image, preset: str, eager_only: bool = False) -> Dict[str, Callable[[], object]]:
    """name -> a function running one image (no grad). ``eager_only``: our float32 eager run alone (the
    model-level deformable vs regular comparison, without the exports)."""
    if eager_only:
        return {"eager fp32": lambda: model([image])}
    bf16 = Bfloat16Detector(model)
    t0 = time.perf_counter()
    blob = export_onnx(ExportableDetector(model), image_size=tuple(image.shape[1:]))
    session = onnx_session(blob, threads=torch.get_num_threads())
    print(f"  (ONNX export {time.perf_counter() - t0:.0f} s, {len(blob) / 1e6:.0f} MB)", flush=True)
    runs = {
        "eager fp32": lambda: model([image]),
        "eager bf16": lambda: bf16([image]),
        "ONNX Runtime": lambda: run_onnx(session, image),
    }
    openvino = openvino_runner(model, tuple(image.shape[1:]))
    if openvino is not None:
        runs["OpenVINO fp32"] = lambda: openvino(image)
    if preset != "regular":
        def peer():
            with torchvision_deform_conv():
                return model([image])
        runs["torchvision dconv fp32"] = peer
    return runs


@torch.no_grad()
def time_round_robin(runs: Dict[str, Callable], repeats: int) -> Dict[str, float]:
    for fn in runs.values():  # warm-up (one-off allocations, oneDNN primitive creation)
        fn()
    best = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@torch.no_grad()
def op_bf16_row(repeats: int) -> str:
    """One modulated 3x3 layer at R-50 c4's 800 px size: does our kernel gain from bfloat16?"""
    C, H, W = 256, 50, 84
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, H, W, generator=g)
    off = torch.randn(1, 18, H, W, generator=g)
    mask = torch.rand(1, 9, H, W, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g) * 0.02
    xb, offb, maskb, wb = x.bfloat16(), off.bfloat16(), mask.bfloat16(), w.bfloat16()
    runs = {
        "ours fp32": lambda: dcnv2.ops.deform_conv2d(x, off, w, None, 1, 1, 1, mask),
        "ours bf16": lambda: dcnv2.ops.deform_conv2d(xb, offb, wb, None, 1, 1, 1, maskb),
        "dense conv fp32": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1),
        "dense conv bf16": lambda: torch.nn.functional.conv2d(xb, wb, None, 1, 1),
    }
    t = time_round_robin(runs, repeats)
    base = t["ours fp32"]
    return " | ".join(f"{k} {1e3 * v:.1f} ms ({v / base:.2f}x)" for k, v in t.items())


def latency_table(kinds: List[str], repeats: int, eager_only: bool = False) -> List[str]:
    lines = ["| model | preset | variant | ms / image | vs our fp32 eager | vs regular fp32 eager |",
             "|---|---|---|---|---|---|"]
    for kind in kinds:
        if eager_only:  # both detectors in one round-robin, so a noisy neighbour hits them alike
            runs = {}
            for preset in PRESETS:
                model, image = build(kind, preset)
                runs[preset] = (lambda m, x: lambda: m([x]))(model, image)
            t = time_round_robin(runs, repeats)
            for preset, v in t.items():
                lines.append(f"| {kind} | {preset} | eager fp32 | {1e3 * v:.0f} | 1.00 | {v / t['regular']:.2f} |")
                print(lines[-1], flush=True)
            continue
        base_regular = None
        for preset in PRESETS:
            print(f"{kind} {preset}: building and exporting", flush=True)
            model, image = build(kind, preset)
            t = time_round_robin(variants(model, image, preset, eager_only), repeats)
            ours = t["eager fp32"]
            base_regular = base_regular or ours
            for name, v in t.items():
                line = (f"| {kind} | {preset} | {name} | {1e3 * v:.0f} | {v / ours:.2f} | {v / base_regular:.2f} |")
                lines.append(line)
                print(line, flush=True)
    return lines


def ap_table(checkpoint: str, data: str, images: int) -> List[str]:
    """float32 vs bfloat16 vs ONNX Runtime vs OpenVINO AP of a trained demo checkpoint on the synthetic validation
    split (its images are all ``min_size`` square: the OpenVINO IR's fixed input)."""
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.engine.evaluate import evaluate
    from dcnv2.engine.predict import load_model

    model, spec = load_model(checkpoint)
    val = load_dataset(data, "val", train=False, with_masks=False)
    if images and images < len(val):
        val.ids = list(val.ids)[:images]
    size = int(spec.min_size)
    session = onnx_session(export_onnx(ExportableDetector(model), image_size=(size, size), dynamic=True),
                           threads=torch.get_num_threads())
    runners = {"eager fp32": model, "eager bf16 (autocast)": Bfloat16Detector(model),
               "ONNX Runtime fp32": ExportedDetector(lambda x: run_onnx(session, x), model.transform)}
    openvino = openvino_runner(model, (size, size))
    if openvino is not None:
        runners["OpenVINO fp32"] = ExportedDetector(openvino, model.transform)
    lines = [f"AP on {len(val)} synthetic validation images ({spec.preset}, {checkpoint}):",
             "| variant | AP | AP50 | AP75 | s / image | fp32 detections (score >= 0.05) found again |",
             "|---|---|---|---|---|---|"]
    reference = None
    for name, runner in runners.items():
        t0 = time.perf_counter()
        result = evaluate(runner, val, progress=False)
        m = result["metrics"]["bbox"]
        dt = (time.perf_counter() - t0) / len(val)
        reference = reference or result["results"]
        agree = agreement(reference, result["results"])
        lines.append(f"| {name} | {100 * m['AP']:.1f} | {100 * m['AP50']:.1f} | {100 * m['AP75']:.1f} | {dt:.3f} "
                     f"| {agree} |")
        print(lines[-1], flush=True)
    return lines


def agreement(reference, results, min_score: float = 0.05, min_iou: float = 0.9) -> str:
    """Share of the reference's detections (COCO results) that ``results`` repeats: same image and category,
    IoU >= ``min_iou``; and the largest score difference among those. Independent of how good the model is."""
    from torchvision.ops import box_iou

    def by_image(res):
        out = {}
        for r in res:
            out.setdefault((r["image_id"], r["category_id"]), []).append(r)
        return out

    def xyxy(rs):
        return torch.tensor([[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]]
                             for r in rs]).reshape(-1, 4)

    ref, other = by_image([r for r in reference if r["score"] >= min_score]), by_image(results)
    total = found = 0
    score_diff = 0.0
    for key, rs in ref.items():
        total += len(rs)
        cand = other.get(key, [])
        if not cand:
            continue
        iou = box_iou(xyxy(rs), xyxy(cand))
        best, idx = iou.max(dim=1)
        for r, b, j in zip(rs, best.tolist(), idx.tolist()):
            if b >= min_iou:
                found += 1
                score_diff = max(score_diff, abs(r["score"] - cand[j]["score"]))
    return f"{found}/{total} ({100 * found / max(total, 1):.1f}%), max score diff {score_diff:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("paper", "demo"), default=["demo", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo-checkpoint", default=None, help="a trained demo checkpoint: adds the AP comparison")
    p.add_argument("--data", default="outputs/demo/data", help="synthetic data set of the demo (val split)")
    p.add_argument("--ap-images", type=int, default=0, help="validation images for AP (0: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for PyTorch, ONNX Runtime and OpenVINO alike (default: PyTorch's). On a machine shared with "
                        "other jobs, 1 avoids timing the stalls of a multi-threaded op waiting for a descheduled "
                        "thread")
    p.add_argument("--no-op-row", action="store_true", help="skip the single-layer bfloat16 row")
    p.add_argument("--no-latency", action="store_true", help="only the AP comparison (needs --demo-checkpoint)")
    p.add_argument("--eager-only", action="store_true",
                   help="latency of our float32 eager detectors only (regular vs deformable; no exports)")
    p.add_argument("--packed-weights", action="store_true",
                   help="time the eager detectors inside dcnv2.ops.packed_weights() (each deformable layer's "
                        "weight packed once)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    out = []
    if not args.no_op_row and not args.no_latency:
        out.append("deform_conv2d 256->256 3x3 at 50x84 (R-50 c4, 800 px): " + op_bf16_row(max(args.repeats, 5)))
        print(out[-1], flush=True)
    if not args.no_latency:
        with dcnv2.ops.packed_weights() if args.packed_weights else contextlib.nullcontext():
            out += latency_table(args.models, args.repeats, args.eager_only)
    if args.demo_checkpoint:
        out += ap_table(args.demo_checkpoint, args.data, args.ap_images)
    print("\n".join(["", *out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
