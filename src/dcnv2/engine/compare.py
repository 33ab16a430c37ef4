"""Train several presets with one shared schedule fitted to a time budget, then COCO-evaluate each.

Used by ``dcnv2 demo`` (regular vs DCNv2) and ``benchmarks/ablation.py`` (every preset).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from dcnv2.engine.config import build_model
from dcnv2.engine.evaluate import evaluate
from dcnv2.engine.pretrain import pretrain_backbone
from dcnv2.engine.recipes import SyntheticRecipe, plan_iterations, seconds_per_image_eval, seconds_per_iteration
from dcnv2.engine.train import ResumableBatchSampler, train
from dcnv2.models.flops import count_parameters
from dcnv2.models.transfer import load_backbone_checkpoint

__all__ = ["compare_presets"]


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def compare_presets(presets: Sequence[str], train_set, val_set, out_dir, *, recipe: SyntheticRecipe,
                    budget_s: float, iters: Optional[int] = None, seed: int = 0, progress: bool = True,
                    log: Callable[[str], None] = print, collate_fn=None) -> Dict[str, Dict[str, Any]]:
    """Trains every preset and evaluates each on ``val_set``.

    With ``iters``, every preset trains exactly that many iterations. Without, the run fits ``budget_s``
    (training + evaluation of all of them): a speed probe makes the first plan (the same iteration count
    for every preset), then each preset trains on its share of the time left with a re-planning schedule
    (:class:`dcnv2.engine.timekeeping.IterationPlanner`), so a machine that turns faster or slower than
    probed changes the iteration counts (reported as planned vs ran), not the end time.

    Returns:
        ``{preset: {"metrics", "sec_per_iter", "iterations", "planned_iterations", "train_s", "eval_s",
        "run_dir", "params", "predictions"}}`` (``predictions``: a few ``(image, prediction)`` pairs for drawing).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    specs, models, spi, spe = {}, {}, {}, {}
    log(f"measuring speed on this machine ({torch.get_num_threads()} threads) ...")
    for preset in presets:
        torch.manual_seed(seed)
        specs[preset] = recipe.model_spec(preset, train_set)
        models[preset] = build_model(specs[preset])
        spi[preset] = seconds_per_iteration(models[preset], train_set, recipe.batch_size)
        spe[preset] = seconds_per_image_eval(models[preset], val_set)
        log(f"  {preset:>22}: {spi[preset]:.2f} s / training iteration (batch {recipe.batch_size}), "
            f"{1e3 * spe[preset]:.0f} ms / test image")
    eval_est = {p: spe[p] * len(val_set) * 1.15 + 5 for p in presets}  # + COCOeval, checkpoints
    ipe = ResumableBatchSampler.batches_per_epoch(len(train_set), recipe.batch_size, 1)
    timed = iters is None
    if timed:
        left = budget_s - (time.perf_counter() - t_start) - sum(eval_est.values())
        iters = plan_iterations(left * (1 - recipe.pretrain_fraction), list(spi.values()), minimum=20)
        if recipe.pretrain_fraction > 0:
            log(f"plan: {100 * recipe.pretrain_fraction:.0f}% of each model's training time pre-trains its "
                "backbone on object crops, the rest trains the detector")
        log(f"plan: {iters} detector iterations per model x batch {recipe.batch_size} = "
            f"{iters * recipe.batch_size / len(train_set):.1f} epochs of {len(train_set)} images; "
            f"~{_fmt_s(iters * sum(spi.values()))} training + ~{_fmt_s(sum(eval_est.values()))} evaluation. "
            "Each model re-plans as it trains, to end on time whatever the machine's speed does")
    else:
        log(f"schedule: {iters} iterations per model x batch {recipe.batch_size} = "
            f"{iters * recipe.batch_size / len(train_set):.1f} epochs of {len(train_set)} images; "
            f"expected ~{_fmt_s(iters * sum(spi.values()))} training + ~{_fmt_s(sum(eval_est.values()))} evaluation")

    results: Dict[str, Dict[str, Any]] = {}
    eval_ratio = 1.0  # measured / estimated evaluation time, carried from the models already evaluated
    for k, preset in enumerate(presets):
        run_dir = out_dir / preset
        overrides: Dict[str, Any] = dict(seed=seed, progress=progress)
        planned = iters
        t_model = time.perf_counter()
        share = None
        if timed:
            # this model's share of the training time left, in proportion to its speed (equal iterations
            # when the machine keeps its speed); the last model absorbs what the earlier ones over/underran
            rest = presets[k:]
            left = budget_s - (time.perf_counter() - t_start) - eval_ratio * sum(eval_est[p] for p in rest)
            share = max(1.0, left * spi[preset] / sum(spi[p] for p in rest))
        pretrain = None
        if (recipe.pretrain_fraction > 0) if timed else (recipe.pretrain_iters > 0):
            pre_budget = share * recipe.pretrain_fraction if timed else None
            pre_iters = max(10, int(pre_budget / spi[preset])) if timed else recipe.pretrain_iters
            log(f"{preset}: pre-training its backbone on object crops "
                + (f"for ~{_fmt_s(pre_budget)}" if timed else f"for {pre_iters} iterations"))
            torch.manual_seed(seed)
            pretrain = pretrain_backbone(preset, train_set, run_dir / "pretrain", backbone=recipe.backbone,
                                         val_set=val_set, iterations=pre_iters, time_budget_s=pre_budget,
                                         crop_size=recipe.pretrain_crop_size, batch_size=recipe.pretrain_batch_size,
                                         lr=recipe.pretrain_lr, seed=seed, progress=progress)
            load_backbone_checkpoint(models[preset], pretrain["checkpoint"], offsets="pretrained")
            note = (f"planned {pretrain['planned_iterations']} iterations, ran {pretrain['iterations']}; "
                    if timed else "")
            log(f"{preset}: crop classifier top-1 {100 * pretrain['accuracy']:.1f}% on the validation objects "
                f"({note}{_fmt_s(time.perf_counter() - t_model)}); its trunk, offsets included, initialises "
                "the detector")
        if timed:
            share -= time.perf_counter() - t_model
            planned = max(1, int(share / spi[preset]))
            overrides["time_budget_s"] = max(1.0, share)
        config = recipe.train_config(str(run_dir), planned, ipe, **overrides)
        model = models[preset]
        t0 = time.perf_counter()
        run = train(model, train_set, config, model_spec=specs[preset], collate_fn=collate_fn)
        t1 = time.perf_counter()
        ran = int(run["iteration"])
        ev = evaluate(model, val_set, label_to_category_id=specs[preset].label_to_category_id,
                      progress=progress, out_dir=run_dir / "eval_val", keep_predictions=16)
        t2 = time.perf_counter()
        eval_ratio = max(0.5, (t2 - t1) / eval_est[preset])
        results[preset] = {
            "metrics": ev["metrics"], "sec_per_iter": (t1 - t0) / max(1, ran), "iterations": ran,
            "planned_iterations": planned, "pretrain": None if pretrain is None else {
                k: (str(v) if k == "checkpoint" else v) for k, v in pretrain.items()},
            "pretrain_s": t0 - t_model, "train_s": t1 - t0, "eval_s": t2 - t1, "run_dir": str(run_dir),
            "params": count_parameters(model), "predictions": ev["predictions"],
        }
        bbox = ev["metrics"]["bbox"]
        plan_note = f"planned {planned} iterations, ran {ran}; " if timed else ""
        log(f"{preset}: AP {100 * bbox['AP']:.1f}, AP50 {100 * bbox['AP50']:.1f} "
            f"({plan_note}trained in {_fmt_s(t1 - t0)}, evaluated in {_fmt_s(t2 - t1)})")
    summary = {p: {k: v for k, v in r.items() if k != "predictions"} for p, r in results.items()}
    (out_dir / "summary.json").write_text(json.dumps({"recipe": recipe.to_dict(), "results": summary}, indent=2))
    return results
