"""Seconds per training step of the demo's models, side by side in one process: the crop pre-training step
(batch 64 of 48 px object crops) and the detector step (batch 8 of 128 px images) of `regular` and the
DCNv2 model (`mdconv-c3c5-mdpool`), with the DCNv2 / regular ratio of each phase.

The steps run interleaved (one step of each configuration per round) so a machine whose speed drifts
slows all of them alike; the table shows each configuration's median and fastest round.
``--torchvision-roialign`` adds the regular detector with torchvision's RoIAlign (the pooler before it ran
on our kernel), to show that lever in the same run.

    python benchmarks/demo_step.py [--threads 1] [--rounds 8]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--num-train", type=int, default=200, help="synthetic training images to sample from")
    p.add_argument("--torchvision-roialign", action="store_true",
                   help="also time the regular detector with torchvision's roi_align in its pooler")
    args = p.parse_args()

    import os

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from dcnv2.engine.classification import collate_train
    from dcnv2.engine.config import build_model
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.experiments.demo import DEMO_DATA, ensure_synthetic_data
    from dcnv2.experiments.pretrain import ObjectCrops, crop_classifier
    from dcnv2.experiments.recipes import SyntheticRecipe
    from dcnv2.models import poolers

    data_dir = ensure_synthetic_data(Path(tempfile.gettempdir()) / "dcnv2_demo_step_data", seed=0,
                                     num_train=args.num_train, num_val=8, image_size=128,
                                     log=lambda s: print(s, file=sys.stderr), **DEMO_DATA)
    train_set = load_dataset(data_dir, "train", train=True, with_masks=False)
    recipe = SyntheticRecipe()
    crops = ObjectCrops(train_set, size=recipe.pretrain_crop_size, jitter=True)

    def make(preset: str, phase: str, torchvision_align: bool = False):
        torch.manual_seed(0)
        if phase == "detector":
            model = build_model(recipe.model_spec(preset, train_set)).train()
        else:
            model, _ = crop_classifier(preset, recipe.backbone, crops.num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def step():
            if phase == "detector":
                idx = torch.randint(len(train_set), (recipe.batch_size,), generator=g).tolist()
                images, targets = zip(*(train_set[i] for i in idx))
                native = poolers._native_roi_align
                if torchvision_align:
                    poolers._native_roi_align = lambda x: False
                try:
                    loss = sum(model(list(images), list(targets)).values())
                finally:
                    poolers._native_roi_align = native
            else:
                idx = torch.randint(len(crops), (recipe.pretrain_batch_size,), generator=g).tolist()
                images, targets = collate_train([crops[j] for j in idx])
                loss = model(images, targets)["loss_cls"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    configs = {(phase, preset): make(preset, phase) for phase in ("crop", "detector")
               for preset in ("regular", "mdconv-c3c5-mdpool")}
    if args.torchvision_roialign:
        configs[("detector", "regular, torchvision roi_align")] = make("regular", "detector", True)
    times = {k: [] for k in configs}
    for r in range(args.rounds + 2):
        for key, step in configs.items():
            t0 = time.perf_counter()
            step()
            if r >= 2:
                times[key].append(time.perf_counter() - t0)
    print(f"demo training steps, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds "
          f"(median / fastest, seconds per step)\n")
    print("| phase | model | median | fastest | / regular (median) |")
    print("|---|---|---:|---:|---:|")
    for (phase, preset), ts in times.items():
        med = statistics.median(ts)
        base = statistics.median(times[(phase, "regular")])
        print(f"| {phase} | {preset} | {med:.3f} | {min(ts):.3f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
