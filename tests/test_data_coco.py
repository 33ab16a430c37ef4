"""dcnv2.data.coco: COCO files -> torchvision targets, and every kind of broken file reported with its ids."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcnv2.data import AnnotationError, CocoDetection, collate_fn, load_split

pycocotools_mask = pytest.importorskip("pycocotools.mask")


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a 0/1 mask: run lengths in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def base_dataset() -> dict:
    """Images 5 (RGB 12x10), 2 (grayscale 8x6), 9 (no annotations), 7 (only a crowd); categories 10, 3, 7."""
    h5, w5 = 10, 12
    return {
        "images": [
            {"id": 5, "file_name": "five.png", "width": w5, "height": h5},
            {"id": 2, "file_name": "two.png", "width": 8, "height": 6},
            {"id": 9, "file_name": "nine.png", "width": 7, "height": 5},
            {"id": 7, "file_name": "seven.png", "width": 6, "height": 6},
        ],
        "categories": [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 2, 6, 4], "area": 24.0, "iscrowd": 0,
             "segmentation": rect_polygon(2, 2, 8, 6)},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [1, 6, 3, 3], "area": 9.0, "iscrowd": 0,
             "segmentation": uncompressed_rle(rect_mask(h5, w5, 1, 6, 4, 9))},
            {"id": 3, "image_id": 5, "category_id": 10, "bbox": [9, 0, 3, 5], "area": 15.0, "iscrowd": 0,
             "segmentation": compressed_rle(rect_mask(h5, w5, 9, 0, 12, 5))},
            {"id": 4, "image_id": 5, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4.0, "iscrowd": 1,
             "segmentation": uncompressed_rle(rect_mask(h5, w5, 0, 0, 2, 2))},
            {"id": 11, "image_id": 2, "category_id": 10, "bbox": [1, 1, 4, 3], "iscrowd": 0,  # no area: filled in
             "segmentation": rect_polygon(1, 1, 5, 4)},
            {"id": 12, "image_id": 7, "category_id": 7, "bbox": [0, 0, 3, 3], "area": 9.0, "iscrowd": 1,
             "segmentation": compressed_rle(rect_mask(6, 6, 0, 0, 3, 3))},
        ],
    }


def write_images(image_dir: Path, d: dict) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    for img in d["images"]:
        w, h = img["width"], img["height"]
        if img["file_name"] == "two.png":
            Image.new("L", (w, h), 51).save(image_dir / img["file_name"])
        else:
            arr = np.zeros((h, w, 3), np.uint8)
            arr[0, 0] = (255, 0, 128)
            Image.fromarray(arr).save(image_dir / img["file_name"])


def write_set(root: Path, d: dict) -> tuple:
    """``d`` as ``root/ann.json`` and the base set's images in ``root/images``."""
    root.mkdir(parents=True, exist_ok=True)
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(d))
    write_images(root / "images", base_dataset())
    return root / "images", ann_file


@pytest.fixture
def coco_set(tmp_path):
    d = base_dataset()
    image_dir, ann_file = write_set(tmp_path, d)
    return image_dir, ann_file


