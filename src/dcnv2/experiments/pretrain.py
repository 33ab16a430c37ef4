"""Backbone pre-training on object crops of a detection set: the paper's Table 7 idea in miniature.

A from-scratch detector on a small budget learns *where* objects are long before it learns *what* they
are: its RoI classifier must wait for backbone features that tell shapes apart. Classifying crops of the
annotated objects (one label per crop, no RPN, no RoI sampling) teaches those features several times
faster per second of CPU. The classifier has exactly the detector's trunk, deformable layers included, so
its weights - offset/mask convs too - initialise the detector through :mod:`dcnv2.models.transfer`.

* :class:`ObjectCrops` - a classification view of a COCO-format detection set: one sample per object, a
  square crop around its box (with context and random jitter/flip in training), normalised as the
  detector's transform normalises images.
* :func:`pretrain_backbone` - trains a :func:`dcnv2.models.classifier` with the trunk of a detector preset
  on those crops through the detection engine (:func:`dcnv2.engine.train.train`: time budget, log,
  checkpoints) and returns its checkpoint and top-1 accuracy on the validation crops.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ObjectCrops", "crop_classifier", "seconds_per_crop_iteration", "pretrain_backbone", "crop_accuracy"]

IMAGE_MEAN = (0.485, 0.456, 0.406)  # the detectors' GeneralizedRCNNTransform normalisation
IMAGE_STD = (0.229, 0.224, 0.225)


class ObjectCrops(Dataset):
    """One classification sample per (non-crowd) object of a :class:`dcnv2.data.CocoDetection` set.

    Args:
        detection_set: the COCO-format set (its images are read once and kept in memory as uint8).
        size: side of the square crops in pixels.
        context: crop side = ``context`` × the box's longer side (+ 4 px), centred on the box.
        jitter: training augmentation: the centre moves by up to ±10 % of the side, the side scales by
            up to e^±0.2, and half of the crops are flipped (global torch RNG: the engine seeds it per sample).

    Samples are ``(crop [3, size, size] float, label)`` with labels ``0 .. K-1`` (the detection set's
    contiguous labels minus one); ``class_names`` follows the same order.
    """

    def __init__(self, detection_set, *, size: int = 48, context: float = 1.25, jitter: bool = True):
        if not (isinstance(size, int) and size >= 8):
            raise ValueError(f"ObjectCrops: size must be an int >= 8, got {size!r}")
        if not (isinstance(context, (int, float)) and math.isfinite(context) and context > 0):
            raise ValueError(f"ObjectCrops: context must be a positive number, got {context!r}")
        self.size, self.context, self.jitter = size, float(context), bool(jitter)
        self.class_names: List[str] = list(detection_set.class_names)
        self.num_classes = len(self.class_names)
        images: List[Tensor] = []
        boxes: List[Tensor] = []
        labels: List[Tensor] = []
        owners: List[Tensor] = []
        for index in range(len(detection_set)):
            image_id = detection_set.ids[index]
            info = detection_set.coco.imgs[image_id]
            anns = [a for a in detection_set.coco.imgToAnns.get(image_id, ()) if not a.get("iscrowd", 0)
                    and a["bbox"][2] > 0 and a["bbox"][3] > 0]
            if not anns:
                continue
            image = detection_set._load_image(image_id)
            if image.shape[-2:] != (info["height"], info["width"]):
                raise ValueError(f"ObjectCrops: image {image_id} is {tuple(image.shape[-2:])}, its annotation "
                                 f"says {(info['height'], info['width'])}")
            images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
            b = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
            boxes.append(torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1))
            labels.append(torch.tensor([detection_set.category_id_to_label[a["category_id"]] - 1 for a in anns]))
            owners.append(torch.full((len(anns),), len(images) - 1))
        if not images:
            raise ValueError("ObjectCrops: the detection set has no annotated objects to crop")
        self._images = images
        self.boxes = torch.cat(boxes)
        self.labels = torch.cat(labels)
        self._owner = torch.cat(owners)
        self._mean = torch.tensor(IMAGE_MEAN)[:, None, None]
        self._std = torch.tensor(IMAGE_STD)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def crop_box(self, index: int) -> Tensor:
        """The square crop window (x0, y0, x1, y1) of sample ``index`` (random in training)."""
        box = self.boxes[index]
        centre = (box[:2] + box[2:]) / 2
        side = float((box[2:] - box[:2]).max()) * self.context + 4.0
        if self.jitter:
            centre = centre + (torch.rand(2) - 0.5) * 0.2 * side
            side = side * math.exp(float(torch.rand(())) * 0.4 - 0.2)
        return torch.cat([centre - side / 2, centre + side / 2])

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        from torchvision.ops import roi_align

        image = self._images[int(self._owner[index])].float().div_(255)
        window = self.crop_box(index)
        crop = roi_align(image[None], [window[None]], self.size, spatial_scale=1.0, sampling_ratio=2,
                         aligned=True)[0]
        if self.jitter and bool(torch.rand(()) < 0.5):
            crop = crop.flip(-1)
        return (crop - self._mean) / self._std, int(self.labels[index])


@torch.no_grad()
def crop_accuracy(model, crops: ObjectCrops, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier on every crop of ``crops`` (evaluation mode, no jitter)."""
    from dcnv2.engine.classification import collate_eval

    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(crops), batch_size):
        images, labels = collate_eval([crops[i] for i in range(start, min(len(crops), start + batch_size))])
        correct += int((model(images).argmax(1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(crops))


def crop_classifier(preset: str, backbone: str, num_classes: int):
    """A classifier with exactly the trunk of detector preset ``preset`` (same deformable stages, layer type
    and offset groups), and the :class:`dcnv2.engine.ModelSpec` that rebuilds it."""
    from dcnv2.engine.config import ModelSpec
    from dcnv2.models import classifier, get_preset

    det = get_preset(preset)
    stages = tuple(det.deform_stages)
    kwargs = dict(deform_stages=list(stages), modulated=bool(det.modulated and stages),
                  offset_groups=det.offset_groups)
    model = classifier("regular", backbone, num_classes, deform_stages=stages,
                       modulated=kwargs["modulated"] if stages else None, offset_groups=det.offset_groups)
    spec = ModelSpec(arch="classifier", preset="regular", backbone=backbone, num_classes=num_classes, kwargs=kwargs)
    return model, spec


def seconds_per_crop_iteration(preset: str, crops: ObjectCrops, *, backbone: str = "resnet18",
                               batch_size: int = 64, steps: int = 5) -> float:
    """Median of ``steps`` training steps (after a warm-up) of ``preset``'s crop classifier; the global RNG
    is left as it was."""
    import time

    from dcnv2.engine.classification import collate_train

    with torch.random.fork_rng(devices=[]):
        model, _ = crop_classifier(preset, backbone, crops.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        times: List[float] = []
        for i in range(steps + 1):
            idx = torch.randint(len(crops), (batch_size,), generator=g).tolist()
            t0 = time.perf_counter()
            images, targets = collate_train([crops[j] for j in idx])
            loss = model(images, targets)["loss_cls"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def pretrain_backbone(preset: str, train_set, out: Union[str, Path], *, backbone: str = "resnet18",
                      val_set=None, iterations: int = 200, time_budget_s: Optional[float] = None,
                      crop_size: int = 48, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                      progress: bool = True, crops: Optional[ObjectCrops] = None,
                      val_crops: Optional[ObjectCrops] = None,
                      budget_shortens_only: bool = False) -> Dict[str, Any]:
    """Trains a classifier with the trunk of detector preset ``preset`` on the object crops of ``train_set``.

    Args:
        preset: a detector preset (:func:`dcnv2.models.get_preset`); the classifier gets its deformable
            stages and layer type, so its checkpoint loads strictly into the detector's trunk.
        train_set, val_set: COCO-format detection sets (``val_set`` only scores the classifier).
        crops, val_crops: their :class:`ObjectCrops`, when already built (otherwise built here).
        out: the run directory (``model_final.pth``, ``log.jsonl``, checkpoints).
        iterations: the schedule's length, or its first estimate with ``time_budget_s`` (re-planned; with
            ``budget_shortens_only`` the budget only stops a run too slow for it early).
        crop_size, batch_size, lr, seed: the recipe (AdamW, warm-up then cosine, label smoothing 0.1,
            offset/mask branches at 0.1× lr).

    Returns:
        ``{"checkpoint": path of model_final.pth, "iterations", "planned_iterations", "stopped_early",
        "accuracy" (top-1 on the validation crops, or None), "crops": training crop count}``.
    """
    from dcnv2.engine.classification import collate_train
    from dcnv2.engine.config import TrainConfig
    from dcnv2.engine.train import train

    crops = crops if crops is not None else ObjectCrops(train_set, size=crop_size, jitter=True)
    torch.manual_seed(seed)
    model, spec = crop_classifier(preset, backbone, crops.num_classes)
    spec.class_names, spec.min_size, spec.max_size = list(crops.class_names), crop_size, crop_size
    config = TrainConfig(out=str(out), max_iters=iterations, epochs=0, batch_size=batch_size, lr=lr,
                         optimizer="adamw", weight_decay=1e-4, warmup_iters=min(20, max(1, iterations // 10)),
                         warmup_factor=0.1, lr_schedule="cosine", lr_steps=(), time_budget_s=time_budget_s,
                         time_budget_shortens_only=budget_shortens_only, checkpoint_every=max(50, iterations),
                         log_every=5, num_workers=0, seed=seed,
                         progress=progress)
    run = train(model, crops, config, model_spec=spec, collate_fn=collate_train)
    if val_crops is None and val_set is not None:
        val_crops = ObjectCrops(val_set, size=crop_size, jitter=False)
    accuracy = crop_accuracy(model, val_crops) if val_crops is not None else None
    return {"checkpoint": Path(run["final_model"]), "iterations": run["iteration"],
            "planned_iterations": run["planned_iterations"], "stopped_early": bool(run.get("stopped_early")),
            "accuracy": accuracy, "crops": len(crops)}
