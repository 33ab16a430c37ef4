"""The training loop: SGD with warm-up and step decay, AMP, clipping, atomic checkpoints, exact resume,
NaN guard and data-parallel training under ``torchrun``.

Exact resume rests on three things: (1) the data order of epoch ``e`` is a pure function of
``(seed, e, rank, world size)`` (a :class:`~torch.utils.data.DistributedSampler` re-seeded per epoch), and a
resumed run skips the batches of the current epoch it already consumed; (2) every sample's augmentation
runs under an RNG seeded from ``(seed, epoch, index)``, so it does not depend on worker processes or on
where the run was interrupted; (3) the checkpoint stores the model, optimizer, scheduler, grad scaler, the
iteration and every rank's RNG state (the RPN/RoI samplers draw from the global torch RNG).
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, DataLoader, DistributedSampler, Sampler

from dcnv2.engine import distributed as D
from dcnv2.engine.checkpoint import CHECKPOINT_FORMAT, get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from dcnv2.engine.config import ModelSpec, TrainConfig
from dcnv2.engine.tensorboard import TB_DIR, TensorBoardLog
from dcnv2.engine.timekeeping import IterationPlanner

__all__ = ["train", "NonFiniteLossError", "DataLoadingError", "exception_message", "SeededSamples",
           "ResumableBatchSampler", "build_optimizer", "LAST_CHECKPOINT", "FINAL_MODEL", "LOG_FILE"]

LAST_CHECKPOINT = "checkpoint_last.pth"
FINAL_MODEL = "model_final.pth"
LOG_FILE = "log.jsonl"
# losses shown in the progress bar beside the total, when the model reports them (feature mimicking)
_BAR_LOSSES = ("loss_mimic", "loss_rcnn_cls")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; ``iteration`` is the 1-based iteration that produced it."""

    def __init__(self, iteration: int, losses: Dict[str, float], checkpoint: Optional[Path]):
        self.iteration = iteration
        self.losses = losses
        self.checkpoint = checkpoint
        kept = f"; last good checkpoint: {checkpoint}" if checkpoint else "; no checkpoint had been written yet"
        detail = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at iteration {iteration} ({detail}){kept}")


class DataLoadingError(RuntimeError):
    """A sample could not be loaded during training (a file corrupted or changed on disk after the data
    check); the message names the file and the checkpoint the run can resume from."""

    def __init__(self, iteration: int, cause: BaseException, checkpoint: Optional[Path]):
        self.iteration = iteration
        self.checkpoint = checkpoint
        kept = (f"the last checkpoint is {checkpoint}: fix or remove the file, then rerun with --resume"
                if checkpoint else "no checkpoint had been written yet")
        super().__init__(f"{exception_message(cause)} (training stopped before iteration {iteration + 1}; {kept})")


def exception_message(exc: BaseException) -> str:
    """The message of ``exc`` without the traceback text that a DataLoader worker wraps around it."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, rest = last.partition(": ")
        return rest if sep and "Error" in name.split(".")[-1] else last
    return text


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (((int(seed) * 1_000_003) + int(epoch)) * 10_000_019 + int(index)) % (2 ** 63 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is produced under torch/numpy/python RNGs seeded
    with ``seed`` (and the caller's RNG states are left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableBatchSampler(Sampler):
    """Batches of ``(index, sample seed)`` for one epoch of one rank, starting at batch ``start``.

    The order comes from :class:`DistributedSampler` (shuffled with ``seed + epoch``, padded so every rank
    gets the same number of samples); the last batch of an epoch wraps around to stay full.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.sampler.set_epoch(epoch)
        self.batch_size, self.seed, self.epoch, self.start = batch_size, seed, epoch, start

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
        return max(1, math.ceil(math.ceil(num_samples / world_size) / batch_size))

    def __len__(self) -> int:
        return max(0, math.ceil(len(self.sampler) / self.batch_size) - self.start)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        indices = list(self.sampler)
        n_batches = math.ceil(len(indices) / self.batch_size)
        indices = indices + indices[: n_batches * self.batch_size - len(indices)]
        for b in range(self.start, n_batches):
            chunk = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


