"""Figures: training loss curves and detections (boxes, masks, labels, scores) drawn on images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["read_log", "moving_average", "plot_loss_curves", "draw_detections", "save_detections", "pyplot",
           "save_figure"]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Union[str, Path], *, dpi: int = 110, tight: bool = True) -> Path:
    """Lays ``fig`` out (``tight``), writes it to ``out`` (creating its folder) and closes it; returns the path."""
    if tight:
        fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return out


def read_log(path: Union[str, Path]) -> List[dict]:
    """The iteration records of a JSON-lines training log (events and unreadable lines skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "event" not in rec:
            records.append(rec)
    return records


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(runs: Mapping[str, Union[str, Path]], out: Union[str, Path], *, components: bool = True,
                     smooth: Optional[int] = None) -> Path:
    """Total loss (and, with ``components``, each loss term) against iteration, one colour per run: the
    logged values faint, their moving average on top.

    Args:
        runs: ``{label: path to log.jsonl}``.
        out: PNG to write.
        smooth: moving-average window in log records; default about 1/15 of the longest log; 1 = raw only.
    """
    plt = pyplot()
    logs = {name: read_log(p) for name, p in runs.items()}
    keys = sorted({k for recs in logs.values() for r in recs for k in r if k.startswith("loss_")}) if components else []
    n = 1 + len(keys)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    if smooth is None:
        smooth = max(1, max((len(r) for r in logs.values()), default=0) // 15)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, ["loss"] + keys):
        for i, (name, recs) in enumerate(logs.items()):
            pts = [(r["iter"], r[key]) for r in recs if key in r and r[key] is not None and np.isfinite(r[key])]
            if pts:
                x, y = zip(*pts)
                color = colors[i % len(colors)]
                if smooth > 1:
                    ax.plot(x, y, color=color, lw=0.8, alpha=0.25)
                    ax.plot(x, moving_average(y, smooth), color=color, lw=1.6, label=name)
                else:
                    ax.plot(x, y, color=color, lw=1.2, label=name)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.set_yscale("log" if key == "loss" and any(recs for recs in logs.values()) else "linear")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return save_figure(fig, out)


_COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                    [0, 128, 128], [220, 190, 255], [170, 110, 40], [128, 0, 0], [0, 0, 128]], dtype=np.float32) / 255


def draw_detections(ax, image: torch.Tensor, prediction: Mapping[str, torch.Tensor], *,
                    class_name: Callable[[int], str] = str, score_threshold: float = 0.5,
                    mask_threshold: float = 0.5, title: Optional[str] = None) -> int:
    """Draws ``image`` ([3,H,W] in [0,1]) with the detections scoring at least ``score_threshold`` on ``ax``.

    ``prediction`` is a torchvision detector output (boxes xyxy, labels, scores, optional masks [N,1,H,W]).
    Returns the number of detections drawn.
    """
    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().copy()
    scores = prediction["scores"].detach().float().cpu()
    keep = torch.nonzero(scores >= score_threshold).flatten()
    boxes = prediction["boxes"].detach().float().cpu()[keep]
    labels = prediction["labels"].detach().cpu()[keep]
    scores = scores[keep]
    masks = prediction.get("masks")
    if masks is not None and len(keep):
        m = masks.detach().float().cpu()[keep]
        m = (m[:, 0] if m.dim() == 4 else m) >= mask_threshold
        for i in range(len(keep)):
            color = _COLORS[int(labels[i]) % len(_COLORS)]
            sel = m[i].numpy()
            img[sel] = 0.45 * img[sel] + 0.55 * color
    ax.imshow(img, interpolation="nearest")
    from matplotlib.patches import Rectangle

    for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
        color = _COLORS[int(label) % len(_COLORS)]
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        ax.text(x0, y0, f"{class_name(int(label))} {score:.2f}", fontsize=7, color="white", va="bottom",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return len(keep)


def save_detections(image: torch.Tensor, prediction: Mapping[str, torch.Tensor], out: Union[str, Path], **kwargs) -> int:
    """Draws one image's detections (see :func:`draw_detections`) into a PNG at ``out``; returns the count."""
    plt = pyplot()
    h, w = image.shape[-2:]
    scale = max(1.0, 384 / max(h, w))  # small images are upscaled so labels stay legible
    fig = plt.figure(figsize=(w * scale / 100, h * scale / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    n = draw_detections(ax, image, prediction, **kwargs)
    save_figure(fig, out, dpi=100, tight=False)
    return n
