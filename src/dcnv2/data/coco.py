"""COCO-format instance annotations as a torch Dataset of ``(image, target)`` pairs, checked when loaded.

The targets follow torchvision's detection convention (boxes xyxy in pixels, labels 1..K with 0 the
background), so they go straight into its Faster/Mask R-CNN. Annotation files are validated up front and
every problem found is reported in one :class:`AnnotationError` that names the file and the image /
annotation ids concerned, instead of failing somewhere inside training.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["AnnotationError", "CocoDetection", "load_split", "collate_fn"]

PathLike = Union[str, "os.PathLike[str]"]
Target = Dict[str, Tensor]

MAX_REPORTED = 5  # problems shown in one AnnotationError message (the total is always given)


class AnnotationError(ValueError):
    """A COCO annotation file (or the image folder next to it) that cannot be used as it is."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite_numbers(values: Any) -> bool:
    return all(_is_number(v) and math.isfinite(v) for v in values)


def _read_json(ann_file: Path) -> Any:
    if not ann_file.is_file():
        raise AnnotationError(f"annotation file {ann_file} does not exist: check the path "
                              f"(expected a COCO instances JSON file)")
    try:
        with open(ann_file, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{ann_file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              f"the file may be truncated or hand-edited: regenerate or re-download it") from e
    except (UnicodeDecodeError, OSError) as e:
        raise AnnotationError(f"{ann_file} cannot be read as JSON ({e}); regenerate or re-download it") from e


def _check_segmentation(seg: Any, height: Any, width: Any) -> Optional[str]:
    """None if ``seg`` is a usable COCO segmentation, else what is wrong with it."""
    if isinstance(seg, list):
        if not seg:
            return "segmentation is an empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list):
                return f"segmentation polygon {k} is a {type(poly).__name__}, not a list of coordinates"
            if not (len(poly) >= 6 and len(poly) % 2 == 0):
                return (f"segmentation polygon {k} has {len(poly)} coordinates "
                        f"(needs an even number, at least 6: three x, y points)")
            if not _finite_numbers(poly):
                return f"segmentation polygon {k} has a coordinate that is not a finite number"
        return None
    if isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            return f"segmentation RLE needs 'size' and 'counts' (has {sorted(seg)})"
        size, counts = seg["size"], seg["counts"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"segmentation RLE size must be [height, width], got {size!r}"
        if _is_int(height) and _is_int(width) and list(size) != [height, width]:
            return f"segmentation RLE size {size} differs from the image's [height, width] [{height}, {width}]"
        if not (isinstance(counts, (str, bytes)) or (isinstance(counts, list) and all(_is_int(c) for c in counts))):
            return "segmentation RLE counts must be a string (compressed) or a list of integers (uncompressed)"
        return None
    if seg is None:
        return "has no segmentation (load with with_masks=False for a box-only set)"
    return f"segmentation is a {type(seg).__name__}, not a polygon list or an RLE dict"


def validate_coco(d: Any, ann_file: Path, image_dir: Path, *, with_masks: bool = True) -> None:
    """Checks a parsed COCO instances file against ``image_dir``; raises one :class:`AnnotationError`.

    Nothing is decoded (no images, no masks), so a set of thousands of images checks in well under a
    second. See :class:`CocoDetection` for the list of checks.
    """
    if not isinstance(d, dict):
        raise AnnotationError(f"{ann_file}: the top level must be a JSON object with 'images', 'annotations' "
                              f"and 'categories', got a {type(d).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(d.get(k), list)]
    if missing:
        what = ", ".join(f"{k!r} ({'missing' if k not in d else type(d[k]).__name__})" for k in missing)
        raise AnnotationError(f"{ann_file}: needs the lists 'images', 'annotations' and 'categories'; "
                              f"bad or missing: {what}. Is this a COCO instances file?")
    problems: List[str] = []

    categories: set = set()
    for k, c in enumerate(d["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        if not _is_int(cid):
            problems.append(f"categories[{k}] needs an integer 'id' (got {cid!r})")
        elif cid in categories:
            problems.append(f"category id {cid} appears twice: give every category a unique id")
        else:
            categories.add(cid)

    images: Dict[int, Dict[str, Any]] = {}
    missing_files: List[str] = []
    for k, img in enumerate(d["images"]):
        iid = img.get("id") if isinstance(img, dict) else None
        if not _is_int(iid):
            problems.append(f"images[{k}] needs an integer 'id' (got {iid!r})")
            continue
        if iid in images:
            problems.append(f"image id {iid} appears twice (images[{k}]): give every image a unique id")
            continue
        images[iid] = img
        w, h = img.get("width"), img.get("height")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            problems.append(f"image id {iid} needs positive integer 'width' and 'height' (got {w!r}, {h!r}): "
                            f"add the image's size in pixels")
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append(f"image id {iid} has no 'file_name'")
        elif not os.path.isfile(os.path.join(image_dir, name)):
            missing_files.append(f"{name} (image id {iid})")
    if missing_files:
        shown = ", ".join(missing_files[:MAX_REPORTED])
        more = f" and {len(missing_files) - MAX_REPORTED} more" if len(missing_files) > MAX_REPORTED else ""
        problems.append(f"{len(missing_files)} image file(s) are missing from {image_dir}: {shown}{more}; "
                        f"check that the image folder belongs to this annotation file")

    ann_ids: set = set()
    for k, a in enumerate(d["annotations"]):
        if not isinstance(a, dict):
            problems.append(f"annotations[{k}] is a {type(a).__name__}, not an object")
            continue
        aid, iid, cid = a.get("id"), a.get("image_id"), a.get("category_id")
        if not _is_int(aid):
            problems.append(f"annotations[{k}] (image id {iid!r}) needs an integer 'id' (got {aid!r})")
            continue
        where = f"annotation id {aid} (image id {iid!r})"
        if aid in ann_ids:
            problems.append(f"{where}: annotation id {aid} appears twice: give every annotation a unique id")
            continue
        ann_ids.add(aid)
        if not (_is_int(iid) and iid in images):
            problems.append(f"{where}: refers to image id {iid!r}, which is not in 'images'")
        if not (_is_int(cid) and cid in categories):
            problems.append(f"{where}: refers to category id {cid!r}, which is not in 'categories' "
                            f"(known: {sorted(categories)[:10]})")
        bbox = a.get("bbox")
        # positive form: NaN fails every comparison, so it cannot slip through as "not negative"
        if not (isinstance(bbox, list) and len(bbox) == 4 and _finite_numbers(bbox)):
            problems.append(f"{where}: bbox must be a list of 4 finite numbers [x, y, width, height], got {bbox!r}")
        elif not (bbox[2] > 0 and bbox[3] > 0):
            problems.append(f"{where}: bbox {bbox} has a non-positive width or height: fix or remove the annotation")
        if with_masks:
            img = images.get(iid, {}) if _is_int(iid) else {}
            why = _check_segmentation(a.get("segmentation"), img.get("height"), img.get("width"))
            if why:
                problems.append(f"{where}: {why}")

    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise AnnotationError(f"{ann_file}: {len(problems)} problem(s) found when loading (image dir {image_dir}):\n"
                              f"{shown}{more}\nFix the annotation file (or regenerate the data set) and load again.")


def _build_coco(d: Dict[str, Any]):
    """A pycocotools ``COCO`` from a parsed dict, without its progress prints.

    Annotations without ``area`` get their box area and those without ``iscrowd`` get 0 (COCOeval reads both).
    """
    from pycocotools.coco import COCO

    for a in d["annotations"]:
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """A COCO instances file and its image folder as ``(image, target)`` samples for torchvision detectors.

    Args:
        image_dir: folder holding the images (``file_name`` in the JSON is relative to it).
        ann_file: the COCO instances JSON file.
        transforms: optional callable ``(image, target) -> (image, target)`` (see :mod:`dcnv2.data.transforms`).
        drop_empty: leave out images without (non-crowd) annotations, as for training; by default they are
            kept as negatives (evaluation must see every image).
        with_masks: decode instance masks into ``target["masks"]`` (and require a segmentation per annotation).

    Samples ``ds[i]`` are ``(image, target)`` with:

    - ``image``: float32 Tensor[3, H, W] in [0, 1] (grayscale, RGBA and palette images become RGB);
    - ``target["boxes"]``: float32 Tensor[N, 4], (x1, y1, x2, y2) in pixels, clipped to the image;
    - ``target["labels"]``: int64 Tensor[N], 1..K (categories sorted by id);
    - ``target["masks"]``: uint8 Tensor[N, H, W] (only with ``with_masks``);
    - ``target["image_id"]``: int64 scalar Tensor; ``target["area"]``: float32 Tensor[N];
      ``target["iscrowd"]``: int64 Tensor[N] (all 0).

    Crowd annotations (``iscrowd=1``) are left out of the targets (torchvision's detectors would train on
    them as objects); the evaluator reads the ground truth from :attr:`coco`, where they remain ignore
    regions. Boxes that are empty after clipping to the image are left out too.

    Attributes:
        coco: the pycocotools ``COCO`` object (ground truth for COCOeval).
        ids: image ids in sample order (sorted).
        label_to_category_id / category_id_to_label: contiguous label <-> COCO category id.
        num_classes: K + 1 (background included). class_names: the K category names in label order.

    Raises:
        AnnotationError: when loaded, listing the first problems found and their count: the file is missing
            or not JSON, the top-level lists are missing, duplicate image/annotation/category ids,
            annotations referring to unknown images or categories, bboxes that are not 4 finite numbers with
            positive width and height, images without width/height or without a file in ``image_dir``,
            segmentations that are neither polygons (even number >= 6 of finite coordinates) nor RLE
            (``size`` and ``counts``). When a sample is read: an image whose size differs from the JSON.
        OSError: when a sample is read, an image file that cannot be decoded (naming the file and image id).
    """

    def __init__(self, image_dir: PathLike, ann_file: PathLike, *,
                 transforms: Optional[Callable[[Tensor, Target], Tuple[Tensor, Target]]] = None,
                 drop_empty: bool = False, with_masks: bool = True):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        if not self.image_dir.is_dir():
            raise AnnotationError(f"image folder {self.image_dir} (for {self.ann_file}) does not exist")
        d = _read_json(self.ann_file)
        validate_coco(d, self.ann_file, self.image_dir, with_masks=with_masks)
        self.coco = _build_coco(d)

        cat_ids = sorted(self.coco.cats)
        self.label_to_category_id: Dict[int, int] = {i + 1: c for i, c in enumerate(cat_ids)}
        self.category_id_to_label: Dict[int, int] = {c: i for i, c in self.label_to_category_id.items()}
        self.class_names: List[str] = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]
        self.num_classes = len(cat_ids) + 1

        ids = sorted(self.coco.imgs)
        if drop_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, ()))]
        self.ids: List[int] = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.num_classes - 1} classes, "
                f"ann_file={str(self.ann_file)!r})")

    def _load_image(self, image_id: int) -> Tensor:
        from PIL import Image

        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # decodes the whole file: truncation shows up here
        except (OSError, SyntaxError, ValueError) as e:
            raise OSError(f"cannot read image {path} (image id {image_id} in {self.ann_file}): {e}; "
                          f"the file may be truncated or corrupt: replace it") from e
        if img.size != (info["width"], info["height"]):
            raise AnnotationError(f"image {path} (image id {image_id}) is {img.width}x{img.height} pixels but "
                                  f"{self.ann_file} says {info['width']}x{info['height']} (width x height): "
                                  f"fix the size in the annotation file or the image")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(torch.float32).div_(255)

    def _target(self, image_id: int, height: int, width: int) -> Target:
        anns = [a for a in self.coco.imgToAnns.get(image_id, ()) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
        anns = [a for a, k in zip(anns, keep) if k]
        target = {
            "boxes": boxes[torch.tensor(keep, dtype=torch.bool)],
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.with_masks:
            if anns:
                target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]))
            else:
                target["masks"] = torch.zeros(0, height, width, dtype=torch.uint8)
        return target

    def __getitem__(self, index: int) -> Tuple[Tensor, Target]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = self._target(image_id, image.shape[1], image.shape[2])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def load_split(data_dir: PathLike, split: str, **kwargs: Any) -> CocoDetection:
    """The split ``split`` of a COCO-layout folder: ``DIR/annotations/instances_{split}.json`` + ``DIR/{split}/``.

    Keyword arguments go to :class:`CocoDetection`. Raises :class:`AnnotationError` listing the splits that
    exist when the annotation file or the image folder of ``split`` is missing.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise AnnotationError(f"data folder {root} does not exist (expected annotations/instances_<split>.json "
                              f"and one image folder per split)")
    ann_file = root / "annotations" / f"instances_{split}.json"
    image_dir = root / split
    missing = [str(p) for p in (ann_file, image_dir) if not (p.is_file() if p is ann_file else p.is_dir())]
    if missing:
        found = sorted(p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json"))
        complete = [s for s in found if (root / s).is_dir()]
        raise AnnotationError(f"split {split!r} of {root} is incomplete: missing {' and '.join(missing)}. "
                              f"Splits with both an annotation file and an image folder: "
                              f"{', '.join(complete) if complete else 'none'}"
                              + (f" (annotation files found for: {', '.join(found)})" if found != complete else ""))
    return CocoDetection(image_dir, ann_file, **kwargs)


def collate_fn(batch: Sequence[Tuple[Tensor, Target]]) -> Tuple[List[Tensor], List[Target]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``: torchvision detectors take lists
    (images of different sizes are batched inside the model)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
