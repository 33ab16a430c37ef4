"""Small-budget training recipes for the synthetic data set (``dcnv2 demo``, ``benchmarks/ablation.py``).

A 2-core CPU trains a from-scratch detector for a few minutes, so the recipe keeps images small (128 px),
the backbone small (ResNet-18 + FPN), proposal/RoI counts low (the RoI heads, not the backbone, dominate a
CPU iteration at this size), and fits the iteration count to a wall-clock budget measured on this machine:
:func:`seconds_per_iteration` times a few real training steps, :func:`plan_iterations` turns the budget into
one schedule shared by every model of a comparison.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from dcnv2.engine.config import ModelSpec, TrainConfig

__all__ = ["SyntheticRecipe", "seconds_per_iteration", "seconds_per_image_eval", "plan_iterations"]


@dataclass
class SyntheticRecipe:
    """Model and optimizer settings tuned for the synthetic set on a small CPU."""

    image_size: int = 128
    backbone: str = "resnet18"
    fpn: bool = True
    arch: str = "faster_rcnn"
    batch_size: int = 8
    # AdamW, not the paper's SGD: from scratch and with ~450 iterations per model, AdamW 5e-4 reached
    # AP50 17.4 where SGD 0.04 reached 11.1 (mdconv-c3c5-mdpool, same data and iterations)
    optimizer: str = "adamw"
    lr: float = 5e-4
    warmup_iters: int = 50
    lr_steps: Sequence[float] = (0.75,)      # fraction of the schedule at which the lr decays ×0.1
    clip_grad_norm: Optional[float] = 10.0   # from-scratch training: tame the first iterations' gradients
    # backbone pre-training on object crops of the training set (dcnv2.experiments.pretrain), offsets included,
    # before the detector trains: `pretrain_fraction` of each model's time when the run is time-budgeted,
    # `pretrain_iters` iterations when the detector's iterations are fixed; 0 = from scratch
    pretrain_fraction: float = 0.0
    pretrain_iters: int = 0
    pretrain_crop_size: int = 48
    pretrain_batch_size: int = 64
    pretrain_lr: float = 2e-3
    model_kwargs: Dict[str, Any] = field(default_factory=lambda: dict(
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
        rpn_batch_size_per_image=128, box_batch_size_per_image=64,
        box_detections_per_img=50,
        # narrow FPN and heads: at 128 px the 12544 -> 1024 fc layers (box head, mdpool branch) cost more
        # than the whole backbone; 128/256 cuts a training step from ~1.5 s to ~0.55 s on 2 cores
        feature_channels=128, representation_size=256, mdpool_hidden=256,
        # objects are 6..106 px (median 30): anchors 8..128 on P2..P6 instead of torchvision's 32..512
        anchor_sizes=(8, 16, 32, 64, 128),
        # and RoIs pooled from P2..P5 by their size relative to these images, not to 800 px ones
        roi_canonical_scale=56,
        # R-CNN feature mimicking (mimic presets only): the paper's 32 patches of 224 px are about 1.5x its
        # ~800x1333 image in backbone pixels; 6 patches of 64 px per 128 px image keep that ratio (1.5x).
        # The whole patch is pooled from P3 (8x8 cells under the 7x7 bins, as the paper's 14x14 conv5 map);
        # the level mapping would pick P4, a 4x4 map
        mimic=dict(patch_size=64, rois_per_image=6, level="1"),
    ))

    def model_spec(self, preset: str, dataset) -> ModelSpec:
        return ModelSpec(arch=self.arch, preset=preset, backbone=self.backbone, fpn=self.fpn,
                         num_classes=dataset.num_classes, class_names=list(dataset.class_names),
                         label_to_category_id=dict(dataset.label_to_category_id),
                         min_size=self.image_size, max_size=self.image_size, kwargs=dict(self.model_kwargs))

    def train_config(self, out: str, iterations: int, iters_per_epoch: int, **overrides) -> TrainConfig:
        steps = tuple(f * iterations / iters_per_epoch for f in self.lr_steps)
        kw = dict(out=out, max_iters=iterations, epochs=0, batch_size=self.batch_size, lr=self.lr,
                  optimizer=self.optimizer,
                  warmup_iters=min(self.warmup_iters, max(1, iterations // 5)), warmup_factor=0.1, lr_steps=steps,
                  clip_grad_norm=self.clip_grad_norm, checkpoint_every=max(50, iterations // 4), log_every=5,
                  num_workers=0)
        kw.update(overrides)
        return TrainConfig(**kw)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _batches(dataset, batch_size: int, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
        images, targets = zip(*(dataset[i] for i in idx))
        yield list(images), list(targets)


def seconds_per_iteration(model: nn.Module, dataset, batch_size: int, *, steps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``steps`` training steps (forward, backward, SGD) of a copy of ``model`` on real
    batches. The median, not the mean: on a shared machine a neighbour's burst can triple one step; not the
    fastest either, which under-estimates a model whose step time varies with its proposals (the training
    loop re-plans from the real step times anyway).

    The copy and its optimizer are thrown away and the global RNG is restored: measuring changes nothing.
    """
    trial = copy.deepcopy(model).train()
    opt = torch.optim.SGD([p for p in trial.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    times: List[float] = []
    with torch.random.fork_rng(devices=[]):
        for i, (images, targets) in enumerate(_batches(dataset, batch_size, warmup + steps)):
            t0 = time.perf_counter()
            loss = sum(trial(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def seconds_per_image_eval(model: nn.Module, dataset, *, images: int = 4) -> float:
    """Mean inference time per image (after one warm-up image)."""
    trial = copy.deepcopy(model).eval()
    n = min(images, len(dataset))
    with torch.random.fork_rng(devices=[]):  # data transforms may draw random numbers
        samples = [dataset[i][0] for i in range(n)]
    trial(samples[:1])
    t0 = time.perf_counter()
    for image in samples:
        trial([image])
    return (time.perf_counter() - t0) / max(1, n)


def plan_iterations(budget_s: float, seconds_per_iter: Sequence[float], *, minimum: int = 20,
                    maximum: Optional[int] = None) -> int:
    """Iterations per model so that training all models one after another fits ``budget_s``."""
    total = sum(seconds_per_iter)
    if not total > 0:
        raise ValueError(f"seconds_per_iter must be positive, got {list(seconds_per_iter)}")
    n = int(budget_s / total)
    if maximum is not None:
        n = min(n, maximum)
    return max(minimum, n)
