"""Comparing an exported detector's outputs with PyTorch's: same detections, to a stated tolerance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

__all__ = ["BOX_ATOL", "SCORE_ATOL", "DetectionMatch", "compare_detections"]

#: Default tolerances of :func:`compare_detections`: box corners within 1e-3 pixel (plus 1e-5 relative),
#: scores within 1e-4, labels and detection counts exactly equal. ONNX Runtime and torch.export runs of our
#: float32 detectors measure 1e-5 px / 1e-7 at 64..128 px (tests and ``dcnv2 export`` print the measured
#: differences).
BOX_ATOL = 1e-3
SCORE_ATOL = 1e-4

Detections = Union[Mapping[str, Tensor], Sequence[Tensor]]


@dataclass
class DetectionMatch:
    """The result of :func:`compare_detections`."""

    expected: int              # detections PyTorch returned
    actual: int                # detections the exported model returned
    max_box_diff: float        # over matched pairs (0 when there are none)
    max_score_diff: float
    labels_equal: bool
    ok: bool                   # same count, labels equal, boxes and scores within tolerance

    def __str__(self) -> str:
        return (f"{self.actual}/{self.expected} detections, labels {'equal' if self.labels_equal else 'DIFFER'}, "
                f"max |box diff| {self.max_box_diff:.2e} px, max |score diff| {self.max_score_diff:.2e}"
                f" -> {'same' if self.ok else 'DIFFERENT'}")


def _as_dict(d: Detections) -> Mapping[str, Tensor]:
    if isinstance(d, Mapping):
        return d
    return dict(zip(("boxes", "scores", "labels"), d))


def compare_detections(expected: Detections, actual: Detections, *, box_atol: float = BOX_ATOL,
                       score_atol: float = SCORE_ATOL, box_rtol: float = 1e-5) -> DetectionMatch:
    """Compares two detectors' outputs for one image.

    Args:
        expected, actual: ``{"boxes": Tensor[D, 4], "scores": Tensor[D], "labels": Tensor[D]}`` or the tuple
            ``(boxes, scores, labels, ...)`` an exported detector returns.
        box_atol, box_rtol, score_atol: tolerances.

    Returns:
        a :class:`DetectionMatch`. Detections are compared in score order, which both share; pairs whose
        scores tie within ``score_atol`` may come in either order, so each detection is matched to the
        nearest box of the same label among those tying with it.
    """
    e, a = _as_dict(expected), _as_dict(actual)
    eb, es, el = (e[k].detach().float().cpu() for k in ("boxes", "scores", "labels"))
    ab, as_, al = (a[k].detach().float().cpu() for k in ("boxes", "scores", "labels"))
    n, m = eb.shape[0], ab.shape[0]
    if n != m:
        return DetectionMatch(n, m, float("inf"), float("inf"), False, False)
    if n == 0:
        return DetectionMatch(0, 0, 0.0, 0.0, True, True)
    used = torch.zeros(m, dtype=torch.bool)
    box_diff = score_diff = 0.0
    labels_equal = True
    for i in range(n):
        cand = (~used) & ((as_ - es[i]).abs() <= score_atol) & (al == el[i])
        if not bool(cand.any()):
            labels_equal = labels_equal and bool(al[i] == el[i])
            j = i
            if used[j]:
                return DetectionMatch(n, m, float("inf"), float("inf"), False, False)
        else:
            idx = cand.nonzero().flatten()
            j = int(idx[(ab[idx] - eb[i]).abs().amax(dim=1).argmin()])
        used[j] = True
        box_diff = max(box_diff, float((ab[j] - eb[i]).abs().max()))
        score_diff = max(score_diff, float((as_[j] - es[i]).abs()))
        labels_equal = labels_equal and bool(al[j] == el[i])
    box_tol = box_atol + box_rtol * float(eb.abs().max())
    ok = labels_equal and box_diff <= box_tol and score_diff <= score_atol
    return DetectionMatch(n, m, box_diff, score_diff, labels_equal, ok)
