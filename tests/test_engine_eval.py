"""Evaluation: COCO results conversion, COCOeval numbers, perfect predictions give AP 1, multi-scale merge."""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import TinyShapes, tiny_detector
from dcnv2.engine import TrainConfig, coco_evaluate, evaluate, format_ap_table, to_coco_results, train
from dcnv2.engine.evaluate import METRIC_NAMES, merge_detections


def _ground_truth_as_predictions(data, *, masks=True):
    """Each image's ground truth, phrased as a detector output (score 1, masks as [N,1,H,W] floats)."""
    for img, t in data.items:
        pred = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
        if masks:
            pred["masks"] = t["masks"][:, None].float()
        yield int(t["image_id"]), pred


def _results(data, transform=lambda p: p):
    out = []
    for image_id, pred in _ground_truth_as_predictions(data):
        out += to_coco_results(image_id, transform(pred), data.label_to_category_id)
    return out


def test_perfect_predictions_give_ap_1():
    data = TinyShapes(n=6)
    metrics = coco_evaluate(data.coco, _results(data), ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)
        assert metrics[iou_type]["AR100"] == pytest.approx(1.0)


def test_imperfect_predictions_score_lower():
    data = TinyShapes(n=6)

    def shifted(p):
        return dict(p, boxes=p["boxes"] + torch.tensor([2.0, 0.0, 2.0, 0.0]))

    def relabelled(p):
        return dict(p, labels=3 - p["labels"])

    ap_shift = coco_evaluate(data.coco, _results(data, shifted), ("bbox",))["bbox"]
    assert 0 < ap_shift["AP"] < 1 and ap_shift["AP75"] < ap_shift["AP50"]
    assert coco_evaluate(data.coco, _results(data, relabelled), ("bbox",))["bbox"]["AP"] == 0.0


def test_coco_results_format():
    data = TinyShapes(n=1)
    image_id, pred = next(_ground_truth_as_predictions(data))
    res = to_coco_results(image_id, pred, data.label_to_category_id)
    assert len(res) == len(pred["boxes"])
    x0, y0, x1, y1 = pred["boxes"][0].tolist()
    assert res[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert res[0]["category_id"] == data.label_to_category_id[int(pred["labels"][0])]
    assert isinstance(res[0]["segmentation"]["counts"], str)
    json.dumps(res)  # serialisable as-is
    with pytest.raises(ValueError, match="no category id"):
        to_coco_results(image_id, dict(pred, labels=pred["labels"] + 5), data.label_to_category_id)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    assert to_coco_results(image_id, empty, data.label_to_category_id) == []
    none = coco_evaluate(data.coco, [], ("bbox", "segm"))
    assert none["bbox"]["AP"] == 0.0 and none["segm"]["AR100"] == 0.0
    assert none["bbox"]["APl"] == -1.0  # no large objects in the ground truth


def test_evaluate_tiny_detector_writes_metrics(tmp_path):
    data = TinyShapes(n=4, flip=False)
    model = tiny_detector(masks=True)
    train(model, data, TrainConfig(out=str(tmp_path / "run"), max_iters=10, batch_size=2, lr=0.02, warmup_iters=3,
                                   lr_steps=(), num_workers=0, progress=False))
    model.roi_heads.score_thresh = 0.0  # a barely trained detector: keep its low-confidence detections
    out = evaluate(model, data, out_dir=tmp_path / "eval", progress=False, keep_predictions=2)
    assert set(out["metrics"]) == {"bbox", "segm"}
    for vals in out["metrics"].values():
        assert set(vals) == set(METRIC_NAMES)
        assert all(0.0 <= vals[k] <= 1.0 for k in ("AP", "AP50", "AP75", "AR100"))  # GT exists: no -1 here
    assert len(out["results"]) > 0 and all("segmentation" in r for r in out["results"])
    assert len(out["predictions"]) == 2
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == out["metrics"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == out["results"]
    assert {r["image_id"] for r in out["results"]} <= set(data.ids)
    # multi-scale: every scale runs, merged detections stay within the per-image cap, still COCOeval-able
    multi = evaluate(model, data, scales=(32, 48, 64), progress=False, iou_types=("bbox",))
    assert set(multi["metrics"]) == {"bbox"} and multi["metrics"]["bbox"]["AP50"] >= 0
    assert model.transform.min_size == (48,) and model.transform.max_size == 48  # restored after the scales


def test_merge_detections_per_class_nms():
    a = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.8]),
         "labels": torch.tensor([1, 1])}
    b = {"boxes": torch.tensor([[1.0, 0, 10, 10], [1, 0, 10, 10]]), "scores": torch.tensor([0.95, 0.7]),
         "labels": torch.tensor([1, 2])}
    merged = merge_detections([a, b], iou_threshold=0.5)
    # the two overlapping class-1 boxes collapse to the best one; class 2 is kept although it overlaps
    assert merged["scores"].tolist() == pytest.approx([0.95, 0.8, 0.7])
    assert merged["labels"].tolist() == [1, 1, 2]
    assert len(merge_detections([a, b], max_detections=2)["boxes"]) == 2


def test_format_ap_table():
    table = format_ap_table({"regular": {"bbox": {"AP": 0.5, "AP50": 0.75, "AP75": 0.25, "APs": -1.0,
                                                  "APm": 0.1, "APl": 0.2}}})
    lines = table.splitlines()
    assert lines[0].startswith("| model | type | AP | AP50 | AP75 | APs | APm | APl |")
    assert lines[2] == "| regular | bbox | 50.0 | 75.0 | 25.0 | – | 10.0 | 20.0 |"
