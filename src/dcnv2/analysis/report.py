"""The analysis figure ``dcnv2 demo`` draws for the models it trained (Fig. 1 style, one validation image)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

__all__ = ["pick_demo_image", "demo_figure", "DEMO_OPTIONS"]

# the paper's settings, with the lazy greedy search of saliency step 2 to keep the demo's reserve small
DEMO_OPTIONS = dict(eps=0.1, area_step=0.01, n_segments=100, greedy="lazy")


def pick_demo_image(dataset, *, max_images: int = 50, min_side: float = 6.0) -> int:
    """Index of the first image with at least two objects (both sides >= ``min_side`` px) whose areas differ
    at least 3x: a small and a large object to put nodes on. Falls back to the image with the most objects."""
    best, best_n = 0, -1
    for idx in range(min(max_images, len(dataset))):
        _, target = dataset[idx]
        b = target["boxes"]
        ok = b[((b[:, 2] - b[:, 0]) >= min_side) & ((b[:, 3] - b[:, 1]) >= min_side)]
        if len(ok) >= 2:
            areas = (ok[:, 2] - ok[:, 0]) * (ok[:, 3] - ok[:, 1])
            if float(areas.max()) >= 3 * float(areas.min()):
                return idx
        if len(ok) > best_n:
            best, best_n = idx, len(ok)
    return best


def demo_figure(checkpoints: Dict[str, Union[str, Path]], dataset, out: Union[str, Path], *,
                index: Optional[int] = None, log=print) -> Tuple[Path, float]:
    """Draws the Fig. 1-style figure (image-wise nodes on a small object, a large object, the background) of
    each checkpoint on one validation image of ``dataset``; returns (PNG path, seconds)."""
    import torch

    from dcnv2.analysis.figures import AnalysisOptions, figure_for_models
    from dcnv2.analysis.nodes import load_analysis_model

    t0 = time.perf_counter()
    models = {name: load_analysis_model(path)[0] for name, path in checkpoints.items()}
    idx = pick_demo_image(dataset) if index is None else index
    image, target = dataset[idx]
    with torch.random.fork_rng(devices=[]):  # SLIC and the models draw no random numbers, but stay safe
        path, _ = figure_for_models(models, image, out, boxes=target["boxes"], masks=target.get("masks"),
                                    options=AnalysisOptions(**DEMO_OPTIONS),
                                    title=f"validation image {idx}: sampling locations, ERF, saliency")
    seconds = time.perf_counter() - t0
    log(f"spatial-support analysis (validation image {idx}, {len(models)} models x 3 nodes): {path} "
        f"in {seconds:.0f} s")
    return path, seconds
