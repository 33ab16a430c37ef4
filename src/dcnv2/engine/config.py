"""Training configuration; the model description stored in every checkpoint (:class:`ModelSpec`, re-exported
here) lives with the models in :mod:`dcnv2.models.spec`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from dcnv2.models.spec import ModelSpec, build_model

__all__ = ["TrainConfig", "ModelSpec", "build_model"]


@dataclass
class TrainConfig:
    """Everything the training loop needs besides the model and the data.

    The schedule is counted in iterations: ``epochs`` (may be fractional) × iterations per epoch, or
    ``max_iters`` when given; ``lr_steps`` are epochs (also fractional) where the lr is multiplied by
    ``gamma`` (``lr_schedule="step"``), or the lr follows a cosine from 1 to ``min_lr_factor`` over the
    schedule (``"cosine"``). Defaults follow the paper's recipe (SGD 0.02 for 16 images, ×0.1 at epochs 10
    and 14 of 16).

    ``time_budget_s`` turns the iteration count into a first estimate: training re-plans the number of
    iterations as it goes so that it ends within the budget, and the schedule (warm-up aside) stretches or
    shrinks with it - lr steps and the cosine stay at the same fraction of the run. With
    ``time_budget_shortens_only`` the iteration count is the schedule and the budget only a safety net: a
    machine too slow for it stops early (the schedule shrinking as above), a fast one runs it as given.
    """

    out: str = "runs/train"
    epochs: float = 16.0
    max_iters: Optional[int] = None
    batch_size: int = 2                      # images per process
    lr: float = 0.02
    optimizer: str = "sgd"                   # "sgd" (the paper's) or "adamw" (short from-scratch runs)
    momentum: float = 0.9                    # SGD momentum; AdamW's beta1
    weight_decay: float = 1e-4
    offset_lr_mult: float = 0.1              # offset / modulation branches (paper: 0.1x)
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3           # lr multiplier at iteration 0, rising linearly to 1
    lr_steps: Tuple[float, ...] = (10.0, 14.0)
    gamma: float = 0.1
    lr_schedule: str = "step"                # "step" (lr_steps, gamma) or "cosine" (to min_lr_factor)
    min_lr_factor: float = 0.0               # cosine: lr multiplier at the end of the schedule
    time_budget_s: Optional[float] = None    # wall-clock budget of the training loop; re-plans iterations
    time_budget_shortens_only: bool = False  # the budget may cut the schedule short, never lengthen it
    amp: bool = False                        # autocast: bfloat16 on CPU, float16 (+ GradScaler) on CUDA
    clip_grad_norm: Optional[float] = None
    checkpoint_every: int = 1000             # iterations; a checkpoint is also written at the end
    log_every: int = 20
    seed: int = 0
    num_workers: int = 2
    device: Optional[str] = None             # default: cuda:LOCAL_RANK if available, else cpu
    progress: bool = True                    # tqdm bar on rank 0
    tensorboard: bool = True                 # scalars to OUT/tb/ too, when tensorboard is installed (rank 0)
    find_unused_parameters: bool = False     # DDP option for models with conditionally used branches

    def __post_init__(self) -> None:
        self.lr_steps = tuple(float(s) for s in self.lr_steps)
        checks = [
            ("epochs", self.epochs, self.epochs > 0 if self.max_iters is None else self.epochs >= 0),
            ("batch_size", self.batch_size, self.batch_size >= 1),
            ("lr", self.lr, self.lr > 0),
            ("momentum", self.momentum, 0 <= self.momentum < 1),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0),
            ("offset_lr_mult", self.offset_lr_mult, self.offset_lr_mult >= 0),
            ("warmup_iters", self.warmup_iters, self.warmup_iters >= 0),
            ("warmup_factor", self.warmup_factor, 0 < self.warmup_factor <= 1),
            ("gamma", self.gamma, self.gamma > 0),
            ("checkpoint_every", self.checkpoint_every, self.checkpoint_every >= 1),
            ("log_every", self.log_every, self.log_every >= 1),
            ("num_workers", self.num_workers, self.num_workers >= 0),
        ]
        if self.lr_schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {self.lr_schedule!r}")
        checks.append(("min_lr_factor", self.min_lr_factor, 0 <= self.min_lr_factor <= 1))
        if self.time_budget_s is not None:
            checks.append(("time_budget_s", self.time_budget_s, self.time_budget_s > 0))
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.max_iters is not None:
            checks.append(("max_iters", self.max_iters, self.max_iters >= 1))
        if self.clip_grad_norm is not None:
            checks.append(("clip_grad_norm", self.clip_grad_norm, self.clip_grad_norm > 0))
        for name, value, ok in checks:
            if not ok:  # positive-form checks: NaN fails them
                raise ValueError(f"TrainConfig.{name}: invalid value {value!r}")
        if any(not s >= 0 for s in self.lr_steps):
            raise ValueError(f"TrainConfig.lr_steps must be non-negative epochs, got {self.lr_steps!r}")

    def total_iters(self, iters_per_epoch: int) -> int:
        if self.max_iters is not None:
            return int(self.max_iters)
        return max(1, int(math.ceil(self.epochs * iters_per_epoch)))

    def step_iters(self, iters_per_epoch: int, total: Optional[int] = None) -> List[int]:
        """Iterations where the lr decays; with ``total`` (a re-planned schedule length) the steps move with
        it, staying at the same fraction of the schedule."""
        scale = 1.0 if total is None else total / self.total_iters(iters_per_epoch)
        return sorted(int(round(s * iters_per_epoch * scale)) for s in self.lr_steps)

    def lr_factor(self, it: int, iters_per_epoch: int, total: Optional[int] = None) -> float:
        """Multiplier of every group's initial lr at iteration ``it`` (0-based): warm-up × step decay or
        cosine. ``total``: the schedule's length when re-planned (default: :meth:`total_iters`)."""
        factor = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor = self.warmup_factor * (1 - alpha) + alpha
        if self.lr_schedule == "cosine":
            n = self.total_iters(iters_per_epoch) if total is None else total
            span = max(1, n - self.warmup_iters)
            progress = min(1.0, max(0.0, (it - self.warmup_iters) / span))
            return factor * (self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress)))
        decays = sum(1 for s in self.step_iters(iters_per_epoch, total) if it >= s)
        return factor * self.gamma ** decays

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
