"""TensorBoard events beside log.jsonl: the logged scalars read back with tensorboard's event reader, the
evaluation's metrics and images from `dcnv2 train` / `train-cls`, a resumed run's purge, and runs without
tensorboard installed (they work and say so once)."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from engine_support import TinyShapes, tiny_detector, log_records as _log, tiny_train_config as _cfg
from dcnv2.cli import main
from dcnv2.engine import train
from dcnv2.engine import tensorboard as tbmod
from dcnv2.engine.train import LOG_FILE


def _events(tb_dir):
    """{tag: [(step, value)]} and {tag: [step]} of the images, over every event file in ``tb_dir``."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]}
    return scalars, images


def test_event_files_hold_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = train(tiny_detector(), TinyShapes(n=4), _cfg(out, max_iters=3))
    assert result["tensorboard"] == out / "tb"
    scalars, _ = _events(out / "tb")
    log = _log(out)
    assert [r["iter"] for r in log] == [1, 2, 3]
    for key in ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "lr"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3], key
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-6), key
    assert "train/iter" not in scalars and "train/epoch" not in scalars


def test_resume_purges_the_interrupted_runs_later_events(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny_detector(), TinyShapes(n=4), _cfg(out, max_iters=4, checkpoint_every=2))
    # as if interrupted after iteration 4 with the last checkpoint at 2: rerun 3-4 from the checkpoint
    from dcnv2.engine import load_checkpoint, save_checkpoint

    state = load_checkpoint(out / "checkpoint_last.pth")
    assert state["iteration"] == 4
    train(tiny_detector(), TinyShapes(n=4), _cfg(tmp_path / "two", max_iters=2, checkpoint_every=2))
    save_checkpoint(load_checkpoint(tmp_path / "two" / "checkpoint_last.pth"), out / "checkpoint_last.pth")
    train(tiny_detector(), TinyShapes(n=4), _cfg(out, max_iters=4, checkpoint_every=2), resume=True)
    scalars, _ = _events(out / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]  # no step twice
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in _log(out)], rel=1e-6)


def test_a_resumed_runs_event_file_sorts_after_every_earlier_one(tmp_path):
    # TensorBoard reads files in name order and a purge drops only what was read before it; a file made in
    # the same second as an earlier one can otherwise sort first (counter 10 before 9, another host's name)
    pytest.importorskip("tensorboard")
    import time

    tb_dir = tmp_path / "tb"
    tb_dir.mkdir()
    earlier = tb_dir / f"events.out.tfevents.{int(time.time()):010d}.zzzz-other-host.99999.99"
    earlier.write_bytes(b"")
    with tbmod.TensorBoardLog(tb_dir, purge_step=3) as tb:
        tb.scalars({"train/loss": 1.0}, 3)
    names = sorted(p.name for p in tb_dir.iterdir())
    assert len(names) == 2 and names[0] == earlier.name, names


def test_no_tensorboard_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_detector(), TinyShapes(n=2), _cfg(out, max_iters=1, tensorboard=False))
    assert result["tensorboard"] is None and not (out / "tb").exists()
    assert (out / LOG_FILE).is_file()


def test_without_tensorboard_installed_a_run_works_and_says_so_once(tmp_path, monkeypatch):
    # importing torch.utils.tensorboard fails as it does without the tensorboard package
    for name in list(sys.modules):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(tbmod, "_MISSING_WARNED", False)
    assert not tbmod.tensorboard_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(2):
            result = train(tiny_detector(), TinyShapes(n=2), _cfg(tmp_path / f"run{k}", max_iters=1))
            assert result["iteration"] == 1 and result["tensorboard"] is None
        tbmod.log_evaluation(tmp_path / "run0", 1, {"bbox": {"AP": 0.5}}, prefix="eval_val")
    said = [str(w.message) for w in caught if "tensorboard is not installed" in str(w.message)]
    assert len(said) == 1, said
    assert "pip install 'dcnv2[tb]'" in said[0]
    assert not (tmp_path / "run0" / "tb").exists() and (tmp_path / "run1" / LOG_FILE).is_file()


def test_scalar_tags_skip_coordinates_text_and_non_finite_values():
    rec = {"iter": 3, "epoch": 0, "event": "x", "loss": 1.5, "lr": 0.01, "grad_norm": float("nan"), "ok": True}
    assert tbmod.scalar_tags(rec) == {"train/loss": 1.5, "train/lr": 0.01}


@pytest.mark.slow  # a detector trained, evaluated and drawn through the CLI (~10 s)
def test_train_cli_eval_adds_ap_and_an_image_of_detections(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from dcnv2.data import synthetic

    data = tmp_path / "data"
    synthetic.generate(data, seed=1, num_train=4, num_val=2, image_size=64, progress=False)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--preset", "regular", "--backbone", "resnet18",
            "--fpn", "--min-size", "64", "--max-size", "64", "--max-iters", "2", "--batch-size", "2",
            "--warmup-iters", "1", "--lr-steps", "--workers", "0", "--log-every", "1", "--no-progress",
            "--model-arg", "rpn_post_nms_top_n_train=100", "--model-arg", "box_batch_size_per_image=32",
            "--model-arg", "box_score_thresh=0.0", "--eval-split", "val"]
    assert main(argv) == 0, capsys.readouterr().err
    scalars, images = _events(run / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert scalars["eval_val/bbox/AP50"] == [(2, pytest.approx(metrics["bbox"]["AP50"]))]
    assert images == {"eval_val/detections": [2]}
    assert (run / "eval_val" / "detections.png").is_file()

    # --no-tensorboard: no events at all
    quiet = tmp_path / "quiet"
    assert main([a if a != str(run) else str(quiet) for a in argv] + ["--no-tensorboard"]) == 0
    assert not (quiet / "tb").exists()


def test_train_cls_cli_adds_top1_and_the_confusion_matrix(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from dcnv2.data import synthetic_cls

    data = tmp_path / "cls"
    synthetic_cls.generate(data, seed=3, num_train=6, num_val=3, image_size=32, classes=["circle", "cross"],
                           progress=False)
    run = tmp_path / "run"
    assert main(["train-cls", "--data", str(data), "--preset", "regular", "--backbone", "resnet18",
                 "--image-size", "32", "--batch-size", "3", "--max-iters", "2", "--lr", "0.01", "--workers", "0",
                 "--log-every", "1", "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    scalars, images = _events(run / "tb")
    assert [s for s, _ in scalars["train/loss_cls"]] == [1, 2]
    top1 = json.loads((run / "eval_cls_val" / "metrics.json").read_text())["top1"]
    assert scalars["eval_val/top1"] == [(2, pytest.approx(top1))]
    assert images == {"eval_val/confusion": [2]}
