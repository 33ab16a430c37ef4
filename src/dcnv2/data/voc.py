"""PASCAL VOC data: detection (``Annotations/*.xml``) and semantic segmentation (``SegmentationClass/*.png``).

The layout is the VOC devkit's, one year's folder (``VOCdevkit/VOC2007``; a folder holding exactly one
``VOCdevkit/VOC20xx`` is taken as that one)::

    ROOT/Annotations/<id>.xml           detection: size, objects (name, bndbox, difficult)
    ROOT/ImageSets/Main/<split>.txt     detection splits: one image id per line (train, val, trainval, test)
    ROOT/ImageSets/Segmentation/<split>.txt
    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png     class index per pixel (palette PNG), 255 on object borders (ignored)

XML files are parsed with torchvision's ``VOCDetection.parse_voc_xml`` and checked when a split is loaded:
every problem (malformed XML, missing size or bndbox, unknown class, empty box, missing image) is reported
in one :class:`~dcnv2.data.coco.AnnotationError` naming the file. Boxes follow detectron2: VOC's 1-based
inclusive pixel corners become ``(xmin - 1, ymin - 1, xmax, ymax)`` in continuous pixel coordinates, so the
devkit's ``+ 1`` IoU on the XML values equals the plain IoU on these boxes. Targets keep ``difficult`` objects
(as detectron2 trains on them; ``target["difficult"]`` marks them); the evaluation ignores them, as the
devkit does. The detection set also carries its ground truth as a pycocotools ``COCO`` (``coco``; difficult
objects as crowd regions, which COCOeval ignores) so the COCO AP of :func:`dcnv2.engine.evaluate` applies.
"""
from __future__ import annotations

import contextlib
import io
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from dcnv2.data.coco import MAX_REPORTED, AnnotationError

__all__ = ["VOC_CLASSES", "find_voc_root", "is_voc_layout", "voc_splits", "read_image_set", "parse_annotation",
           "VOCDetection", "VOCSegmentation", "check_voc", "VocReport"]

VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IGNORE_INDEX = 255
TASK_DIRS = {"detection": "Main", "segmentation": "Segmentation"}

PathLike = Union[str, "os.PathLike[str]"]


def find_voc_root(root: PathLike) -> Optional[Path]:
    """``root`` itself when it has the VOC layout (``ImageSets`` plus ``Annotations`` or ``SegmentationClass``),
    else its only ``VOCdevkit/VOC*`` folder that has it, else None."""
    root = Path(root)

    def has_layout(p: Path) -> bool:
        return (p / "ImageSets").is_dir() and ((p / "Annotations").is_dir() or (p / "SegmentationClass").is_dir())

    if has_layout(root):
        return root
    years = sorted(p for p in (root / "VOCdevkit").glob("VOC*") if has_layout(p)) if (root / "VOCdevkit").is_dir() else []
    return years[0] if len(years) == 1 else None


def is_voc_layout(root: PathLike) -> bool:
    return find_voc_root(root) is not None


def _require_root(root: PathLike) -> Path:
    found = find_voc_root(root)
    if found is None:
        raise FileNotFoundError(f"{root} is not a PASCAL VOC folder: expected ROOT/ImageSets/ plus ROOT/Annotations/ "
                                "(detection) or ROOT/SegmentationClass/ (segmentation), e.g. VOCdevkit/VOC2007")
    return found


def voc_splits(root: PathLike, task: str = "detection") -> List[str]:
    """The split names of ``ImageSets/Main`` (detection) or ``ImageSets/Segmentation``, without the per-class
    lists of Main (``cat_train.txt`` ...)."""
    if task not in TASK_DIRS:
        raise ValueError(f"task must be one of {sorted(TASK_DIRS)}, got {task!r}")
    folder = _require_root(root) / "ImageSets" / TASK_DIRS[task]
    names = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    return [n for n in names if not any(n.startswith(c + "_") for c in VOC_CLASSES)]


def read_image_set(root: PathLike, split: str, task: str = "detection") -> List[str]:
    """The image ids listed in ``ImageSets/{Main|Segmentation}/{split}.txt``."""
    root = _require_root(root)
    path = root / "ImageSets" / TASK_DIRS[task] / f"{split}.txt"
    if not path.is_file():
        have = voc_splits(root, task)
        raise FileNotFoundError(f"{path} not found: split {split!r} has no image list; {task} splits of {root}: "
                                f"{', '.join(have) if have else 'none'}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path} lists no image ids")
    return ids