def _collate(batch):
    return tuple(zip(*batch))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (or AdamW, ``config.optimizer``) over :func:`dcnv2.nn.param_groups`: offset/mask branches at
    ``offset_lr_mult`` × lr."""
    from dcnv2.nn import param_groups

    groups = param_groups(model, config.lr, offset_lr_mult=config.offset_lr_mult, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999),
                                 weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


class _JsonLog:
    """JSON-lines log, rank 0 only; on resume the records past the resumed iteration are dropped."""

    def __init__(self, path: Path, start_iter: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if start_iter > 0 and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("iter", 0) <= start_iter:
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
        elif start_iter == 0:
            path.write_text("")

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _checkpoint_state(model, optimizer, scheduler, scaler, config, spec, iteration, iters_per_epoch):
    rng = D.all_gather_object(get_rng_state())  # every rank's RPN/RoI sampler state
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_spec": spec.to_dict() if spec is not None else None,
        "train_config": config.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "iters_per_epoch": iters_per_epoch,
        "world_size": D.get_world_size(),
        "rng": rng,
    }


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    *,
    model_spec: Optional[ModelSpec] = None,
    resume: Union[bool, str, Path, None] = None,
    collate_fn: Optional[Callable] = None,
    time_tail: Optional[Callable[[float], float]] = None,
) -> Dict[str, Any]:
    """Trains a torchvision-style detector (``model(images, targets) -> dict of losses``).

    Args:
        model: the detector, on CPU; moved to ``config.device``.
        dataset: yields ``(image [3,H,W], target dict)``.
        config: schedule, optimizer and I/O settings; ``config.out`` is the run directory.
        model_spec: stored in every checkpoint so ``eval``/``predict`` can rebuild the model.
        resume: True to continue from ``out/checkpoint_last.pth``, or a checkpoint path.
        collate_fn: batches a list of samples into ``(images, targets)``; default ``tuple(zip(*batch))``.
        time_tail: with ``config.time_budget_s``: seconds of the budget kept for work after training (an
            evaluation), as a function of the measured seconds per iteration (see ``IterationPlanner``).

    Returns:
        ``{"iteration", "planned_iterations", "stopped_early", "loss", "checkpoint", "final_model", "log",
        "tensorboard"}`` (paths are None on ranks > 0, ``tensorboard`` also when no events were written;
        ``stopped_early``: a ``time_budget_shortens_only`` run that its budget cut short).

    Raises:
        NonFiniteLossError: a loss was NaN/inf (all ranks raise; the last good checkpoint is kept).
    """
    device = torch.device(config.device) if config.device else D.default_device()
    if device.type == "cuda" and device.index is None:  # "cuda" under torchrun: this process's local GPU
        device = D.default_device()
    distributed = D.init_distributed(device=device)
    rank, world = D.get_rank(), D.get_world_size()
    main = rank == 0
    out = Path(config.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"train": config.to_dict(), "model": model_spec.to_dict() if model_spec else None,
             "world_size": world}, indent=2))
    if len(dataset) == 0:
        raise ValueError("train: the dataset is empty")

    torch.manual_seed(config.seed + rank)
    random.seed(config.seed + rank)
    np.random.seed((config.seed + rank) % 2 ** 32)

    model.to(device)
    model.train()
    optimizer = build_optimizer(model, config)
    iters_per_epoch = ResumableBatchSampler.batches_per_epoch(len(dataset), config.batch_size, world)
    total = config.total_iters(iters_per_epoch)
    planner: Optional[IterationPlanner] = None  # set below when the run has a time budget
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: config.lr_factor(it, iters_per_epoch, total=planner.total if planner else None))
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    start = 0
    ckpt_path = out / LAST_CHECKPOINT
    last_good: Optional[Path] = None
    if resume:
        path = ckpt_path if resume is True else Path(resume)
        state = load_checkpoint(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        if state.get("iters_per_epoch") != iters_per_epoch or state.get("world_size") != world:
            warnings.warn(f"resuming {path} with a different data layout (iterations per epoch "
                          f"{state.get('iters_per_epoch')} -> {iters_per_epoch}, world size "
                          f"{state.get('world_size')} -> {world}): the data order will not match the "
                          "original run", stacklevel=2)
        rng = state.get("rng") or []
        if rank < len(rng):
            set_rng_state(rng[rank])
        last_good = path
        if start >= total:
            warnings.warn(f"{path} is at iteration {start}, the schedule has {total}: nothing to do",
                          stacklevel=2)

    if config.time_budget_s is not None:
        # the plan is made on rank 0's clock and broadcast, so every rank runs the same number of steps
        planner = IterationPlanner(config.time_budget_s, max(total, start + 1), start=start, min_iters=start + 1,
                                   tail=time_tail,
                                   cap=max(total, start + 1) if config.time_budget_shortens_only else None)
        planned = total
    else:
        planned = total

    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters)

    log = _JsonLog(out / LOG_FILE, start, main)
    # events past the resumed iteration (an interrupted run's) are purged, as log.jsonl drops those records
    tb = TensorBoardLog(out / TB_DIR, enabled=main and config.tensorboard, purge_step=start + 1 if start else None)
    tb_dir = tb.log_dir if tb.active else None
    samples = SeededSamples(dataset)
    collate = collate_fn or _collate
    bar = None
    if main and config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start, desc=f"train {out.name}", unit="it", dynamic_ncols=True,
                   mininterval=0.5)

    it = start
    loss_value = float("nan")
    t_start, it_at_start = time.perf_counter(), start
    try:
        while it < total:
            epoch, first_batch = divmod(it, iters_per_epoch)
            batch_sampler = ResumableBatchSampler(len(dataset), config.batch_size, seed=config.seed, epoch=epoch,
                                                  start=first_batch, rank=rank, world_size=world)
            # an own generator: creating the loader's iterator must not draw from the global RNG, or a run
            # resumed mid-epoch would shift the RPN/RoI samplers' random stream
            loader = DataLoader(samples, batch_sampler=batch_sampler, collate_fn=collate,
                                num_workers=config.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(sample_seed(config.seed, epoch, -1 - rank)))
            batches = iter(loader)
            while it < total:
                try:
                    images, targets = next(batches)
                except StopIteration:
                    break
                except (OSError, RuntimeError, ValueError) as exc:  # a file that broke after the data check
                    raise DataLoadingError(it, exc, last_good) from None
                images, targets = _to_device(images, targets, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
                    loss_dict = train_model(images, targets)
                loss = sum(loss_dict.values())
                names = list(loss_dict)
                reduced = D.all_reduce_mean(torch.stack([loss_dict[k].detach().float() for k in names] +
                                                        [loss.detach().float()]))
                values = dict(zip(names + ["loss"], reduced.tolist()))
                if not math.isfinite(values["loss"]):
                    log.write({"iter": it + 1, "event": "non-finite loss", **values})
                    raise NonFiniteLossError(it + 1, values, last_good)

                optimizer.zero_grad(set_to_none=True)
                grad_norm = None
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if config.clip_grad_norm:
                        scaler.unscale_(optimizer)
                        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm))
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if config.clip_grad_norm:
                        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm))
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                it += 1
                if planner is not None:
                    total = D.broadcast_int(planner.step_done(it))
                    if bar is not None and bar.total != total:
                        bar.total = total
                scheduler.step()
                loss_value = values["loss"]

                elapsed = time.perf_counter() - t_start
                sec_per_it = elapsed / max(1, it - it_at_start)
                if bar is not None:
                    shown = {k[5:]: f"{values[k]:.3f}" for k in _BAR_LOSSES if k in values}
                    bar.set_postfix(loss=f"{loss_value:.3f}", **shown, lr=f"{lr:.2g}", refresh=False)
                    bar.update(1)
                if it % config.log_every == 0 or it == total or it == start + 1:
                    extra = {"grad_norm": round(grad_norm, 4)} if grad_norm is not None else {}
                    record = {"iter": it, "epoch": epoch, "lr": lr, **{k: round(v, 6) for k, v in values.items()},
                              **extra, "sec_per_iter": round(sec_per_it, 4), "eta_s": round(sec_per_it * (total - it), 1)}
                    log.write(record)
                    tb.record(record, it)
                if it % config.checkpoint_every == 0 or it == total:
                    state = _checkpoint_state(model, optimizer, scheduler, scaler, config, model_spec, it,
                                              iters_per_epoch)
                    if main:
                        save_checkpoint(state, ckpt_path)
                        last_good = ckpt_path
                    D.barrier()
            del batches, loader
    finally:
        if bar is not None:
            bar.close()
        tb.close()

    # a schedule cut short by its time budget says so in the log (the caller reports it)
    stopped_early = bool(planner is not None and config.time_budget_shortens_only and it < planned)
    if stopped_early:
        log.write({"iter": it, "event": "stopped early by the time budget", "planned": planned, "ran": it})
    final = None
    if main:
        final = out / FINAL_MODEL
        # the inference model: training-only parts (feature mimicking) stay in checkpoint_last.pth only
        inference_state = getattr(model, "inference_state_dict", model.state_dict)()
        save_checkpoint({"format": CHECKPOINT_FORMAT, "model": inference_state,
                         "model_spec": model_spec.to_dict() if model_spec else None,
                         "train_config": config.to_dict(), "iteration": it}, final)
        try:
            from dcnv2.engine.plots import plot_loss_curves
            plot_loss_curves({out.name: out / LOG_FILE}, out / "loss.png")
        except Exception as exc:  # a plot must never fail a finished run
            warnings.warn(f"could not plot the loss curve: {exc}", stacklevel=2)
    D.barrier()
    return {"iteration": it, "planned_iterations": planned, "stopped_early": stopped_early, "loss": loss_value,
            "checkpoint": ckpt_path if main else None,
            "final_model": final, "log": out / LOG_FILE if main else None,
            "tensorboard": tb_dir}