def broken(tmp_path, mutate, *, with_masks=True):
    """Writes the base set after ``mutate(d)`` and returns the AnnotationError message of loading it."""
    d = base_dataset()
    write_images(tmp_path / "images", d)
    mutate(d)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(d))
    with pytest.raises(AnnotationError) as info:
        CocoDetection(tmp_path / "images", ann_file, with_masks=with_masks)
    msg = str(info.value)
    assert str(ann_file) in msg
    return msg


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_boxes_labels_masks(coco_set):
    image_dir, ann_file = coco_set
    ds = CocoDetection(image_dir, ann_file)
    assert ds.ids == [2, 5, 7, 9] and len(ds) == 4
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 10}
    assert ds.category_id_to_label == {3: 1, 7: 2, 10: 3}
    assert ds.class_names == ["three", "seven", "ten"] and ds.num_classes == 4

    image, t = ds[ds.ids.index(5)]
    assert image.dtype == torch.float32 and image.shape == (3, 10, 12)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    assert t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0 and int(t["image_id"]) == 5
    # the crowd annotation (id 4) is not a training target; the other three in file order
    assert t["boxes"].dtype == torch.float32
    assert t["boxes"].tolist() == [[2, 2, 8, 6], [1, 6, 4, 9], [9, 0, 12, 5]]
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [2, 1, 3]
    assert t["area"].dtype == torch.float32 and t["area"].tolist() == [24, 9, 15]
    assert t["iscrowd"].dtype == torch.int64 and t["iscrowd"].tolist() == [0, 0, 0]
    masks = t["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, 10, 12)
    expected = [rect_mask(10, 12, 2, 2, 8, 6), rect_mask(10, 12, 1, 6, 4, 9), rect_mask(10, 12, 9, 0, 12, 5)]
    for m, e in zip(masks, expected):
        assert torch.equal(m, torch.from_numpy(e))
    assert int(masks[0].sum()) == 24  # the 6x4 rectangle polygon covers exactly its pixels

    # the crowd region is still in the ground truth the evaluator reads
    assert ds.coco.anns[4]["iscrowd"] == 1 and 4 in {a["id"] for a in ds.coco.imgToAnns[5]}


def test_grayscale_becomes_rgb_and_missing_area_filled(coco_set):
    ds = CocoDetection(*coco_set)
    image, t = ds[ds.ids.index(2)]
    assert image.shape == (3, 6, 8)
    assert torch.allclose(image, torch.full_like(image, 51 / 255))
    assert t["area"].tolist() == [12.0] and ds.coco.anns[11]["area"] == 12.0


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1"])
def test_other_image_modes_become_rgb(tmp_path, mode):
    d = base_dataset()
    image_dir, ann_file = write_set(tmp_path, d)
    Image.new(mode, (7, 5)).save(image_dir / "nine.png")
    ds = CocoDetection(image_dir, ann_file)
    image, _ = ds[ds.ids.index(9)]
    assert image.shape == (3, 5, 7) and image.dtype == torch.float32


def test_empty_images_kept_by_default_and_dropped_for_training(coco_set):
    ds = CocoDetection(*coco_set)
    for image_id in (9, 7):  # no annotations; only a crowd annotation
        image, t = ds[ds.ids.index(image_id)]
        h, w = image.shape[1:]
        assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
        assert t["masks"].shape == (0, h, w) and t["masks"].dtype == torch.uint8
        assert t["area"].shape == (0,) and t["iscrowd"].shape == (0,)
    train = CocoDetection(*coco_set, drop_empty=True)
    assert train.ids == [2, 5]


def test_without_masks(coco_set):
    ds = CocoDetection(*coco_set, with_masks=False)
    _, t = ds[ds.ids.index(5)]
    assert "masks" not in t and t["boxes"].shape == (3, 4)


def test_boxes_clipped_to_the_image_and_empty_ones_dropped(tmp_path):
    def mutate(d):
        d["annotations"][0]["bbox"] = [-2, 3, 20, 4]     # sticks out left and right
        d["annotations"][1]["bbox"] = [12, 0, 3, 3]     # entirely right of the 12 px wide image
    d = base_dataset()
    mutate(d)
    image_dir, ann_file = write_set(tmp_path, d)
    ds = CocoDetection(image_dir, ann_file)
    _, t = ds[ds.ids.index(5)]
    assert t["boxes"].tolist() == [[0, 3, 12, 7], [9, 0, 12, 5]]
    assert t["labels"].tolist() == [2, 3] and t["masks"].shape[0] == 2 and t["area"].shape == (2,)


def test_transforms_are_applied(coco_set):
    calls = []

    def transform(image, target):
        calls.append(int(target["image_id"]))
        return image * 0, dict(target, seen=torch.tensor(1))

    ds = CocoDetection(*coco_set, transforms=transform)
    image, t = ds[0]
    assert calls == [2] and float(image.abs().sum()) == 0 and "seen" in t


def test_pycocotools_prints_nothing(coco_set, capsys):
    CocoDetection(*coco_set)
    assert capsys.readouterr().out == ""


def test_collate_fn_returns_lists(coco_set):
    ds = CocoDetection(*coco_set)
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert images[1].shape == (3, 10, 12) and int(targets[1]["image_id"]) == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert [int(t["image_id"]) for t in targets] == [2, 5, 7]
    assert collate_fn([]) == ([], [])


# ---------------------------------------------------------------------------------------------------- load_split


def test_load_split_layout(tmp_path):
    d = base_dataset()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(d))
    write_images(tmp_path / "val", d)
    ds = load_split(tmp_path, "val", drop_empty=True, with_masks=False)
    assert isinstance(ds, CocoDetection) and ds.ids == [2, 5] and ds.image_dir == tmp_path / "val"


