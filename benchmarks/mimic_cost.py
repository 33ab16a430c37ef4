"""What R-CNN feature mimicking costs a training iteration: the same detector with and without the branch,
timed in turns in one process (best of --repeats each), and the ratio.

    python benchmarks/mimic_cost.py [--cases paper mini] [--repeats 3]

* ``paper``: the paper's R-50 Faster R-CNN (dilated conv5, mdconv c3-c5 + mdpool) on one 800x1333 image,
  512 RoIs sampled from 2000 proposals, 32 patches of 224 px per image (``dcnv2`` vs ``mdconv-c3c5-mdpool``).
* ``mini``: the demo's miniature recipe (ResNet-18-FPN, 128 px, batch 8) with its mimicking settings.

Every image carries enough ground-truth boxes that the head samples at least ``rois_per_image`` positives, so the
branch always runs at its full RoI count: the upper bound of its cost (an image with fewer objects mimics fewer
RoIs). Inference is not timed: the branch does not exist there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _targets(n_images, n_boxes, h, w, gen, num_classes):
    import torch

    out = []
    for _ in range(n_images):
        wh = torch.rand(n_boxes, 2, generator=gen) * 0.3 + 0.05
        xy = torch.rand(n_boxes, 2, generator=gen) * (1 - wh)
        size = torch.tensor([w, h], dtype=torch.float32)
        boxes = torch.cat([xy * size, (xy + wh) * size], dim=1)
        labels = torch.randint(1, num_classes, (n_boxes,), generator=gen)
        out.append({"boxes": boxes, "labels": labels})
    return out


def _case(name):
    from dcnv2.experiments.recipes import SyntheticRecipe

    if name == "paper":
        return dict(title="paper R-50 Faster R-CNN, 800x1333, batch 1", batch=1, h=800, w=1333, classes=81,
                    kw=dict(backbone="resnet50", fpn=False, min_size=800, max_size=1333), boxes=48)
    recipe = SyntheticRecipe()
    kw = dict(recipe.model_kwargs)
    kw.update(backbone=recipe.backbone, fpn=recipe.fpn, min_size=recipe.image_size, max_size=recipe.image_size)
    return dict(title=f"miniature recipe ({recipe.backbone}-FPN, {recipe.image_size} px, batch {recipe.batch_size}, "
                      f"mimic {kw['mimic']})", batch=recipe.batch_size, h=recipe.image_size, w=recipe.image_size,
                classes=13, kw=kw, boxes=12)


def measure(name: str, repeats: int):
    import torch

    from dcnv2 import models

    case = _case(name)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, case["h"], case["w"], generator=gen) for _ in range(case["batch"])]
    targets = _targets(case["batch"], case["boxes"], case["h"], case["w"], gen, case["classes"])
    built = {}
    for preset in ("mdconv-c3c5-mdpool", "dcnv2"):
        torch.manual_seed(0)
        built[preset] = models.faster_rcnn(preset=preset, num_classes=case["classes"], **case["kw"]).train()
    built["dcnv2"].load_state_dict(built["mdconv-c3c5-mdpool"].state_dict(), strict=False)
    opt = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in built.items()}
    best = {k: float("inf") for k in built}
    rois = None
    for r in range(repeats + 1):  # the first round warms up
        for key, model in built.items():
            t0 = time.perf_counter()
            losses = model(images, targets)
            opt[key].zero_grad()
            sum(losses.values()).backward()
            opt[key].step()
            dt = time.perf_counter() - t0
            if r > 0:
                best[key] = min(best[key], dt)
            print(f"  {name} round {r} {key}: {dt:.2f} s", file=sys.stderr, flush=True)
    # how many RoIs the branch mimicked per image in the last step
    mimic = built["dcnv2"].mimic
    rois = min(mimic.config.rois_per_image, case["boxes"])
    return case["title"], best["mdconv-c3c5-mdpool"], best["dcnv2"], mimic.config, rois


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=["paper", "mini"], default=["mini", "paper"])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model (best is kept)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rows = [measure(c, args.repeats) for c in args.cases]
    print(f"\nSeconds per training iteration (forward + backward + SGD step), best of {args.repeats}, "
          f"{torch.get_num_threads()} threads, models taking turns:\n")
    print("| case | mimicked RoIs / image x patch | without mimicking (s) | with (s) | with / without |")
    print("|---|---|---:|---:|---:|")
    for title, base, mimic, cfg, rois in rows:
        print(f"| {title} | {rois} x {cfg.patch_size} px | {base:.2f} | {mimic:.2f} | {mimic / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
