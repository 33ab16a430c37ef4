"""Rebuilding a trained detector from its checkpoint alone, and running it on image files."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dcnv2.engine.checkpoint import load_checkpoint
from dcnv2.engine.config import ModelSpec, build_model

__all__ = ["load_model", "read_image", "predict_images", "resized_size", "degenerate_image"]


def resized_size(height: int, width: int, min_size: float, max_size: float) -> Tuple[int, int]:
    """The (h, w) that torchvision's ``GeneralizedRCNNTransform`` resizes an image to: the shorter side to
    ``min_size`` unless the longer side would exceed ``max_size``."""
    import math

    scale = min(float(min_size) / min(height, width), float(max_size) / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def degenerate_image(image: torch.Tensor, min_size: float, max_size: float) -> Optional[str]:
    """Why a detector with this transform size cannot run on ``image`` Tensor[3, H, W], or None when it can:
    an empty image, or one so elongated that its shorter side would resize to less than one pixel."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if h < 1 or w < 1:
        return f"the image is {w}x{h} pixels"
    rh, rw = resized_size(h, w, min_size, max_size)
    if rh < 1 or rw < 1:
        return (f"the {w}x{h} image would be resized to {rw}x{rh} pixels (shorter side {min_size:g}, longer side at "
                f"most {max_size:g}): its aspect ratio is too extreme for this model")
    return None


def load_model(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, ModelSpec]:
    """The detector stored in a training checkpoint (``checkpoint_last.pth`` or ``model_final.pth``), in eval mode.

    Raises:
        ValueError: the checkpoint has no model description (``model_spec``) to rebuild it from, or it holds
            a classifier.
    """
    state = load_checkpoint(checkpoint)
    if not state.get("model_spec"):
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no model_spec: it was not written by `dcnv2 train` "
                         "(train with a ModelSpec to make it self-describing)")
    spec = ModelSpec.from_dict(state["model_spec"])
    if spec.arch == "classifier":
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds a classifier (preset {spec.preset!r}, `dcnv2 "
                         f"train-cls`), not a detector: evaluate it with `dcnv2 eval-cls`, or give a checkpoint "
                         f"of `dcnv2 train`")
    from dcnv2.models import inference_state_dict

    model = build_model(spec, inference=True)  # checkpoint_last.pth also holds the training-only branch
    model.load_state_dict(inference_state_dict(state["model"]))
    return model.to(device).eval(), spec


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file as a float tensor [3, H, W] in [0, 1]: any mode PIL opens (grayscale, palette, alpha,
    CMYK, 16-bit grayscale rescaled) converted to RGB (:func:`dcnv2.data.image_folder.load_rgb`)."""
    import numpy as np

    from dcnv2.data.image_folder import ImageFileError, load_rgb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    try:
        arr = np.asarray(load_rgb(path), dtype=np.uint8)
    except ImageFileError as exc:
        raise ValueError(f"image {str(path)!r} could not be decoded: {str(exc).split(': ', 1)[-1]}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


@torch.no_grad()
def predict_images(model: nn.Module, spec: ModelSpec, images: Sequence[Union[str, Path]], out_dir: Union[str, Path], *,
                   score_threshold: float = 0.5, device: Optional[torch.device] = None) -> List[Dict[str, object]]:
    """Runs ``model`` on each image file and writes ``out_dir/<stem>.png`` with its detections drawn.

    An image that cannot be read or run (corrupt, empty, too elongated to resize) does not stop the others:
    its entry has ``"error"`` (the reason, naming the file) instead of ``"output"`` and ``"detections"``.

    Returns:
        per image ``{"image", "output", "detections": [{"label", "category_id", "class", "score", "box"}]}``
        (detections at or above ``score_threshold``), or ``{"image", "error"}``.
    """
    from dcnv2.engine.plots import save_detections

    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    report = []
    used = set()
    transform = model.transform
    for path in images:
        try:
            image = read_image(path)
        except (ValueError, OSError) as exc:
            report.append({"image": str(path), "error": str(exc)})
            continue
        reason = degenerate_image(image, max(transform.min_size), transform.max_size)
        if reason:
            report.append({"image": str(path), "error": f"image {str(path)!r} skipped: {reason}"})
            continue
        pred = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        name = Path(path).stem
        while name in used:  # two inputs with the same stem must not overwrite each other
            name += "_"
        used.add(name)
        out = out_dir / f"{name}.png"
        save_detections(image, pred, out, class_name=spec.class_name, score_threshold=score_threshold)
        keep = pred["scores"] >= score_threshold
        dets = [{"label": int(l), "category_id": spec.label_to_category_id.get(int(l)), "class": spec.class_name(int(l)),
                 "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
                for l, s, b in zip(pred["labels"][keep], pred["scores"][keep], pred["boxes"][keep])]
        report.append({"image": str(path), "output": str(out), "detections": dets})
    return report
