"""The paper's Table 1 (and Table 3) in miniature, the reports ``benchmarks/ablation.py`` prints.

The scratch recipe (:func:`run_scratch_ablation`): every preset trained from scratch with one schedule fitted
to a time budget (:func:`dcnv2.experiments.compare.compare_presets`) on the synthetic set, once per training
seed, and its markdown table. The pre-trained recipe's runs are :mod:`dcnv2.experiments.ablation`'s;
:func:`pretrained_table` writes their table under the recipe's description.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from dcnv2.experiments.ablation import _spread, format_seed_table, run_name

__all__ = ["run_scratch_ablation", "pretrained_table"]


def run_scratch_ablation(presets: Sequence[str], out: Path, *, minutes: float, iters: Optional[int], data: Optional[str],
                         seed: int, seeds: Optional[List[int]], num_train: int, num_val: int, image_size: int,
                         progress: bool, log: Callable[[str], None], t_start: float) -> str:
    """Trains (or reuses, under ``out/runs``) every preset per seed within ``minutes`` counted from ``t_start``
    (``time.perf_counter()``), or ``iters`` iterations each, and returns the markdown table.

    ``seeds`` None: one run per preset with ``seed`` under ``out/runs``; else one per seed under
    ``out/runs/seed<S>``. ``data``: an existing synthetic set (default: generated under ``out/data``)."""
    import torch

    from dcnv2 import data as data_lib
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.experiments.compare import compare_presets
    from dcnv2.experiments.demo import ensure_synthetic_data
    from dcnv2.experiments.recipes import SyntheticRecipe

    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(data) if data else ensure_synthetic_data(
        out / "data", seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    recipe = SyntheticRecipe(image_size=image_size)
    train_set = load_dataset(data_dir, "train", train=True, with_masks=False)
    val_set = load_dataset(data_dir, "val", train=False, with_masks=False)
    run_seeds = seeds or [seed]
    per_seed = {}
    for i, s in enumerate(run_seeds):
        budget = (minutes * 60 - (time.perf_counter() - t_start)) / (len(run_seeds) - i)
        runs = out / "runs" if seeds is None else out / "runs" / f"seed{s}"
        per_seed[s] = compare_presets(presets, train_set, val_set, runs, recipe=recipe, budget_s=budget,
                                      iters=iters, seed=s, progress=progress, log=log,
                                      collate_fn=data_lib.collate_fn)
        if iters is None:  # every seed gets the first seed's schedule
            iters = next(iter(per_seed[s].values()))["iterations"]
    results = per_seed[run_seeds[0]]
    iters = next(iter(results.values()))["iterations"]
    lines = [
        f"Synthetic set ({len(train_set)} train / {len(val_set)} val images, {image_size} px), "
        f"{recipe.backbone}{'-FPN' if recipe.fpn else ''} Faster R-CNN from scratch, {iters} iterations x batch "
        f"{recipe.batch_size} per preset, {torch.get_num_threads()} CPU threads; COCO bbox AP (%).",
        "",
        "| preset | AP | AP50 | AP75 | APs | APm | APl | params | s / iter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        m = r["metrics"]["bbox"]
        cells = ["–" if m[k] < 0 else f"{100 * m[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['params'] / 1e6:.2f} M | {r['sec_per_iter']:.2f} |")
    if len(run_seeds) > 1:
        lines += ["", f"Over training seeds {', '.join(map(str, run_seeds))} (mean ± half the range):", "",
                  "| preset | " + " | ".join(f"AP50 seed {s}" for s in run_seeds) + " | AP50 | AP |",
                  "|---|" + "---:|" * (len(run_seeds) + 2)]
        for name in presets:
            ap50 = [100 * per_seed[s][name]["metrics"]["bbox"]["AP50"] for s in run_seeds]
            ap = [100 * per_seed[s][name]["metrics"]["bbox"]["AP"] for s in run_seeds]
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in ap50) + f" | {_spread(ap50)} | {_spread(ap)} |")
    return "\n".join(lines)


def pretrained_table(results: Dict[int, Dict[str, Any]], presets: Sequence[str], mimic: Optional[Dict[str, Any]], *,
                     num_train: int, num_val: int, image_size: int) -> Optional[str]:
    """The pre-trained recipe's table of :func:`~dcnv2.experiments.ablation.run_pretrained_ablation`'s
    ``results`` under the recipe's description, or None when no run has finished."""
    finished = [r for runs in results.values() for r in runs.values()]
    if not finished:
        return None
    first = finished[0]
    head = (f"Demo recipe: synthetic set (demo difficulty, {num_train} train / {num_val} val, "
            f"{image_size} px), ResNet-18-FPN trunk crop-pre-trained for {first['pretrain_iters']} iterations, "
            f"then {first['iters']} detector iterations x batch 8, {first['threads']} CPU thread(s); COCO bbox AP (%), "
            "mean ± half the range over seeds.")
    return head + "\n\n" + format_seed_table(results, [run_name(x, mimic or None) for x in presets])
