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
from dcnv2.experiments.pretrain import ObjectCrops, pretrain_backbone, seconds_per_crop_iteration
from dcnv2.experiments.recipes import SyntheticRecipe, plan_iterations, seconds_per_image_eval, seconds_per_iteration
from dcnv2.engine.train import ResumableBatchSampler, train
from dcnv2.models.flops import count_parameters
from dcnv2.models.transfer import load_backbone_checkpoint

__all__ = ["compare_presets"]


def _cached_pretrain(cache: Path, preset: str, recipe: SyntheticRecipe, seed: int, iterations: int) -> Path:
    """The cache directory of ``preset``'s crop pre-training: named by everything that decides its weights
    (the crop classifier's trunk, the crop recipe, the seed, the iteration count and torch's thread count)."""
    from dcnv2.models import get_preset

    det = get_preset(preset)
    stages = "".join(sorted(det.deform_stages))
    kind = ("m" if det.modulated else "") + f"dconv-{stages}-g{det.offset_groups}" if det.deform_stages else "regular"
    name = (f"{recipe.backbone}-{kind}-crop{recipe.pretrain_crop_size}-b{recipe.pretrain_batch_size}-"
            f"lr{recipe.pretrain_lr:g}-it{iterations}-seed{seed}-t{torch.get_num_threads()}")
    return cache / name


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def compare_presets(presets: Sequence[str], train_set, val_set, out_dir, *, recipe: SyntheticRecipe,
                    budget_s: float, iters: Optional[int] = None, seed: int = 0, progress: bool = True,
                    log: Callable[[str], None] = print, collate_fn=None,
                    safety_net: bool = False, pretrain_cache=None) -> Dict[str, Dict[str, Any]]:
    """Trains every preset and evaluates each on ``val_set``.

    With ``iters``, every preset trains exactly that many iterations (and ``recipe.pretrain_iters`` crop
    pre-training iterations): a row is a function of its seed. ``safety_net`` keeps ``budget_s`` as a limit
    on top of that fixed schedule: the same speed probe shares the budget among the phases, and a phase
    whose machine is too slow to finish in its share stops early (reported as ``stopped_early``, the
    phase's lr schedule shrinking with it); a fast machine runs the schedule as given. ``pretrain_cache``
    (a directory, fixed schedules only): presets whose crop classifiers are the same network (same trunk,
    whatever their heads or mimicking) share one crop pre-training per seed and schedule, run once and reused
    - the same weights a rerun would compute. Without ``iters``,
    the run fits ``budget_s``
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
    safety = not timed and safety_net  # a fixed schedule under a time limit
    budgeted = timed or safety          # the phases share budget_s (measured speeds, time_share)
    use_pretrain = (recipe.pretrain_fraction > 0) if timed else (recipe.pretrain_iters > 0)
    crops = val_crops = None
    spc = {p: 0.0 for p in presets}  # seconds per crop-classifier iteration
    pre_iters = 0 if timed else recipe.pretrain_iters
    if use_pretrain:
        crops = ObjectCrops(train_set, size=recipe.pretrain_crop_size, jitter=True)
        val_crops = ObjectCrops(val_set, size=recipe.pretrain_crop_size, jitter=False)
        if budgeted:
            for preset in presets:
                spc[preset] = seconds_per_crop_iteration(preset, crops, backbone=recipe.backbone,
                                                         batch_size=recipe.pretrain_batch_size)
                log(f"  {preset:>22}: {spc[preset]:.2f} s / crop-classifier iteration "
                    f"(batch {recipe.pretrain_batch_size}, {recipe.pretrain_crop_size} px)")
    if timed:
        # one schedule for every model - the same pre-training and detector iteration counts - sized so
        # that all of it fits: pretrain_fraction of the time on crops, the rest on the detectors
        left = budget_s - (time.perf_counter() - t_start) - sum(eval_est.values())
        f = recipe.pretrain_fraction if use_pretrain else 0.0
        if use_pretrain:
            pre_iters = plan_iterations(left * f, list(spc.values()), minimum=10)
            log(f"plan: {pre_iters} crop-classifier iterations per model x batch {recipe.pretrain_batch_size} "
                f"(~{_fmt_s(pre_iters * sum(spc.values()))}, {100 * f:.0f}% of the training time) pre-train "
                "each backbone on object crops, then the detector trains")
        iters = plan_iterations(left * (1 - f), list(spi.values()), minimum=20)
        log(f"plan: {iters} detector iterations per model x batch {recipe.batch_size} = "
            f"{iters * recipe.batch_size / len(train_set):.1f} epochs of {len(train_set)} images; "
            f"~{_fmt_s(iters * sum(spi.values()))} training + ~{_fmt_s(sum(eval_est.values()))} evaluation. "
            "Each phase re-plans as it trains, to end on time whatever the machine's speed does")
    else:
        pre_note = (f"{pre_iters} crop-classifier iterations x batch {recipe.pretrain_batch_size} (~"
                    f"{_fmt_s(pre_iters * sum(spc.values()))}), then " if use_pretrain else "")
        log(f"schedule: {pre_note}{iters} detector iterations per model x batch {recipe.batch_size} = "
            f"{iters * recipe.batch_size / len(train_set):.1f} epochs of {len(train_set)} images; "
            f"expected ~{_fmt_s(iters * sum(spi.values()))} training + ~{_fmt_s(sum(eval_est.values()))} evaluation"
            + (f"; the time limit ({_fmt_s(budget_s)} left) only stops a phase early on a machine too slow for it"
               if safety else ""))

    results: Dict[str, Dict[str, Any]] = {}
    eval_ratio = 1.0  # measured / estimated evaluation time, carried from the models already evaluated
    # the plan still to run, in seconds at the probed speeds: (preset, phase) -> cost
    todo = {(p, "pretrain"): pre_iters * spc[p] for p in presets} if use_pretrain else {}
    todo.update({(p, "detector"): iters * spi[p] for p in presets})

    def time_share(preset: str, phase: str, rest) -> float:
        """This phase's share of the time left: its planned cost scaled by (time left / plan left), so a
        machine slower or faster than probed shrinks or stretches every remaining phase alike."""
        left = budget_s - (time.perf_counter() - t_start) - eval_ratio * sum(eval_est[p] for p in rest)
        planned_left = sum(todo.values())
        return max(1.0, left * todo.pop((preset, phase)) / max(planned_left, 1e-9))

    for k, preset in enumerate(presets):
        run_dir = out_dir / preset
        overrides: Dict[str, Any] = dict(seed=seed, progress=progress)
        planned = iters
        t_model = time.perf_counter()
        pretrain = None
        if use_pretrain:
            pre_budget = time_share(preset, "pretrain", presets[k:]) if budgeted else None
            pre_planned = max(1, int(pre_budget / spc[preset])) if timed else pre_iters
            log(f"{preset}: pre-training its backbone on object crops ({pre_planned} iterations"
                + (f", ~{_fmt_s(pre_budget)})" if timed else ")"))
            torch.manual_seed(seed)
            cached = None if (budgeted or pretrain_cache is None) else _cached_pretrain(
                Path(pretrain_cache), preset, recipe, seed, pre_planned)
            if cached is not None and (cached / "pretrain.json").exists():
                pretrain = json.loads((cached / "pretrain.json").read_text())
                pretrain["checkpoint"] = Path(pretrain["checkpoint"])
                log(f"{preset}: reusing the crop pre-training of the same trunk in {cached}")
            else:
                pretrain = pretrain_backbone(preset, train_set, cached or run_dir / "pretrain",
                                             backbone=recipe.backbone, iterations=pre_planned,
                                             time_budget_s=pre_budget, crop_size=recipe.pretrain_crop_size,
                                             batch_size=recipe.pretrain_batch_size, lr=recipe.pretrain_lr, seed=seed,
                                             progress=progress, crops=crops, val_crops=val_crops,
                                             budget_shortens_only=safety)
                if cached is not None:
                    (cached / "pretrain.json").write_text(json.dumps(
                        {k: (str(v) if k == "checkpoint" else v) for k, v in pretrain.items()}))
            load_backbone_checkpoint(models[preset], pretrain["checkpoint"], offsets="pretrained")
            note = (f"planned {pretrain['planned_iterations']} iterations, ran {pretrain['iterations']}; "
                    if timed else "")
            if pretrain.get("stopped_early"):
                note = (f"STOPPED EARLY by the time limit: ran {pretrain['iterations']} of "
                        f"{pretrain['planned_iterations']} iterations; ")
            log(f"{preset}: crop classifier top-1 {100 * pretrain['accuracy']:.1f}% on the validation objects "
                f"({note}{_fmt_s(time.perf_counter() - t_model)}); its trunk, offsets included, initialises "
                "the detector")
        tail = None
        if budgeted:
            share = time_share(preset, "detector", presets[k:])
            planned = max(1, int(share / spi[preset])) if timed else iters
            overrides["time_budget_shortens_only"] = safety
            # the budget covers this model's evaluation too, which slows down with the machine: the planner
            # keeps the evaluation's estimate x (measured / probed step time) free at the end
            eval_s = eval_ratio * eval_est[preset]
            overrides["time_budget_s"] = share + eval_s
            probed = spi[preset]

            def tail(sec_per_iter: float, eval_s=eval_s, probed=probed) -> float:
                return eval_s * max(1.0, sec_per_iter / probed)
        config = recipe.train_config(str(run_dir), planned, ipe, **overrides)
        model = models[preset]
        t0 = time.perf_counter()
        run = train(model, train_set, config, model_spec=specs[preset], collate_fn=collate_fn, time_tail=tail)
        t1 = time.perf_counter()
        ran = int(run["iteration"])
        ev = evaluate(model, val_set, label_to_category_id=specs[preset].label_to_category_id,
                      progress=progress, out_dir=run_dir / "eval_val", keep_predictions=16)
        t2 = time.perf_counter()
        eval_ratio = max(0.5, (t2 - t1) / eval_est[preset])
        results[preset] = {
            "metrics": ev["metrics"], "sec_per_iter": (t1 - t0) / max(1, ran), "iterations": ran,
            "planned_iterations": planned, "stopped_early": bool(run.get("stopped_early")),
            "pretrain": None if pretrain is None else {
                k: (str(v) if k == "checkpoint" else v) for k, v in pretrain.items()},
            "pretrain_s": t0 - t_model, "train_s": t1 - t0, "eval_s": t2 - t1, "run_dir": str(run_dir),
            "params": count_parameters(model), "predictions": ev["predictions"],
        }
        bbox = ev["metrics"]["bbox"]
        plan_note = f"planned {planned} iterations, ran {ran}; " if timed else ""
        if run.get("stopped_early"):
            plan_note = f"STOPPED EARLY by the time limit: ran {ran} of {planned} iterations; "
        log(f"{preset}: AP {100 * bbox['AP']:.1f}, AP50 {100 * bbox['AP50']:.1f} "
            f"({plan_note}trained in {_fmt_s(t1 - t0)}, evaluated in {_fmt_s(t2 - t1)})")
    summary = {p: {k: v for k, v in r.items() if k != "predictions"} for p, r in results.items()}
    (out_dir / "summary.json").write_text(json.dumps({"recipe": recipe.to_dict(), "results": summary}, indent=2))
    return results
