"""Prediction: models rebuilt from checkpoints, images read and detections drawn; loss-curve plots."""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import TinyShapes, tiny_detector
from dcnv2.engine import ModelSpec, TrainConfig, load_model, predict_images, read_image, train
from dcnv2.engine import predict as predict_mod
from dcnv2.engine.plots import plot_loss_curves, read_log, save_detections


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny Mask R-CNN trained a few steps with a ModelSpec, once for the module's tests."""
    data = TinyShapes(n=4, flip=False)
    spec = ModelSpec(arch="mask_rcnn", preset="tiny", backbone="tiny", num_classes=3, class_names=["square", "bar"],
                     label_to_category_id=data.label_to_category_id, min_size=48, max_size=48)
    model = tiny_detector(masks=True)
    run = tmp_path_factory.mktemp("predict") / "run"
    train(model, data, TrainConfig(out=str(run), max_iters=4, batch_size=2, warmup_iters=1, lr_steps=(),
                                   num_workers=0, progress=False), model_spec=spec)
    return run, model, data


@pytest.fixture
def trained(trained_run, monkeypatch):
    """:func:`trained_run`, with ``build_model`` rebuilding the tiny model."""
    monkeypatch.setattr(predict_mod, "build_model", lambda s, inference=False: tiny_detector(masks=s.has_masks, seed=99))
    return trained_run


def _write_png(path, image):
    from PIL import Image

    Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def test_load_model_restores_weights_and_spec(trained):
    run, model, _ = trained
    for name in ("model_final.pth", "checkpoint_last.pth"):
        loaded, spec = load_model(run / name)
        assert spec.arch == "mask_rcnn" and spec.label_to_category_id == {1: 10, 2: 20}
        assert spec.class_name(1) == "square" and spec.class_name(2) == "bar"
        assert not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k


def test_load_model_without_spec_is_rejected(tmp_path):
    from dcnv2.engine import save_checkpoint

    save_checkpoint({"model": tiny_detector().state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="no model_spec"):
        load_model(tmp_path / "bare.pth")


def test_predict_images_writes_pngs(trained, tmp_path):
    run, _, data = trained
    model, spec = load_model(run / "model_final.pth")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        _write_png(paths[-1], data.items[i][0])
    assert torch.allclose(read_image(paths[0]), data.items[0][0], atol=1 / 255)
    report = predict_images(model, spec, paths, tmp_path / "pred", score_threshold=0.0)
    assert [r["output"] for r in report] == [str(tmp_path / "pred" / f"img{i}.png") for i in range(2)]
    for r in report:
        img = read_image(r["output"])
        assert img.shape[0] == 3 and min(img.shape[1:]) >= 48
        for d in r["detections"]:
            assert d["class"] in {"square", "bar"} and d["category_id"] in {10, 20} and len(d["box"]) == 4
    json.dumps(report)
    # a missing file is reported in its entry and does not stop the images after it
    missing = predict_images(model, spec, [tmp_path / "nope.png", paths[0]], tmp_path / "pred")
    assert "nope.png" in missing[0]["error"] and "not found" in missing[0]["error"] and "output" in missing[1]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(tmp_path / "bad.png")


def test_save_detections_draws_boxes_and_masks(tmp_path):
    image = torch.zeros(3, 40, 40)
    masks = torch.zeros(2, 1, 40, 40)
    masks[0, 0, 5:15, 5:15] = 1
    pred = {"boxes": torch.tensor([[5.0, 5, 15, 15], [20, 20, 35, 30]]), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.3]), "masks": masks}
    assert save_detections(image, pred, tmp_path / "a.png", score_threshold=0.5) == 1
    assert save_detections(image, pred, tmp_path / "b.png", score_threshold=0.1) == 2
    a, b = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert a.sum() > 0 and b.sum() > a.sum()  # something drawn on black; the second box adds more


def test_loss_curve_plot(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"iter": i, "loss": 2.0 / i, "loss_classifier": 1.0 / i} for i in range(1, 6)]
    log.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"iter": 6, "event": "non-finite loss", "loss": NaN}\n')
    assert len(read_log(log)) == 5
    out = plot_loss_curves({"run": log}, tmp_path / "loss.png")
    assert read_image(out).shape[0] == 3


def test_moving_average_and_smoothed_loss_plot(tmp_path):
    from dcnv2.engine.plots import moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 1).tolist() == [2.0, 4.0]
    log = tmp_path / "log.jsonl"
    g = torch.Generator().manual_seed(0)
    noisy = (torch.linspace(2, 0.5, 60) + 0.3 * torch.rand(60, generator=g)).tolist()
    log.write_text("\n".join(json.dumps({"iter": i + 1, "loss": v}) for i, v in enumerate(noisy)) + "\n")
    raw = plot_loss_curves({"run": log}, tmp_path / "raw.png", smooth=1)
    smoothed = plot_loss_curves({"run": log}, tmp_path / "smooth.png")
    assert not torch.equal(read_image(raw), read_image(smoothed))  # the average is drawn over the faint values
