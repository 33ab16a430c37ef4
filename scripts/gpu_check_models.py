"""Model-level part of scripts/gpu_check.sh: train steps with AMP, torch.compile, CUDA vs CPU on random layers.

    python scripts/gpu_check_models.py --out OUT/models.json [--dry-run]

Each check is a row ``{"check", "ok", "seconds", "detail"}`` of the JSON file, written as soon as it finishes
(a check that fails or times out leaves the others). ``--dry-run`` runs every check on the CPU at tiny sizes
(bfloat16 autocast instead of float16): it rehearses the script, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    import torch

    import dcnv2
    from dcnv2.models import faster_rcnn

    dry = args.dry_run or not torch.cuda.is_available()
    dev = "cpu" if dry else "cuda"
    size = 64 if dry else 800
    steps = 2 if dry else args.steps
    rows = []

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as exc:  # noqa: BLE001 - every check reports, none stops the others
            detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
            ok = False
        rows.append({"check": name, "ok": ok, "seconds": round(time.perf_counter() - t0, 2), "detail": detail})
        with open(args.out, "w") as f:
            json.dump({"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({rows[-1]['seconds']} s): {str(detail).splitlines()[0][:160]}",
              flush=True)

    def train_steps(preset):
        def run():
            torch.manual_seed(0)
            extra = dict(mimic=dict(patch_size=32, rois_per_image=4)) if dry and preset == "dcnv2" else {}
            model = faster_rcnn(preset=preset, backbone="resnet18" if dry else "resnet50", num_classes=3,
                                min_size=size, max_size=size, **extra).to(dev).train()
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
            amp_dtype = torch.bfloat16 if dry else torch.float16
            scaler = torch.amp.GradScaler(dev, enabled=not dry)
            losses, t_step = [], []
            for i in range(steps):
                images = [torch.rand(3, size, size, device=dev) for _ in range(2)]
                targets = [{"boxes": torch.tensor([[10.0, 12.0, size * 0.5, size * 0.6]], device=dev),
                            "labels": torch.tensor([1], device=dev)} for _ in images]
                t0 = time.perf_counter()
                with torch.autocast(dev, dtype=amp_dtype):
                    loss = sum(model(images, targets).values())
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if dev == "cuda":
                    torch.cuda.synchronize()
                t_step.append(time.perf_counter() - t0)
                losses.append(float(loss.detach()))
            if not all(torch.isfinite(torch.tensor(losses))):
                raise RuntimeError(f"non-finite losses {losses}")
            return f"{steps} AMP steps at {size} px, losses {[round(v, 3) for v in losses]}, " \
                   f"last step {1e3 * t_step[-1]:.0f} ms"
        return run

    def compiled_layer():
        layer = dcnv2.nn.ModulatedDeformConv2d(16, 16, 3, padding=1).to(dev)
        with torch.no_grad():
            layer.conv_offset.weight.normal_(0, 0.1)
        x = torch.randn(2, 16, 24, 24, device=dev, requires_grad=True)
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        compiled.sum().backward()
        return f"torch.compile(fullgraph=True) forward == eager (max diff {float((compiled - eager).detach().abs().max()):.1e})"

    def cuda_vs_cpu():
        if dev == "cpu":
            return "dry run: no second device to compare with (the CUDA tests' reference checks cover the op)"
        worst = 0.0
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            C, H, W = [int(v) for v in torch.randint(4, 40, (3,), generator=g)]
            layer = dcnv2.nn.ModulatedDeformConv2d(C, C, 3, padding=1)
            with torch.no_grad():
                layer.conv_offset.weight.normal_(0, 0.3, generator=g)
            x = torch.randn(2, C, H, W, generator=g, requires_grad=True)
            out_cpu = layer(x)
            out_cpu.sum().backward()
            grads_cpu = [x.grad] + [q.grad for q in layer.parameters()]
            layer_gpu = layer.cuda()
            layer_gpu.zero_grad()
            xg = x.detach().cuda().requires_grad_()
            out_gpu = layer_gpu(xg)
            out_gpu.sum().backward()
            grads_gpu = [xg.grad] + [q.grad for q in layer_gpu.parameters()]
            for a, b in zip([out_cpu] + grads_cpu, [out_gpu] + grads_gpu):
                err = float((a - b.cpu()).abs().max() / (a.abs().max() + 1e-6))
                worst = max(worst, err)
        if worst > 1e-3:
            raise RuntimeError(f"CUDA and CPU differ by {worst:.2e} (relative to the largest value)")
        return f"5 random layers, outputs and all gradients: max relative difference {worst:.1e}"

    record("train mdconv-c3c5-mdpool (AMP)", train_steps("mdconv-c3c5-mdpool"))
    record("train dcnv2 mimicking (AMP)", train_steps("dcnv2"))
    record("torch.compile DCNv2 layer", compiled_layer)
    record("CUDA vs CPU random layers", cuda_vs_cpu)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
