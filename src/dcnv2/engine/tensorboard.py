"""TensorBoard event files beside ``log.jsonl``: the logged scalars, and at evaluation the metrics and an image.

TensorBoard is optional (``pip install 'dcnv2[tb]'``). Without it :class:`TensorBoardLog` does nothing and
warns once per process, so a run never depends on it; ``log.jsonl`` holds every scalar either way. Events go to
``OUT/tb/`` (``tensorboard --logdir OUT/tb``, or ``--logdir runs/`` to compare runs). A resumed run purges the
events past its checkpoint's iteration, as ``log.jsonl`` drops those records, so the curves do not fold back.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

__all__ = ["TB_DIR", "TensorBoardLog", "tensorboard_available", "scalar_tags", "log_evaluation"]

TB_DIR = "tb"
_MISSING_WARNED = False
# log.jsonl keys that are coordinates or text, not curves
_NOT_SCALARS = ("iter", "epoch", "event")


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _warn_missing(log_dir: Path) -> None:
    global _MISSING_WARNED
    if not _MISSING_WARNED:
        _MISSING_WARNED = True
        warnings.warn(f"tensorboard is not installed: no TensorBoard events in {log_dir} (pip install 'dcnv2[tb]', "
                      "or --no-tensorboard to silence this); log.jsonl has every scalar", stacklevel=3)


def _wait_until_new_files_sort_last(log_dir: Path, max_wait_s: float = 2.0) -> None:
    """TensorBoard reads a directory's event files in name order, and a purge only drops events read before it.
    A file's name starts with its creation second and ends with a per-process counter, so a file made in the
    same second as an earlier one can sort first (counter 10 before 9, another host's name) and its purge
    would come before the events it should drop. Waits (under a second, at most ``max_wait_s`` on a skewed
    clock) until the current second is past every existing file's."""
    latest = -1
    for path in log_dir.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3:4]
        if field and field[0].isdigit():
            latest = max(latest, int(field[0]))
    deadline = time.time() + max_wait_s
    while latest >= int(time.time()) and time.time() < deadline:
        time.sleep(min(latest + 1 - time.time(), deadline - time.time()) + 1e-3)


def scalar_tags(record: Mapping[str, Any], prefix: str = "train") -> dict:
    """The TensorBoard scalars of one ``log.jsonl`` record: ``{f"{prefix}/{key}": value}`` for every finite
    number in it except the iteration and epoch (``train/loss``, ``train/loss_classifier``, ``train/lr`` ...)."""
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class TensorBoardLog:
    """A ``SummaryWriter`` on ``log_dir`` when enabled and tensorboard is installed, else a no-op.

    Args:
        log_dir: the event directory (``OUT/tb``).
        enabled: False writes nothing and does not warn (``--no-tensorboard``, ranks > 0).
        purge_step: a resumed run's iteration: events of later steps left by the interrupted run are discarded.
    """

    def __init__(self, log_dir: Union[str, Path], *, enabled: bool = True, purge_step: Optional[int] = None):
        self.log_dir = Path(log_dir)
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _warn_missing(self.log_dir)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if purge_step:
            _wait_until_new_files_sort_last(self.log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step or None)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One scalar per tag at ``step``; non-finite values are skipped (TensorBoard would plot them as gaps)."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), int(step))

    def record(self, record: Mapping[str, Any], step: int, prefix: str = "train") -> None:
        """The numbers of one ``log.jsonl`` record (see :func:`scalar_tags`)."""
        self.scalars(scalar_tags(record, prefix), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An image ``[H, W, 3]`` (uint8, or float in [0, 1])."""
        if self.writer is None:
            return
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"TensorBoardLog.image: image must be [H, W, 3 or 4], got shape {list(image.shape)}")
        self.writer.add_image(tag, image[..., :3], int(step), dataformats="HWC")

    def image_file(self, tag: str, path: Union[str, Path], step: int) -> None:
        """A PNG written by the evaluation (detections drawn, a confusion matrix)."""
        if self.writer is None:
            return
        from PIL import Image

        with Image.open(path) as img:
            self.image(tag, np.asarray(img.convert("RGB")), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_evaluation(run_dir: Union[str, Path], step: int, metrics: Mapping[str, Any], *, prefix: str,
                   image: Union[str, Path, None] = None, image_tag: str = "detections",
                   enabled: bool = True) -> None:
    """Writes an evaluation's metrics (``{name: number}`` or ``{iou_type: {name: number}}``, negative COCO
    values meaning "no ground truth" left out) and optionally a PNG (``prefix/image_tag``) to ``run_dir/tb`` at
    ``step`` (the trained iteration), under ``prefix`` (``eval_val``)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{prefix}/{key}/{k}": v for k, v in value.items() if _number(v) and v >= 0})
        elif _number(value):
            flat[f"{prefix}/{key}"] = value
    with TensorBoardLog(Path(run_dir) / TB_DIR, enabled=enabled) as tb:
        tb.scalars(flat, step)
        if image is not None and Path(image).is_file():
            tb.image_file(f"{prefix}/{image_tag}", image, step)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