def test_load_split_missing_split_lists_existing(tmp_path):
    d = base_dataset()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(d))
    (tmp_path / "annotations" / "instances_test.json").write_text(json.dumps(d))  # no test/ images
    write_images(tmp_path / "val", d)
    with pytest.raises(AnnotationError) as info:
        load_split(tmp_path, "train")
    msg = str(info.value)
    assert "instances_train.json" in msg and "'train'" in msg and "val" in msg and "test" in msg
    with pytest.raises(AnnotationError, match=r"missing .*test"):
        load_split(tmp_path, "test")
    with pytest.raises(AnnotationError, match="does not exist"):
        load_split(tmp_path / "nowhere", "val")


# ---------------------------------------------------------------------------------------------------- broken files


def test_missing_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(AnnotationError, match="does not exist") as info:
        CocoDetection(tmp_path / "images", tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


def test_missing_image_dir(tmp_path, coco_set):
    _, ann_file = coco_set
    with pytest.raises(AnnotationError, match="image folder .*missing_dir.* does not exist"):
        CocoDetection(tmp_path / "missing_dir", ann_file)


def test_invalid_json_names_line_and_column(coco_set):
    image_dir, ann_file = coco_set
    ann_file.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(AnnotationError) as info:
        CocoDetection(image_dir, ann_file)
    msg = str(info.value)
    assert str(ann_file) in msg and "line 2" in msg and "column" in msg
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_truncated_json(coco_set):
    image_dir, ann_file = coco_set
    ann_file.write_text(json.dumps(base_dataset())[:100])
    with pytest.raises(AnnotationError, match="not valid JSON"):
        CocoDetection(image_dir, ann_file)


def test_binary_garbage_json(coco_set):
    image_dir, ann_file = coco_set
    ann_file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AnnotationError) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


@pytest.mark.parametrize("content, fragment", [
    ([], "top level must be a JSON object"),
    ({"images": [], "categories": []}, "'annotations' (missing)"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' (dict)"),
])
def test_top_level_structure(coco_set, content, fragment):
    image_dir, ann_file = coco_set
    ann_file.write_text(json.dumps(content))
    with pytest.raises(AnnotationError) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value) and fragment in str(info.value)


def test_duplicate_image_id(tmp_path):
    msg = broken(tmp_path, lambda d: d["images"].append(dict(d["images"][0], file_name="two.png")))
    assert "image id 5 appears twice" in msg


def test_duplicate_annotation_id(tmp_path):
    msg = broken(tmp_path, lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])))
    assert "annotation id 1" in msg and "appears twice" in msg and "image id 5" in msg


def test_duplicate_category_id(tmp_path):
    msg = broken(tmp_path, lambda d: d["categories"].append({"id": 3, "name": "again"}))
    assert "category id 3 appears twice" in msg


def test_unknown_image_id(tmp_path):
    msg = broken(tmp_path, lambda d: d["annotations"][2].update(image_id=99))
    assert "annotation id 3 (image id 99)" in msg and "not in 'images'" in msg


def test_unknown_category_id(tmp_path):
    msg = broken(tmp_path, lambda d: d["annotations"][1].update(category_id=42))
    assert "annotation id 2 (image id 5)" in msg and "category id 42" in msg and "not in 'categories'" in msg


