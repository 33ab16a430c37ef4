"""Image classification with the detection engine: ImageFolder data, batching, top-k metrics, evaluation.

Training needs no loop of its own: :class:`dcnv2.models.DCNClassifier` returns ``{"loss_cls": ...}`` from
``model(images, targets)`` like a torchvision detector, and :func:`collate_train` batches samples into
``(images [B, 3, H, W], [{"labels": label}, ...])``, which :func:`dcnv2.engine.train.train` moves to the device
and feeds it as is. So warm-up + cosine/step schedules, AMP, the 0.1x offset lr, atomic checkpoints, exact
resume and torchrun data parallelism are the detection engine's.

Evaluation: :func:`evaluate_classifier` (top-1, top-5, per-class accuracy, confusion matrix, written as
``metrics.json`` and ``confusion.png``); :func:`load_classifier` rebuilds a classifier from its checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "classification_transform", "load_image_folder", "collate_train",
           "collate_eval", "topk_accuracy", "confusion_matrix", "classification_metrics", "plot_confusion_matrix",
           "load_classifier", "check_classes", "evaluate_classifier", "format_metrics"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------
# data


def classification_transform(*, train: bool, image_size: int, min_crop_scale: float = 0.08, flip: bool = True,
                             crop_ratio: float = 0.875):
    """The standard augmentation: RandomResizedCrop(scale=(min_crop_scale, 1)) + horizontal flip for training;
    resize of the shorter side to ``image_size / crop_ratio`` + centre crop for evaluation. Both normalise
    with the ImageNet mean/std. Random draws come from the global torch RNG (seeded per sample by the engine).
    """
    from torchvision.transforms import v2

    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not (0 < min_crop_scale <= 1):
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale!r}")
    if not (0 < crop_ratio <= 1):
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        head = [v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True)]
        if flip:
            head.append(v2.RandomHorizontalFlip())
    else:
        head = [v2.Resize(int(math.floor(image_size / crop_ratio + 0.5)), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(head + tail)


def load_image_folder(root: Union[str, Path], split: str, *, train: bool, image_size: int,
                      min_crop_scale: float = 0.08, flip: bool = True, crop_ratio: float = 0.875):
    """``torchvision.datasets.ImageFolder`` of ``root/split`` with :func:`classification_transform`.

    Samples are ``(image Tensor [3, image_size, image_size], label int)``; ``dataset.classes`` are the class
    folder names, sorted (label ``i`` is ``classes[i]``). Empty class folders are allowed (they keep the
    class indices of the splits aligned).

    Raises:
        FileNotFoundError: ``root/split`` does not exist or holds no class folder.
        ValueError: it holds no image at all.
    """
    from torchvision.datasets import ImageFolder

    from dcnv2.data.image_folder import load_rgb

    path = Path(root) / split
    layout = (f"expected ImageFolder layout {Path(root)}/{split}/<class name>/*.png (or .jpg); "
              f"`dcnv2 data synth-cls --out {root}` writes one")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: {layout}")
    if not any(p.is_dir() for p in path.iterdir()):
        raise FileNotFoundError(f"{path} holds no class folders: {layout}")
    transform = classification_transform(train=train, image_size=image_size, min_crop_scale=min_crop_scale,
                                         flip=flip, crop_ratio=crop_ratio)
    # load_rgb: any mode as RGB (16-bit grayscale rescaled); a file that does not decode names itself
    dataset = ImageFolder(str(path), transform=transform, allow_empty=True, loader=load_rgb)
    if len(dataset) == 0:
        raise ValueError(f"{path} has class folders {dataset.classes} but no images in them: {layout}")
    return dataset


def collate_train(batch: Sequence[Tuple[Tensor, int]]) -> Tuple[Tensor, List[Dict[str, Tensor]]]:
    """``(images [B, 3, H, W], [{"labels": LongTensor [1]}] * B)``: the detection engine's batch format (it
    moves each image and each target to the device); the classifier stacks the images again."""
    images = torch.stack([im.as_subclass(Tensor) for im, _ in batch])
    return images, [{"labels": torch.tensor([int(label)])} for _, label in batch]


def collate_eval(batch: Sequence[Tuple[Tensor, int]]) -> Tuple[Tensor, Tensor]:
    """``(images [B, 3, H, W], labels LongTensor [B])``."""
    return (torch.stack([im.as_subclass(Tensor) for im, _ in batch]),
            torch.tensor([int(label) for _, label in batch], dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# metrics


def _check_logits(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, K], got {list(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape [{logits.shape[0]}], got {list(labels.shape)}")
    if labels.numel() and not bool(((labels >= 0) & (labels < logits.shape[1])).all()):
        raise ValueError(f"labels must be in [0, {logits.shape[1]}), got min {int(labels.min())}, max {int(labels.max())}")


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of samples whose label is among the ``k`` highest logits, for each ``k`` (capped at K).

    Args:
        logits: [N, K]. labels: LongTensor [N] in [0, K).

    Returns:
        ``{k: accuracy in [0, 1]}`` (NaN when N = 0).
    """
    _check_logits(logits, labels)
    out = {}
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"ks must be positive ints, got {k!r}")
        if labels.numel() == 0:
            out[k] = float("nan")
            continue
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        out[k] = float((top == labels[:, None]).any(dim=1).float().mean())
    return out


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """LongTensor [K, K]: entry ``[t, p]`` counts samples of true class ``t`` predicted as ``p``."""
    if predictions.shape != labels.shape or predictions.dim() != 1:
        raise ValueError(f"predictions and labels must be equal-length 1-D tensors, got "
                         f"{list(predictions.shape)} and {list(labels.shape)}")
    for name, t in (("predictions", predictions), ("labels", labels)):
        if t.numel() and not bool(((t >= 0) & (t < num_classes)).all()):
            raise ValueError(f"{name} must be in [0, {num_classes}), got min {int(t.min())}, max {int(t.max())}")
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: Tensor, labels: Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Top-1/top-5 accuracy, per-class accuracy (recall), their mean, the mean cross entropy and the
    confusion matrix of ``logits`` [N, K] against ``labels`` [N]. Accuracies are fractions in [0, 1]; a class
    without samples has per-class accuracy None."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    _check_logits(logits, labels)
    num_classes = logits.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} logits")
    top = topk_accuracy(logits, labels, (1, 5))
    cm = confusion_matrix(logits.argmax(1), labels, num_classes)
    support = cm.sum(1)
    per_class = {n: (float(cm[i, i]) / int(support[i]) if support[i] else None) for i, n in enumerate(names)}
    seen = [v for v in per_class.values() if v is not None]
    loss = float(nn.functional.cross_entropy(logits, labels)) if labels.numel() else float("nan")
    return {"top1": top[1], "top5": top[5], "top5_k": min(5, num_classes),
            "mean_class_accuracy": sum(seen) / len(seen) if seen else float("nan"),
            "loss": loss, "num_samples": int(labels.numel()), "class_names": names,
            "per_class_accuracy": per_class, "support": {n: int(s) for n, s in zip(names, support)},
            "confusion_matrix": cm.tolist()}