def _number(obj: Dict[str, Any], key: str) -> Optional[float]:
    try:
        value = float(obj[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def parse_annotation(path: PathLike, classes: Sequence[str] = VOC_CLASSES) -> Dict[str, Any]:
    """One VOC XML file as ``{"width", "height", "filename", "objects": [{"name", "label" (1..K), "box"
    [x1, y1, x2, y2] (see the module doc), "difficult", "truncated"}]}``.

    Raises:
        AnnotationError: naming ``path``: not readable or not XML (with the line and column), no
            ``annotation`` root, size missing or not positive, an object without a known ``name`` or with a
            ``bndbox`` that is not four finite numbers with xmax >= xmin and ymax >= ymin.
    """
    from torchvision.datasets import VOCDetection as _TorchvisionVOC

    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        line, col = e.position
        raise AnnotationError(f"{path}: malformed XML at line {line}, column {col} ({e}); fix or regenerate the "
                              "file") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot be read ({e})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: the root element must be <annotation>, got <{root.tag}>")
    ann = _TorchvisionVOC.parse_voc_xml(root)["annotation"]
    problems = []
    size = ann.get("size") if isinstance(ann.get("size"), dict) else {}
    width, height = _number(size, "width"), _number(size, "height")
    if not (width and height and width > 0 and height > 0 and width == int(width) and height == int(height)):
        problems.append(f"<size> needs positive integer <width> and <height>, got {size.get('width')!r}, "
                        f"{size.get('height')!r}")
    objects_in = ann.get("object") or []
    objects_in = objects_in if isinstance(objects_in, list) else [objects_in]
    index = {c: i + 1 for i, c in enumerate(classes)}
    objects = []
    for k, obj in enumerate(objects_in):
        if not isinstance(obj, dict):
            problems.append(f"object {k} has no children (needs <name> and <bndbox>)")
            continue
        name = obj.get("name")
        if not isinstance(name, str) or name.strip() not in index:
            problems.append(f"object {k} has class {name!r}, not one of the {len(classes)} classes "
                            f"({', '.join(classes[:5])}, ...)")
            continue
        box = obj.get("bndbox") if isinstance(obj.get("bndbox"), dict) else {}
        values = [_number(box, key) for key in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in values):
            problems.append(f"object {k} ({name}): <bndbox> needs finite numbers xmin, ymin, xmax, ymax, got "
                            f"{ {key: box.get(key) for key in ('xmin', 'ymin', 'xmax', 'ymax')} }")
            continue
        xmin, ymin, xmax, ymax = values
        if not (xmax >= xmin and ymax >= ymin):
            problems.append(f"object {k} ({name}): <bndbox> has xmax < xmin or ymax < ymin "
                            f"({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})")
            continue
        flags = {key: str(obj.get(key, "0")).strip() in ("1", "true") for key in ("difficult", "truncated")}
        objects.append({"name": name.strip(), "label": index[name.strip()],
                        "box": [xmin - 1.0, ymin - 1.0, xmax, ymax], **flags})
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED])
        more = f"; ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise AnnotationError(f"{path}: {len(problems)} problem(s): {shown}{more}")
    return {"width": int(width), "height": int(height), "filename": ann.get("filename"), "objects": objects}


def _load_rgb(path: Path, what: str) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read image {path} ({what}): {e}; the file may be truncated or corrupt") from e
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.float32).div_(255)


def _raise_problems(problems: List[str], where: str) -> None:
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise AnnotationError(f"{where}: {len(problems)} problem(s) found when loading:\n{shown}{more}\n"
                              f"`dcnv2 data check` lists them all.")


