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
from dcnv2.engine.recipes import SyntheticRecipe, plan_iterations, seconds_per_image_eval, seconds_per_iteration
from dcnv2.engine.train import ResumableBatchSampler, train
from dcnv2.models.flops import count_parameters

__all__ = ["compare_presets"]


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)} min {int(s % 60):02d} s" if s >= 60 else f"{s:.0f} s"


def compare_presets(presets: Sequence[str], train_set, val_set, out_dir, *, recipe: SyntheticRecipe,
                    budget_s: float, iters: Optional[int] = None, seed: int = 0, progress: bool = True,
                    log: Callable[[str], None] = print, collate_fn=None) -> Dict[str, Dict[str, Any]]:
    """Trains every preset for the same number of iterations (fitted so that training + evaluation of all
    of them takes about ``budget_s``), evaluates each on ``val_set``.

    Returns:
        ``{preset: {"metrics", "sec_per_iter", "iterations", "train_s", "eval_s", "run_dir", "params",
        "predictions"}}`` (``predictions``: a few ``(image, prediction)`` pairs for drawing).
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
    eval_s = sum(spe.values()) * len(val_set) * 1.15 + 5 * len(presets)  # + COCOeval, checkpoints
    left = budget_s - (time.perf_counter() - t_start) - eval_s
    ipe = ResumableBatchSampler.batches_per_epoch(len(train_set), recipe.batch_size, 1)
    if iters is None:
        iters = plan_iterations(left, list(spi.values()), minimum=20)
    log(f"schedule: {iters} iterations per model x batch {recipe.batch_size} = "
        f"{iters * recipe.batch_size / len(train_set):.1f} epochs of {len(train_set)} images; "
        f"expected ~{_fmt_s(iters * sum(spi.values()))} training + ~{_fmt_s(eval_s)} evaluation")

    results: Dict[str, Dict[str, Any]] = {}
    for preset in presets:
        run_dir = out_dir / preset
        config = recipe.train_config(str(run_dir), iters, ipe, seed=seed, progress=progress)
        model = models[preset]
        t0 = time.perf_counter()
        train(model, train_set, config, model_spec=specs[preset], collate_fn=collate_fn)
        t1 = time.perf_counter()
        ev = evaluate(model, val_set, label_to_category_id=specs[preset].label_to_category_id,
                      progress=progress, out_dir=run_dir / "eval_val", keep_predictions=16)
        t2 = time.perf_counter()
        results[preset] = {
            "metrics": ev["metrics"], "sec_per_iter": (t1 - t0) / iters, "iterations": iters,
            "train_s": t1 - t0, "eval_s": t2 - t1, "run_dir": str(run_dir),
            "params": count_parameters(model), "predictions": ev["predictions"],
        }
        bbox = ev["metrics"]["bbox"]
        log(f"{preset}: AP {100 * bbox['AP']:.1f}, AP50 {100 * bbox['AP50']:.1f} "
            f"(trained in {_fmt_s(t1 - t0)}, evaluated in {_fmt_s(t2 - t1)})")
    summary = {p: {k: v for k, v in r.items() if k != "predictions"} for p, r in results.items()}
    (out_dir / "summary.json").write_text(json.dumps({"recipe": recipe.to_dict(), "results": summary}, indent=2))
    return results