def plot_confusion_matrix(cm: Union[Tensor, Sequence[Sequence[int]]], class_names: Sequence[str],
                          out: Union[str, Path], *, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) with the counts written in the cells."""
    from dcnv2.engine.plots import pyplot, save_figure

    plt = pyplot()
    cm = torch.as_tensor(cm, dtype=torch.float64)
    k = cm.shape[0]
    rows = cm / cm.sum(1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k), labels=list(class_names), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(p, t, str(int(cm[t, p])), ha="center", va="center", fontsize=7,
                            color="white" if rows[t, p] > 0.5 else "black")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, out)


def format_metrics(metrics: Mapping[str, Any], name: str = "") -> str:
    """A Markdown summary: top-1, top-5, mean class accuracy, then per-class accuracy (percent)."""
    pct = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"| model | top-1 | top-{metrics['top5_k']} | mean class acc | images |", "|---|---:|---:|---:|---:|",
             f"| {name} | {pct(metrics['top1'])} | {pct(metrics['top5'])} | {pct(metrics['mean_class_accuracy'])} "
             f"| {metrics['num_samples']} |", "", "| class | accuracy | images |", "|---|---:|---:|"]
    for cls, acc in metrics["per_class_accuracy"].items():
        lines.append(f"| {cls} | {pct(acc)} | {metrics['support'][cls]} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# checkpoints and evaluation


def load_classifier(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """The classifier stored in a ``dcnv2 train-cls`` checkpoint, in eval mode, and its ModelSpec.

    Raises:
        ValueError: the checkpoint holds no model description, another architecture (a detector), or
            weights that do not fit the described model (the message lists the keys).
    """
    from dcnv2.engine.checkpoint import load_checkpoint
    from dcnv2.engine.config import ModelSpec, build_model

    state = load_checkpoint(checkpoint)
    if not state.get("model_spec"):
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no model_spec: it was not written by `dcnv2 train-cls`")
    spec = ModelSpec.from_dict(state["model_spec"])
    if spec.arch != "classifier":
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds a {spec.arch} model (preset {spec.preset!r}), not a "
                         "classifier: eval-cls needs a checkpoint of `dcnv2 train-cls` (evaluate detectors with "
                         "`dcnv2 eval`)")
    model = build_model(spec)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit the {spec.preset} {spec.backbone} classifier it "
                         f"describes: missing keys {list(missing)[:8]}, unexpected keys {list(unexpected)[:8]}")
    return model.to(device).eval(), spec


def check_classes(class_names: Sequence[str], dataset, what: str = "the data set") -> None:
    """The model's classes must be the data set's (same names in the same order)."""
    have = list(dataset.classes)
    if list(class_names) != have:
        kind = "class-count mismatch" if len(class_names) != len(have) else "class mismatch"
        raise ValueError(f"{kind}: the model has {len(class_names)} classes {list(class_names)}, {what} has "
                         f"{len(have)} {have}")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, *, class_names: Optional[Sequence[str]] = None,
                        batch_size: int = 64, num_workers: int = 0, device: Optional[torch.device] = None,
                        progress: bool = True, out_dir: Union[str, Path, None] = None,
                        title: str = "") -> Dict[str, Any]:
    """Runs ``model`` over ``dataset`` (samples ``(image [3, H, W], label)``) and scores it.

    Returns:
        ``{"metrics": classification_metrics(...), "logits": Tensor [N, K], "labels": Tensor [N]}``; with
        ``out_dir`` also writes ``metrics.json``, ``metrics.md`` and ``confusion.png`` there.
    """
    from torch.utils.data import DataLoader

    if len(dataset) == 0:
        raise ValueError("evaluate_classifier: the data set is empty")
    device = device or next(model.parameters()).device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_eval)
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="eval-cls", unit="batch", dynamic_ncols=True, mininterval=0.5)
    all_logits, all_labels = [], []
    for images, labels in loader:
        all_logits.append(model(images.to(device)).float().cpu())
        all_labels.append(labels)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    names = list(class_names) if class_names is not None else list(getattr(dataset, "classes", [])) or None
    metrics = classification_metrics(logits, labels, names)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "metrics.md").write_text(format_metrics(metrics, title) + "\n")
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], out / "confusion.png",
                              title=f"{title}: top-1 {100 * metrics['top1']:.1f}%" if title else "")
    return {"metrics": metrics, "logits": logits, "labels": labels}