@pytest.mark.parametrize("bbox", [
    [1, 2, 3], [1, 2, 3, 4, 5], "1 2 3 4", None, [1, 2, "3", 4], [1, 2, float("nan"), 4],
    [1, float("inf"), 3, 4], [1, 2, float("nan"), float("nan")], [True, 2, 3, 4],
])
def test_bbox_not_four_finite_numbers(tmp_path, bbox):
    def mutate(d):
        d["annotations"][0]["bbox"] = bbox
        if bbox is None:
            del d["annotations"][0]["bbox"]
    msg = broken(tmp_path, mutate)
    assert "annotation id 1 (image id 5)" in msg and "4 finite numbers" in msg


@pytest.mark.parametrize("bbox", [[1, 2, 0, 4], [1, 2, 3, 0], [1, 2, -3, 4], [1, 2, 3, -0.5]])
def test_bbox_non_positive_size(tmp_path, bbox):
    msg = broken(tmp_path, lambda d: d["annotations"][0].update(bbox=bbox))
    assert "annotation id 1 (image id 5)" in msg and "non-positive width or height" in msg


def test_missing_image_files_listed_with_count(tmp_path):
    d = base_dataset()
    d["images"] += [{"id": 100 + k, "file_name": f"gone{k}.png", "width": 4, "height": 4} for k in range(7)]
    image_dir, ann_file = write_set(tmp_path, d)
    with pytest.raises(AnnotationError) as info:
        CocoDetection(image_dir, ann_file)
    msg = str(info.value)
    assert str(ann_file) in msg and str(image_dir) in msg
    assert "7 image file(s) are missing" in msg and "gone0.png (image id 100)" in msg and "and 2 more" in msg
    assert "gone6.png" not in msg


def test_one_missing_image_file(tmp_path):
    d = base_dataset()
    image_dir, ann_file = write_set(tmp_path, d)
    (image_dir / "two.png").unlink()
    with pytest.raises(AnnotationError, match=r"1 image file\(s\) are missing .*two\.png \(image id 2\)"):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize("fix", [{"width": None}, {"height": 0}, {"width": "12"}, {"height": 2.5}])
def test_missing_or_bad_width_height(tmp_path, fix):
    def mutate(d):
        d["images"][0].update(fix)
        for k, v in fix.items():
            if v is None:
                del d["images"][0][k]
    msg = broken(tmp_path, mutate)
    assert "image id 5 needs positive integer 'width' and 'height'" in msg


@pytest.mark.parametrize("seg, fragment", [
    ([[1, 2, 3, 4]], "has 4 coordinates"),
    ([[1, 2, 3, 4, 5, 6, 7]], "has 7 coordinates"),
    ([[1, 2, 3, 4, 5, float("nan")]], "not a finite number"),
    ([], "empty polygon list"),
    ([5, 6, 7, 8, 9, 10], "polygon 0 is a int"),
    ({"counts": "abc"}, "needs 'size' and 'counts'"),
    ({"size": [10, 12]}, "needs 'size' and 'counts'"),
    ({"size": [10], "counts": "abc"}, "size must be [height, width]"),
    ({"size": [12, 10], "counts": "abc"}, "differs from the image's [height, width] [10, 12]"),
    ({"size": [10, 12], "counts": 5}, "counts must be"),
    ("polygon", "not a polygon list or an RLE dict"),
    (None, "has no segmentation"),
])
def test_bad_segmentation(tmp_path, seg, fragment):
    def mutate(d):
        d["annotations"][0]["segmentation"] = seg
        if seg is None:
            del d["annotations"][0]["segmentation"]
    msg = broken(tmp_path, mutate)
    assert "annotation id 1 (image id 5)" in msg and fragment in msg