class VOCDetection(torch.utils.data.Dataset):
    """A VOC detection split as ``(image, target)`` samples for torchvision detectors (as
    :class:`~dcnv2.data.CocoDetection`'s).

    Args:
        root: the VOC year folder (see the module doc).
        split: an ``ImageSets/Main`` list (``trainval``, ``test`` ...).
        classes: the class names (label ``i`` is ``classes[i - 1]``); default VOC's 20.
        transforms: ``(image, target) -> (image, target)`` (see :mod:`dcnv2.data.transforms`).
        drop_empty: leave out images without objects (training).

    Samples: ``image`` float32 [3, H, W] in [0, 1]; ``target["boxes"]`` float32 [N, 4] xyxy,
    ``["labels"]`` int64 [N] in 1..K, ``["difficult"]`` bool [N], ``["image_id"]`` (position in the split + 1),
    ``["area"]``, ``["iscrowd"]`` (zeros).

    Attributes: ``ids``, ``names`` (VOC image ids), ``class_names``, ``num_classes`` (K + 1),
    ``label_to_category_id`` (identity), ``coco`` (the ground truth for COCOeval), ``with_masks`` (False:
    VOC detection has no instance masks).

    Raises:
        FileNotFoundError: no VOC layout, or no list for ``split``.
        AnnotationError: XML problems (see :func:`parse_annotation`) or missing XML / image files, the first
            few listed with the total count.
    """

    with_masks = False

    def __init__(self, root: PathLike, split: str, *, classes: Sequence[str] = VOC_CLASSES,
                 transforms: Optional[Callable] = None, drop_empty: bool = False):
        self.root = _require_root(root)
        self.split = split
        self.transforms = transforms
        self.class_names = list(classes)
        self.num_classes = len(self.class_names) + 1
        self.label_to_category_id = {i: i for i in range(1, self.num_classes)}
        self.category_id_to_label = dict(self.label_to_category_id)
        names = read_image_set(self.root, split)
        problems: List[str] = []
        self.annotations: Dict[int, Dict[str, Any]] = {}
        self._names: Dict[int, str] = {}
        for k, name in enumerate(names):
            xml, image = self.root / "Annotations" / f"{name}.xml", self.root / "JPEGImages" / f"{name}.jpg"
            if not xml.is_file():
                problems.append(f"{xml} is missing (image {name!r} of split {split!r})")
                continue
            if not image.is_file():
                problems.append(f"{image} is missing (listed in split {split!r}, annotated in {xml.name})")
            try:
                self.annotations[k + 1] = parse_annotation(xml, self.class_names)
            except AnnotationError as e:
                problems.append(str(e))
            self._names[k + 1] = name
        _raise_problems(problems, f"{self.root} split {split!r}")
        ids = sorted(self.annotations)
        if drop_empty:
            ids = [i for i in ids if self.annotations[i]["objects"]]
        self.ids: List[int] = ids
        self.names = [self._names[i] for i in ids]
        self._coco = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCDetection({len(self)} images, {self.num_classes - 1} classes, {self.root} split {self.split!r})"

    def image_path(self, image_id: int) -> Path:
        return self.root / "JPEGImages" / f"{self._names[image_id]}.jpg"

    def ground_truth(self) -> Dict[int, Dict[str, Tensor]]:
        """``{image_id: {"boxes" [N, 4], "labels" [N], "difficult" bool [N]}}`` of every image (VOC AP)."""
        out = {}
        for i in self.ids:
            objs = self.annotations[i]["objects"]
            out[i] = {"boxes": torch.tensor([o["box"] for o in objs], dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.tensor([o["label"] for o in objs], dtype=torch.int64),
                      "difficult": torch.tensor([o["difficult"] for o in objs], dtype=torch.bool)}
        return out

    @property
    def coco(self):
        """The ground truth as a pycocotools ``COCO`` (category id = label; difficult objects are crowd regions,
        which COCOeval ignores)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            images, anns = [], []
            for i in self.ids:
                a = self.annotations[i]
                images.append({"id": i, "width": a["width"], "height": a["height"],
                               "file_name": f"{self._names[i]}.jpg"})
                for o in a["objects"]:
                    x1, y1, x2, y2 = o["box"]
                    anns.append({"id": len(anns) + 1, "image_id": i, "category_id": o["label"],
                                 "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                 "iscrowd": int(o["difficult"])})
            coco = COCO()
            coco.dataset = {"images": images, "annotations": anns,
                            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]}
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image_id = self.ids[index]
        a = self.annotations[image_id]
        image = _load_rgb(self.image_path(image_id), f"image {self._names[image_id]!r} of {self.root}")
        h, w = image.shape[-2:]
        if (w, h) != (a["width"], a["height"]):
            raise AnnotationError(f"image {self.image_path(image_id)} is {w}x{h} pixels but its annotation "
                                  f"{self._names[image_id]}.xml says {a['width']}x{a['height']} (width x height)")
        boxes = torch.tensor([o["box"] for o in a["objects"]], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        objs = [o for o, k in zip(a["objects"], keep.tolist()) if k]
        boxes = boxes[keep]
        target = {"boxes": boxes, "labels": torch.tensor([o["label"] for o in objs], dtype=torch.int64),
                  "difficult": torch.tensor([o["difficult"] for o in objs], dtype=torch.bool),
                  "image_id": torch.tensor(image_id, dtype=torch.int64),
                  "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                  "iscrowd": torch.zeros(len(objs), dtype=torch.int64)}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _load_label_png(path: Path, num_classes: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise AnnotationError(f"{path}: a VOC label image must be a palette (P) or grayscale (L) PNG of "
                                      f"class indices, got mode {img.mode}")
            labels = np.asarray(img).copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"cannot read label image {path}: {e}; the file may be truncated or corrupt") from e
    bad = (labels >= num_classes) & (labels != IGNORE_INDEX)
    if bad.any():
        raise AnnotationError(f"{path}: class indices must be 0..{num_classes - 1} or {IGNORE_INDEX} (ignored), found "
                              f"{sorted(set(labels[bad].tolist()))[:5]}")
    return torch.from_numpy(labels.astype(np.int64))


class VOCSegmentation(torch.utils.data.Dataset):
    """A VOC segmentation split as ``(image [3, H, W], {"semantic": int64 [H, W], "image_id"})``, the samples of
    :class:`dcnv2.data.semantic.SemanticSegmentation`: 0 background, 1..K the classes, 255 ignored (borders).

    Args:
        root, split: the VOC folder and an ``ImageSets/Segmentation`` list.
        classes: default VOC's 20 (PNG index ``i`` is ``classes[i - 1]``).
        transforms: detection transforms (:mod:`dcnv2.data.transforms`), applied to the image and the label map
            together (as a one-channel mask: flips mirror it, resizes are nearest-neighbour).

    Raises:
        FileNotFoundError: no VOC layout or no list for ``split``.
        AnnotationError: images or label PNGs missing (when loaded); when a sample is read, a label PNG that is
            not a palette/grayscale image, holds an index outside 0..K and 255, or differs in size from its image.
    """

    def __init__(self, root: PathLike, split: str, *, classes: Sequence[str] = VOC_CLASSES,
                 transforms: Optional[Callable] = None):
        self.root = _require_root(root)
        self.split = split
        self.transforms = transforms
        self.class_names = list(classes)
        self.num_classes = len(self.class_names) + 1
        self.label_to_category_id = {i: i for i in range(1, self.num_classes)}
        self.names = read_image_set(self.root, split, "segmentation")
        problems = []
        for name in self.names:
            for path in (self.root / "JPEGImages" / f"{name}.jpg", self.root / "SegmentationClass" / f"{name}.png"):
                if not path.is_file():
                    problems.append(f"{path} is missing (listed in ImageSets/Segmentation/{split}.txt)")
        _raise_problems(problems, f"{self.root} segmentation split {split!r}")
        self.ids = list(range(1, len(self.names) + 1))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"VOCSegmentation({len(self)} images, {self.num_classes - 1} classes, {self.root} split {self.split!r})"

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        name = self.names[index]
        image = _load_rgb(self.root / "JPEGImages" / f"{name}.jpg", f"image {name!r} of {self.root}")
        png = self.root / "SegmentationClass" / f"{name}.png"
        labels = _load_label_png(png, self.num_classes)
        if tuple(labels.shape) != tuple(image.shape[-2:]):
            raise AnnotationError(f"{png} is {labels.shape[1]}x{labels.shape[0]} pixels, its image {name}.jpg "
                                  f"{image.shape[2]}x{image.shape[1]} (width x height)")
        if self.transforms is not None:
            image, t = self.transforms(image, {"masks": labels[None].to(torch.uint8)})
            labels = t["masks"][0].to(torch.int64)
        return image, {"semantic": labels, "image_id": torch.tensor(index + 1, dtype=torch.int64)}


@dataclass
class VocReport:
    """What :func:`check_voc` found: ``problems`` (each naming its file) and one summary per split."""

    root: Path
    problems: List[str] = field(default_factory=list)
    summaries: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = list(self.summaries)
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s) in {self.root}:")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append(f"{self.root}: no problems found")
        return "\n".join(lines)


def check_voc(root: PathLike, splits: Optional[Sequence[str]] = None, *, decode: bool = False,
              classes: Sequence[str] = VOC_CLASSES) -> VocReport:
    """Checks every detection and segmentation split of a VOC folder (``splits``: only these names) and
    summarises each: images, objects, difficult objects, objects per class. Every malformed or missing file
    is listed by path; ``decode`` also decodes every image and label PNG."""
    root = _require_root(root)
    report = VocReport(root)
    for task in ("detection", "segmentation"):
        for split in voc_splits(root, task):
            if splits is not None and split not in splits:
                continue
            names = read_image_set(root, split, task)
            if task == "detection":
                _check_detection_split(report, root, split, names, classes, decode)
            else:
                _check_segmentation_split(report, root, split, names, classes, decode)
    if not report.summaries:
        report.problems.append(f"no split lists found under {root}/ImageSets/Main or ImageSets/Segmentation"
                               + (f" named {', '.join(splits)}" if splits else ""))
    return report


def _check_detection_split(report, root, split, names, classes, decode) -> None:
    counts = {c: 0 for c in classes}
    objects = difficult = empty = 0
    for name in names:
        xml, image = root / "Annotations" / f"{name}.xml", root / "JPEGImages" / f"{name}.jpg"
        if not image.is_file():
            report.problems.append(f"{image} is missing (split {split!r})")
        if not xml.is_file():
            report.problems.append(f"{xml} is missing (split {split!r})")
            continue
        try:
            ann = parse_annotation(xml, classes)
        except AnnotationError as e:
            report.problems.append(str(e))
            continue
        empty += not ann["objects"]
        for o in ann["objects"]:
            counts[o["name"]] += 1
            objects += 1
            difficult += o["difficult"]
        if decode and image.is_file():
            try:
                img = _load_rgb(image, f"split {split!r}")
                if (img.shape[2], img.shape[1]) != (ann["width"], ann["height"]):
                    report.problems.append(f"{image} is {img.shape[2]}x{img.shape[1]} pixels, {xml.name} says "
                                           f"{ann['width']}x{ann['height']}")
            except OSError as e:
                report.problems.append(str(e))
    lines = [f"{root} [detection {split}]: {len(names)} images ({empty} without objects), {objects} objects "
             f"({difficult} difficult)", "", "| label | class | objects |", "|---:|---|---:|"]
    lines += [f"| {i} | {c} | {counts[c]} |" for i, c in enumerate(classes, start=1)]
    report.summaries.append("\n".join(lines) + "\n")


def _check_segmentation_split(report, root, split, names, classes, decode) -> None:
    pixels = np.zeros(len(classes) + 1, dtype=np.int64)
    for name in names:
        image, png = root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"
        missing = [p for p in (image, png) if not p.is_file()]
        report.problems += [f"{p} is missing (segmentation split {split!r})" for p in missing]
        if missing or not decode:
            continue
        try:
            labels = _load_label_png(png, len(classes) + 1)
            img = _load_rgb(image, f"segmentation split {split!r}")
        except (OSError, AnnotationError) as e:
            report.problems.append(str(e))
            continue
        if tuple(labels.shape) != tuple(img.shape[-2:]):
            report.problems.append(f"{png} is {labels.shape[1]}x{labels.shape[0]} pixels, {image.name} "
                                   f"{img.shape[2]}x{img.shape[1]}")
        kept = labels[labels != IGNORE_INDEX]
        pixels += np.bincount(kept.numpy(), minlength=len(pixels))
    line = f"{root} [segmentation {split}]: {len(names)} images with label PNGs"
    if decode:
        present = [c for c, n in zip(("background",) + tuple(classes), pixels) if n]
        line += f"; classes present: {', '.join(present) if present else 'none'}"
    report.summaries.append(line + "\n")
