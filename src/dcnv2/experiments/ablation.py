"""The paper's ablations (Tables 1 and 3) on the demo's pre-trained recipe, one resumable run per preset and seed.

Each run is what ``dcnv2 demo`` does for one model: the demo's data set and difficulty, the preset's trunk
crop-pre-trained (:mod:`dcnv2.experiments.pretrain`, offsets included), then its detector trained on a fixed
schedule (no time budget) and COCO-evaluated. A row is therefore a function of its seed (and of torch's
thread count, recorded with it). Every finished run leaves ``OUT/runs/seed<S>/<run name>/result.json`` (its
checkpoints and log under ``<run name>/<preset>/``), and a
later call - in another session - reuses it instead of training again, so a table can be built over several
sessions. Presets with the same trunk share one crop pre-training per seed (``OUT/pretrain/``).

``mimic`` overrides (e.g. ``{"cls_weight": 0.0}``) change the mimicking branch of the mimicking presets for a
controlled variant: the run's name gets a suffix that says what changed (``dcnv2[cls_weight=0]``), so variants
and the paper's settings sit side by side in one output directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["TABLE1_PRESETS", "TABLE3_PRESETS", "run_name", "run_pretrained_ablation", "format_seed_table"]

TABLE1_PRESETS = ("regular", "dconv-c5", "dconv-c4c5", "dconv-c3c5", "dconv-c3c5-dpool", "mdconv-c3c5",
                  "mdconv-c3c5-mdpool", "dcnv2")
# Table 3: mimicking regions on DCNv2 (none / FG / FG+BG / BG) and on a regular net (none / FG)
TABLE3_PRESETS = ("mdconv-c3c5-mdpool", "dcnv2", "dcnv2-fgbg", "dcnv2-bg", "regular", "regular-mimic")


def run_name(preset: str, mimic: Optional[Dict[str, Any]] = None) -> str:
    """``preset`` or, for a mimicking preset with overrides, ``preset[key=value,...]``."""
    if not mimic or not has_mimicking(preset):
        return preset
    return preset + "[" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in sorted(mimic.items())) + "]"


def has_mimicking(preset: str) -> bool:
    from dcnv2.models import get_preset

    return get_preset(preset).mimic not in (None, "", "none")


def _spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.1f} ± {(max(values) - min(values)) / 2:.1f}"


def _machine() -> Dict[str, Any]:
    """Where a run ran: its numbers are reproducible per seed only on the same CPU kind and vector ISA (the
    GEMM kernels differ between AVX2, AVX-512 and AMX), so each result records them."""
    import platform

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def run_pretrained_ablation(presets: Sequence[str], seeds: Sequence[int], out, *, iters: Optional[int] = None,
                            pretrain_iters: Optional[int] = None, num_train: int = 1600, num_val: int = 400,
                            image_size: int = 128, data_seed: int = 0, mimic: Optional[Dict[str, Any]] = None,
                            progress: bool = True, log: Callable[[str], None] = print,
                            train_missing: bool = True) -> Dict[int, Dict[str, Any]]:
    """Trains (or reuses) one run per preset and seed; returns ``{seed: {run name: result}}``.

    Args:
        presets: detector presets (:data:`dcnv2.models.PRESETS`).
        seeds: training seeds (weights, data order, samplers); the data set is the same for all.
        out: output directory (``data/``, ``pretrain/``, ``runs/seed<S>/<run>/``).
        iters, pretrain_iters: the schedule (default: the demo's ``DEMO_ITERS`` / ``DEMO_PRETRAIN_ITERS``).
        num_train, num_val, image_size, data_seed: the synthetic set (default: the demo's).
        mimic: :class:`dcnv2.models.mimic.MimicConfig` overrides for the mimicking presets.
        train_missing: False reports the finished runs only (a table of what is there, nothing trained).

    A result holds ``metrics`` (COCO bbox), ``iterations``, ``pretrain`` (crop top-1, iterations),
    ``train_s``, ``eval_s``, ``threads``, ``preset``, ``mimic``, ``run_dir``.
    """
    from dcnv2 import data
    from dcnv2.experiments.compare import compare_presets
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.experiments.demo import DEMO_DATA, DEMO_ITERS, DEMO_PRETRAIN_ITERS, ensure_synthetic_data
    from dcnv2.experiments.recipes import SyntheticRecipe
    from dcnv2.models import get_preset

    for preset in presets:
        get_preset(preset)  # unknown names fail before anything trains
    iters = DEMO_ITERS if iters is None else int(iters)
    pretrain_iters = DEMO_PRETRAIN_ITERS if pretrain_iters is None else int(pretrain_iters)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = ensure_synthetic_data(out / "data", seed=data_seed, num_train=num_train, num_val=num_val,
                                     image_size=image_size, log=log, **DEMO_DATA)
    train_set = val_set = None
    threads = torch.get_num_threads()
    results: Dict[int, Dict[str, Any]] = {}
    for seed in seeds:
        results[seed] = {}
        for preset in presets:
            name = run_name(preset, mimic)
            run_dir = out / "runs" / f"seed{seed}" / name
            stamp = run_dir / "result.json"
            schedule = {"iters": iters, "pretrain_iters": pretrain_iters, "threads": threads}
            if stamp.exists():
                done = json.loads(stamp.read_text())
                if {k: done.get(k) for k in schedule} == schedule:
                    log(f"seed {seed} {name}: reusing {stamp} (AP {100 * done['metrics']['bbox']['AP']:.1f})")
                    results[seed][name] = done
                    continue
                log(f"seed {seed} {name}: {stamp} has another schedule ({ {k: done.get(k) for k in schedule} }); "
                    "training again")
            if not train_missing:
                log(f"seed {seed} {name}: not run yet")
                continue
            if train_set is None:
                train_set = load_dataset(data_dir, "train", train=True, with_masks=False)
                val_set = load_dataset(data_dir, "val", train=False, with_masks=True)
            recipe = SyntheticRecipe(image_size=image_size)
            recipe.pretrain_iters = pretrain_iters
            if mimic and has_mimicking(preset):
                recipe.model_kwargs["mimic"] = {**recipe.model_kwargs["mimic"], **mimic}
            log(f"seed {seed} {name}: training ({pretrain_iters} crop + {iters} detector iterations, "
                f"{threads} threads)")
            t0 = time.perf_counter()
            # the preset's run (checkpoints, log, eval) lands in <run dir>/<preset>/
            r = compare_presets([preset], train_set, val_set, run_dir, recipe=recipe, budget_s=float("inf"),
                                iters=iters, seed=seed, progress=progress, log=log, collate_fn=data.collate_fn,
                                pretrain_cache=out / "pretrain")[preset]
            done = {"preset": preset, "mimic": mimic or {}, **schedule, "metrics": r["metrics"],
                    "iterations": r["iterations"], "pretrain": r["pretrain"], "train_s": r["train_s"],
                    "eval_s": r["eval_s"], "pretrain_s": r["pretrain_s"], "params": r["params"],
                    "run_dir": r["run_dir"], "wall_s": time.perf_counter() - t0, "machine": _machine()}
            stamp.write_text(json.dumps(done, indent=2))
            results[seed][name] = done
    return results


def format_seed_table(results: Dict[int, Dict[str, Any]], names: Optional[List[str]] = None) -> str:
    """One row per run name: AP per seed, AP and AP50 as mean ± half the range, crop top-1; a row with fewer
    seeds than the others says so."""
    seeds = sorted(results)
    names = names or list(dict.fromkeys(n for s in seeds for n in results[s]))
    lines = ["| model | " + " | ".join(f"AP seed {s}" for s in seeds) + " | AP | AP50 | seeds | crop top-1 |",
             "|---|" + "---:|" * (len(seeds) + 4)]
    for name in names:
        runs = [results[s].get(name) for s in seeds]
        have = [r for r in runs if r is not None]
        if not have:
            continue
        ap = [100 * r["metrics"]["bbox"]["AP"] for r in have]
        ap50 = [100 * r["metrics"]["bbox"]["AP50"] for r in have]
        top1 = [100 * r["pretrain"]["accuracy"] for r in have if r.get("pretrain") and r["pretrain"].get("accuracy")]
        cells = ["–" if r is None else f"{100 * r['metrics']['bbox']['AP']:.1f}" for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_spread(ap)} | {_spread(ap50)} | {len(have)} | "
                     + (f"{sum(top1) / len(top1):.0f}%" if top1 else "–") + " |")
    return "\n".join(lines)