def test_segmentation_not_checked_without_masks(tmp_path):
    d = base_dataset()
    d["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
    del d["annotations"][1]["segmentation"]
    image_dir, ann_file = write_set(tmp_path, d)
    ds = CocoDetection(image_dir, ann_file, with_masks=False)
    assert ds[ds.ids.index(5)][1]["boxes"].shape == (3, 4)


def test_many_problems_in_one_message(tmp_path):
    def mutate(d):
        for a in d["annotations"]:           # 6 bad boxes
            a["bbox"] = [0, 0, -1, 1]
        d["annotations"][0]["category_id"] = 1234   # + 1
        d["categories"].append({"id": 7})            # + 1 duplicate
    msg = broken(tmp_path, mutate)
    assert "8 problem(s)" in msg and "... and 3 more" in msg
    assert msg.count("\n  - ") == 5
    assert "category id 7 appears twice" in msg and "category id 1234" in msg


def test_truncated_image_file_at_getitem(coco_set):
    image_dir, ann_file = coco_set
    ds = CocoDetection(image_dir, ann_file)
    path = image_dir / "five.png"
    big = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(big).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(OSError) as info:
        ds[ds.ids.index(5)]
    msg = str(info.value)
    assert str(path) in msg and "image id 5" in msg and str(ann_file) in msg


def test_not_an_image_at_getitem(coco_set):
    image_dir, ann_file = coco_set
    ds = CocoDetection(image_dir, ann_file)
    (image_dir / "two.png").write_text("not a png")
    with pytest.raises(OSError, match=r"two\.png \(image id 2"):
        ds[ds.ids.index(2)]


def test_image_size_differs_from_json(coco_set):
    image_dir, ann_file = coco_set
    ds = CocoDetection(image_dir, ann_file)
    Image.new("RGB", (13, 10)).save(image_dir / "five.png")
    with pytest.raises(AnnotationError) as info:
        ds[ds.ids.index(5)]
    msg = str(info.value)
    assert "five.png" in msg and "image id 5" in msg and "13x10" in msg and "12x10" in msg


def test_validation_at_scale_decodes_nothing(tmp_path):
    """2,000 images and 20,000 annotations load (checks + index) without opening an image: the files are empty."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images, anns = [], []
    for i in range(2000):
        (image_dir / f"{i}.jpg").touch()  # never decoded while loading
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48})
        for k in range(10):
            anns.append({"id": 10 * i + k, "image_id": i, "category_id": 1 + k % 3, "bbox": [1, 2, 10.5, 8],
                         "area": 84.0, "iscrowd": 0, "segmentation": [[1, 2, 11.5, 2, 11.5, 10, 1, 10]]})
    ann_file = tmp_path / "big.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    ds = CocoDetection(image_dir, ann_file, drop_empty=True)
    assert len(ds) == 2000 and len(ds.coco.getAnnIds()) == 20000
    with pytest.raises(OSError, match="0.jpg"):  # decoding happens on access only
        ds[0]


# ---------------------------------------------------------------------------------------------------- end to end


def _shapes_set(root: Path, n: int = 4, size: int = 40) -> tuple:
    """``n`` images with 1-2 coloured rectangles each (categories 5 and 9), polygon masks."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    (root / "images").mkdir(parents=True)
    for i in range(n):
        arr = (rng.random((size, size + 8, 3)) * 30).astype(np.uint8)
        for _ in range(1 + i % 2):
            w, h = rng.integers(8, 16, 2)
            x0, y0 = int(rng.integers(0, size + 8 - w)), int(rng.integers(0, size - h))
            x1, y1 = x0 + int(w), y0 + int(h)
            cat = 5 if len(anns) % 2 == 0 else 9
            arr[y0:y1, x0:x1] = (230, 40, 40) if cat == 5 else (40, 80, 230)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                         "segmentation": rect_polygon(x0, y0, x1, y1)})
        Image.fromarray(arr).save(root / "images" / f"{i + 1}.png")
        images.append({"id": i + 1, "file_name": f"{i + 1}.png", "width": size + 8, "height": size})
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 9, "name": "bar"}, {"id": 5, "name": "square"}]}))
    return root / "images", ann_file


@pytest.mark.parametrize("masks", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_one_training_step_of_a_torchvision_detector(tmp_path, masks):
    from engine_support import tiny_detector

    from dcnv2.data import transforms as T

    torch.manual_seed(0)
    ds = CocoDetection(*_shapes_set(tmp_path), with_masks=masks, drop_empty=True,
                       transforms=T.Compose([T.RandomHorizontalFlip(0.5)]))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    model = tiny_detector(num_classes=ds.num_classes, masks=masks, size=40).train()
    losses = model(images, targets)
    if masks:
        assert "loss_mask" in losses
    loss = sum(losses.values())
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
