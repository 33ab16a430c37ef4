"""PASCAL VOC data: the layout written by the test (XML, image sets, JPEGs, label PNGs), parsing and its checks,
the VOC07 11-point and area AP on hand-made detections, `dcnv2 train` / `eval` / `data check` on it (detection:
VOC mAP and COCO AP; segmentation: mIoU)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dcnv2.data.coco import AnnotationError
from dcnv2.data.voc import (VOC_CLASSES, VOCDetection, VOCSegmentation, check_voc, find_voc_root, parse_annotation,
                            voc_splits)
from dcnv2.engine.voc_eval import format_voc_table, voc_ap, voc_class_ap, voc_evaluate

W, H = 64, 48
CAT, DOG = VOC_CLASSES.index("cat") + 1, VOC_CLASSES.index("dog") + 1


def _xml(name, objects, width=W, height=H):
    objs = "".join(
        f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>" for cls, (x1, y1, x2, y2), difficult in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>1</segmented>{objs}</annotation>")


def write_voc(root: Path, splits=(("train", 4), ("val", 2)), seed=0) -> Path:
    """VOCdevkit/VOC2007 with cats (squares, red) and dogs (bars, blue), one object of each per image, the second
    image of every split with a difficult third object; label PNGs with 255 on object borders."""
    from PIL import Image

    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in splits:
        names = []
        for i in range(n):
            name = f"{k:06d}"
            k += 1
            img = (rng.random((H, W, 3)) * 30).astype(np.uint8)
            labels = np.zeros((H, W), dtype=np.uint8)
            objects = []
            x = int(rng.integers(2, 10))
            for cls, color, (w, h) in (("cat", (230, 40, 40), (16, 16)), ("dog", (40, 60, 230), (22, 8))):
                y = int(rng.integers(2, H - h - 2))
                img[y:y + h, x:x + w] = color
                labels[y:y + h, x:x + w] = VOC_CLASSES.index(cls) + 1
                labels[y, x:x + w] = 255  # VOC's ignored object border (top edge here)
                objects.append((cls, (x + 1, y + 1, x + w, y + h), False))  # 1-based inclusive corners
                x += w + 6
            if i == 1:
                objects.append(("dog", (50, 30, 60, 40), True))
            Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            png = Image.fromarray(labels, mode="P")
            png.putpalette([0, 0, 0, 128, 0, 0] * 128)
            png.save(voc / "SegmentationClass" / f"{name}.png")
            (voc / "Annotations" / f"{name}.xml").write_text(_xml(name, objects))
            names.append(name)
        for sets in ("Main", "Segmentation"):
            (voc / "ImageSets" / sets / f"{split}.txt").write_text("\n".join(names) + "\n")
        (voc / "ImageSets" / "Main" / f"cat_{split}.txt").write_text("".join(f"{n}  1\n" for n in names))
    return voc


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("voc"))


def test_layout_splits_and_parsing(voc_root):
    assert find_voc_root(voc_root.parent.parent) == voc_root  # the folder holding VOCdevkit/VOC2007
    assert voc_splits(voc_root) == ["train", "val"]  # without the per-class lists (cat_train.txt)
    ann = parse_annotation(voc_root / "Annotations" / "000001.xml")
    assert (ann["width"], ann["height"]) == (W, H)
    assert [o["name"] for o in ann["objects"]] == ["cat", "dog", "dog"]
    assert [o["difficult"] for o in ann["objects"]] == [False, False, True]
    assert ann["objects"][2]["box"] == [49.0, 29.0, 60.0, 40.0]  # (xmin - 1, ymin - 1, xmax, ymax)

    ds = VOCDetection(voc_root, "train")
    assert len(ds) == 4 and ds.num_classes == 21 and ds.class_names[CAT - 1] == "cat"
    image, target = ds[1]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert target["labels"].tolist() == [CAT, DOG, DOG] and target["difficult"].tolist() == [False, False, True]
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert (x2 - x1, y2 - y1) == (16, 16)  # a 16-pixel square, as drawn
    # the COCO ground truth: difficult objects are crowd (ignored) regions, boxes xywh
    coco = ds.coco
    assert sorted(coco.getImgIds()) == ds.ids and len(coco.getAnnIds(iscrowd=True)) == 1
    assert coco.loadAnns(coco.getAnnIds(imgIds=[2], iscrowd=True))[0]["bbox"] == [49.0, 29.0, 11.0, 11.0]


def test_single_object_and_no_object_files(tmp_path):
    one = tmp_path / "one.xml"
    one.write_text(_xml("one", [("person", (1, 1, 10, 20), False)]))
    assert [o["label"] for o in parse_annotation(one)["objects"]] == [VOC_CLASSES.index("person") + 1]
    none = tmp_path / "none.xml"
    none.write_text(_xml("none", []))
    assert parse_annotation(none)["objects"] == []


@pytest.mark.parametrize("text, expected", [
    ("<annotation><size><width>64</width>", r"malformed XML at line 1, column"),
    (_xml("x", [("unicorn", (1, 1, 5, 5), False)]), r"class 'unicorn', not one of the 20 classes"),
    (_xml("x", [("cat", (10, 1, 5, 5), False)]), r"xmax < xmin"),
    (_xml("x", [("cat", (1, 1, 5, 5), False)], width=0), r"positive integer <width> and <height>"),
    (_xml("x", [("cat", ("a", 1, 5, 5), False)]), r"bndbox> needs finite numbers"),
    ("<root/>", r"root element must be <annotation>"),
])
def test_malformed_xml_is_named_by_file(tmp_path, text, expected):
    path = tmp_path / "broken_0042.xml"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=expected) as info:
        parse_annotation(path)
    assert str(path) in str(info.value)


def test_a_broken_file_fails_the_split_and_data_check_names_it(tmp_path, capsys):
    from dcnv2.cli import main

    voc = write_voc(tmp_path, splits=(("train", 3),))
    (voc / "Annotations" / "000001.xml").write_text("<annotation><object><name>cat</name>")
    (voc / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"2 problem\(s\)") as info:
        VOCDetection(voc, "train")
    assert "000001.xml: malformed XML" in str(info.value) and "000002.jpg is missing" in str(info.value)
    assert main(["data", "check", str(voc)]) == 1
    out = capsys.readouterr().out
    assert "000001.xml: malformed XML at line 1" in out and "JPEGImages/000002.jpg is missing" in out
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(voc)]) == 2  # clean error


def test_data_check_summarises_detection_and_segmentation(voc_root, capsys):
    from dcnv2.cli import main

    assert main(["data", "check", str(voc_root), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "[detection train]: 4 images (0 without objects), 9 objects (1 difficult)" in out
    assert "| 8 | cat | 4 |" in out and "| 12 | dog | 5 |" in out
    assert "[segmentation val]: 2 images with label PNGs; classes present: background, cat, dog" in out
    report = check_voc(voc_root, ["val"])
    assert report.ok and len(report.summaries) == 2


def test_segmentation_samples_keep_ignore_and_flip_with_the_image(voc_root):
    from dcnv2.data import transforms as T

    ds = VOCSegmentation(voc_root, "val")
    assert ds.num_classes == 21 and len(ds) == 2
    image, target = ds[0]
    sem = target["semantic"]
    assert sem.dtype == torch.int64 and sem.shape == (H, W)
    assert set(sem.unique().tolist()) == {0, CAT, DOG, 255}
    torch.manual_seed(0)
    flipped = VOCSegmentation(voc_root, "val", transforms=T.Compose([T.RandomHorizontalFlip(1.0)]))
    fimage, ftarget = flipped[0]
    assert torch.equal(fimage, image.flip(-1)) and torch.equal(ftarget["semantic"], sem.flip(-1))


def test_bad_label_png_is_named(tmp_path):
    from PIL import Image

    voc = write_voc(tmp_path, splits=(("val", 1),))
    png = voc / "SegmentationClass" / "000000.png"
    Image.fromarray(np.full((H, W), 40, dtype=np.uint8), mode="L").save(png)
    with pytest.raises(AnnotationError, match=r"000000.png: class indices must be 0..20 or 255.*\[40\]"):
        VOCSegmentation(voc, "val")[0]
    report = check_voc(voc, decode=True)
    assert not report.ok and any("000000.png: class indices" in p for p in report.problems)


# ---------------------------------------------------------------------------------------------------------
# VOC AP, exact


def test_voc_ap_11_point_and_area_by_hand():
    # 2 positives; detections in score order: TP, FP, TP -> recall 0.5, 0.5, 1; precision 1, 1/2, 2/3
    rec, prec = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))


def test_voc_evaluate_on_hand_made_detections():
    box = lambda x, y, w, h: [x, y, x + w, y + h]  # noqa: E731
    gt = {
        1: {"boxes": torch.tensor([box(0, 0, 10, 10), box(20, 20, 10, 10), box(40, 0, 10, 10)], dtype=torch.float32),
            "labels": torch.tensor([CAT, CAT, DOG]), "difficult": torch.tensor([False, False, True])},
        2: {"boxes": torch.tensor([box(0, 0, 20, 20)], dtype=torch.float32), "labels": torch.tensor([DOG]),
            "difficult": torch.tensor([False])},
    }
    pred = {
        1: {"boxes": torch.tensor([box(0, 0, 10, 10), box(0, 1, 10, 10), box(60, 60, 5, 5), box(20, 20, 10, 9),
                                   box(40, 0, 10, 10)], dtype=torch.float32),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95]),
            "labels": torch.tensor([CAT, CAT, CAT, CAT, DOG])},
        2: {"boxes": torch.tensor([box(0, 0, 20, 20), box(1, 1, 20, 20)], dtype=torch.float32),
            "scores": torch.tensor([0.3, 0.5]), "labels": torch.tensor([DOG, DOG])},
    }
    out = voc_evaluate(pred, gt, VOC_CLASSES)
    # cat: 0.9 TP, 0.8 FP (duplicate of the matched box, IoU 0.82), 0.7 FP (no overlap), 0.6 TP (IoU 0.9)
    cat = out["per_class"]["cat"]
    assert (cat["positives"], cat["tp"], cat["fp"]) == (2, 2, 2)
    assert cat["AP07"] == pytest.approx((6 * 1.0 + 5 * 0.5) / 11) and cat["AP"] == pytest.approx(0.5 + 0.5 * 0.5)
    # dog: 0.95 on the difficult box is ignored; 0.5 TP (IoU 0.82 > 0.5), 0.3 FP (its box is taken)
    dog = out["per_class"]["dog"]
    assert (dog["positives"], dog["tp"], dog["fp"]) == (1, 1, 1)
    assert dog["AP07"] == pytest.approx(1.0) and dog["AP"] == pytest.approx(1.0)
    # classes without positives have no AP and stay out of the means
    assert out["per_class"]["person"]["AP"] is None
    assert out["mAP"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["mAP07"] == pytest.approx(((6 + 2.5) / 11 + 1.0) / 2)
    table = format_voc_table({"m": out}, per_class=False)
    assert table.splitlines()[2] == f"| m | {100 * out['mAP07']:.1f} | 87.5 |"
    with pytest.raises(ValueError, match=r"labels \[0\], expected 1..20"):
        voc_evaluate({1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}}, gt,
                     VOC_CLASSES)


def test_iou_threshold_is_strict_as_in_the_devkit():
    gt = {1: (np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([False]))}
    half = [(1, 1.0, np.array([0.0, 0.0, 10.0, 5.0]))]  # IoU exactly 0.5: not a match (ovmax > 0.5)
    assert voc_class_ap(half, gt)["tp"] == 0


class _Oracle(torch.nn.Module):
    """Returns the ground truth (non-difficult objects, and one detection on each difficult one) of the image."""

    def __init__(self, dataset):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.transform = GeneralizedRCNNTransform(H, W, [0.0] * 3, [1.0] * 3)
        self.roi_heads = torch.nn.Module()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.by_sum = {float(img.sum()): t for img, t in (dataset[i] for i in range(len(dataset)))}

    def forward(self, images):
        t = self.by_sum[float(images[0].sum())]
        n = len(t["labels"])
        return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, n)}]


def test_evaluate_on_voc_gives_voc_and_coco_ap(voc_root, tmp_path):
    from dcnv2.engine import evaluate

    ds = VOCDetection(voc_root, "val")
    out = evaluate(_Oracle(ds), ds, progress=False, out_dir=tmp_path)
    assert out["voc"]["mAP07"] == pytest.approx(1.0) and out["voc"]["mAP"] == pytest.approx(1.0)
    assert out["metrics"]["bbox"]["AP50"] == pytest.approx(1.0)  # the difficult detection hits an ignored region
    assert json.loads((tmp_path / "voc_metrics.json").read_text())["per_class"]["cat"]["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# the command line


def test_train_a_step_and_evaluate_detection(voc_root, tmp_path, capsys):
    from dcnv2.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(voc_root.parent.parent), "--out", str(run), "--preset", "mdconv-c3c5-mdpool",
                 "--backbone", "resnet18", "--fpn", "--min-size", "48", "--max-size", "64", "--max-iters", "1",
                 "--batch-size", "2", "--warmup-iters", "1", "--lr-steps", "--workers", "0", "--no-progress",
                 "--no-tensorboard", "--model-arg", "rpn_post_nms_top_n_train=100",
                 "--model-arg", "box_batch_size_per_image=32", "--model-arg", "feature_channels=16",
                 "--model-arg", "representation_size=32", "--model-arg", "mdpool_hidden=16",
                 "--eval-split", "val"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| model | mAP (VOC07 11-point) | mAP (area) |" in out and "| model | type | AP |" in out
    from dcnv2.engine import load_checkpoint

    spec = load_checkpoint(run / "model_final.pth")["model_spec"]
    assert spec["num_classes"] == 21 and spec["class_names"][CAT - 1] == "cat"
    assert main(["eval", "--checkpoint", str(run / "model_final.pth"), "--data", str(voc_root), "--split", "val",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert "mAP (VOC07 11-point)" in capsys.readouterr().out
    voc = json.loads((tmp_path / "eval" / "voc_metrics.json").read_text())
    assert 0.0 <= voc["mAP07"] <= 1.0 and set(voc["per_class"]) == set(VOC_CLASSES)
    # VOC detection has no instance masks
    assert main(["train", "--arch", "mask_rcnn", "--data", str(voc_root), "--out", str(tmp_path / "m")]) == 2
    assert "boxes only" in capsys.readouterr().err


def test_train_a_step_and_evaluate_segmentation(voc_root, tmp_path, capsys):
    from dcnv2.cli import main

    run = tmp_path / "seg"
    assert main(["train", "--arch", "segmenter", "--preset", "dcnv2", "--backbone", "resnet18", "--data", str(voc_root),
                 "--out", str(run), "--max-iters", "1", "--batch-size", "2", "--min-size", "48", "--max-size", "64",
                 "--workers", "0", "--no-progress", "--no-tensorboard", "--warmup-iters", "1",
                 "--model-arg", "output_stride=16", "--model-arg", "atrous_rates=[1,2,3]"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model_final.pth"), "--data", str(voc_root), "--split", "val",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| model | mIoU | pixel acc |" in out
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())
    labels = np.stack([np.asarray(__import__("PIL.Image").Image.open(voc_root / "SegmentationClass" / f"{n}.png"))
                       for n in ("000004", "000005")])
    assert metrics["pixels"] == int((labels != 255).sum())  # border pixels are ignored
    assert 0.0 <= metrics["mIoU"] <= 1.0
