"""`dcnv2 demo` end to end on a tiny set: every output file, the demo's data difficulty, the planned/ran
report; and the object-crop pre-training that initialises the detectors' trunks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcnv2.cli import main

TINY = ["--num-train", "24", "--num-val", "6", "--image-size", "64", "--examples", "2", "--threads", "1",
        "--backbone", "resnet18", "--batch-size", "2", "--pretrain-batch-size", "8"]


def _read_categories(data_dir: Path):
    return json.loads((data_dir / "annotations" / "instances_val.json").read_text())["categories"]


@pytest.mark.slow  # two models pre-trained, trained, evaluated and analysed (~50 s); the time-limit demo test stays in make test
def test_demo_with_fixed_iterations_writes_every_output(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iters", "3", "--pretrain-iters", "2", "--minutes", "30"] + TINY) == 0
    printed = capsys.readouterr().out
    for name in ("ap_table.md", "loss_curves.png", "detections.png", "analysis.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for preset in ("regular", "mdconv-c3c5-mdpool"):
        run = out / "runs" / preset
        assert (run / "model_final.pth").is_file() and (run / "pretrain" / "model_final.pth").is_file()
        assert json.loads((run / "config.json").read_text())["train"]["max_iters"] == 3
    table = (out / "ap_table.md").read_text()
    assert "| regular |" in table and "| mdconv-c3c5-mdpool |" in table and "3 / 3" in table
    assert "top-1" in table                          # the pre-training column
    assert "demo finished in" in printed and "detections.png" in printed and "ahead of" in printed or "behind" in printed
    # the demo's difficulty: 6 classes, objects no larger than 70 % of the side (+ the warp's reach)
    from dcnv2.experiments.demo import DEMO_DATA

    cats = _read_categories(out / "data")
    assert [c["name"] for c in cats] == list(DEMO_DATA["classes"])
    val = json.loads((out / "data" / "annotations" / "instances_val.json").read_text())
    assert val["info"]["config"]["max_objects"] == 3
    per_image = {}
    for a in val["annotations"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert 1 <= a["category_id"] <= 6
    assert max(per_image.values()) <= 3


@pytest.mark.slow  # runs for its 1.5-minute budget by design
def test_demo_on_a_time_budget_reports_planned_and_ran(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "1.5", "--presets", "regular", "--fit-budget",
                 "--pretrain-fraction", "0.3"] + TINY) == 0
    printed = capsys.readouterr().out
    assert "planned" in printed and "ran" in printed
    summary = json.loads((out / "runs" / "summary.json").read_text())["results"]["regular"]
    assert summary["iterations"] >= 1 and summary["planned_iterations"] >= 1
    assert summary["pretrain"]["iterations"] >= 1
    assert (out / "ap_table.md").is_file() and (out / "detections.png").is_file()


def test_demo_data_reused_only_for_the_same_difficulty(tmp_path):
    from dcnv2.experiments.demo import DEMO_DATA, ensure_synthetic_data

    logs = []
    d = ensure_synthetic_data(tmp_path / "d", seed=0, num_train=2, num_val=1, image_size=32, log=logs.append,
                              **DEMO_DATA)
    ensure_synthetic_data(d, seed=0, num_train=2, num_val=1, image_size=32, log=logs.append, **DEMO_DATA)
    assert "reusing" in logs[-1]
    ensure_synthetic_data(d, seed=0, num_train=2, num_val=1, image_size=32, log=logs.append)  # full difficulty
    assert "reusing" not in logs[-1] and len(_read_categories(d)) == 12


def test_object_crops_and_pretrained_trunk_loads_into_the_detector(tmp_path):
    from dcnv2.data import synthetic
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.experiments.pretrain import ObjectCrops, pretrain_backbone
    from dcnv2.experiments.recipes import SyntheticRecipe
    from dcnv2.engine import build_model
    from dcnv2.models.transfer import load_backbone_checkpoint

    synthetic.generate(tmp_path / "d", seed=1, num_train=6, num_val=3, image_size=64, classes=("circle", "star"))
    train_set = load_dataset(tmp_path / "d", "train", train=True, with_masks=False)
    crops = ObjectCrops(train_set, size=32, jitter=False)
    n_objects = sum(len(train_set.coco.imgToAnns.get(i, ())) for i in train_set.ids)
    assert len(crops) == n_objects and crops.class_names == ["circle", "star"]
    image, label = crops[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    # an unjittered crop is the box's neighbourhood: a crop of a 1-object image's window equals roi_align's
    box = crops.crop_box(0)
    side = float((crops.boxes[0, 2:] - crops.boxes[0, :2]).max()) * 1.25 + 4
    assert torch.allclose(box[2:] - box[:2], torch.full((2,), side))
    torch.manual_seed(0)
    jittered = ObjectCrops(train_set, size=32, jitter=True)
    assert not torch.equal(jittered[0][0], crops[0][0]) or not torch.equal(jittered[0][0], jittered[0][0])

    result = pretrain_backbone("mdconv-c3c5-mdpool", train_set, tmp_path / "pre", val_set=train_set, iterations=2,
                               crop_size=32, batch_size=4, progress=False)
    assert result["iterations"] == 2 and 0.0 <= result["accuracy"] <= 1.0
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["model"]
    offsets = {k: v for k, v in state.items() if "offset" in k}
    assert offsets and any(v.abs().sum() > 0 for v in offsets.values())  # the offset branches learned
    spec = SyntheticRecipe(image_size=64).model_spec("mdconv-c3c5-mdpool", train_set)
    det = build_model(spec)
    load_backbone_checkpoint(det, result["checkpoint"], offsets="pretrained")
    body = det.backbone.body.state_dict()
    for key, value in state.items():
        if key.startswith("backbone.") and not key.startswith("backbone.fc."):
            assert torch.equal(body[key[len("backbone."):]], value), key


def test_object_crops_reject_bad_arguments(tmp_path):
    from dcnv2.data import synthetic
    from dcnv2.engine.datasets import load_dataset
    from dcnv2.experiments.pretrain import ObjectCrops

    synthetic.generate(tmp_path / "d", seed=1, num_train=2, num_val=0, image_size=32)
    ds = load_dataset(tmp_path / "d", "train", train=False, with_masks=False)
    with pytest.raises(ValueError, match="size"):
        ObjectCrops(ds, size=4)
    with pytest.raises(ValueError, match="context"):
        ObjectCrops(ds, context=float("nan"))


@pytest.mark.slow  # two whole demo runs compared
def test_demo_fixed_schedule_is_reproducible_for_a_seed(tmp_path):
    """The same seed, schedule and thread count give identical metrics and losses, run after run (across
    thread counts torch's reductions and GEMMs split differently: docs/demo.md gives the difference)."""
    metrics = []
    for k in range(2):
        out = tmp_path / f"demo{k}"
        assert main(["demo", "--out", str(out), "--iters", "3", "--pretrain-iters", "2", "--presets",
                     "mdconv-c3c5-mdpool", "--seed", "3"] + TINY) == 0
        summary = json.loads((out / "runs" / "summary.json").read_text())["results"]["mdconv-c3c5-mdpool"]
        log = (out / "runs" / "mdconv-c3c5-mdpool" / "log.jsonl").read_text().splitlines()
        metrics.append((summary["metrics"], summary["pretrain"]["accuracy"],
                        [{k: v for k, v in json.loads(line).items() if "sec" not in k and k != "eta_s"}
                         for line in log]))
    assert metrics[0] == metrics[1]


def test_demo_reports_phases_its_time_limit_stopped(tmp_path, capsys, monkeypatch):
    """A machine far too slow for the schedule (a simulated clock: every step takes 1000 s): every phase
    stops after its first step, the demo still writes its outputs and says plainly that the table is not
    the schedule's result."""
    from dcnv2.engine import timekeeping

    clock = {"t": 0.0}

    def slow_clock():
        clock["t"] += 1000.0
        return clock["t"]

    monkeypatch.setattr(timekeeping, "now", slow_clock)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iters", "5", "--pretrain-iters", "4", "--presets", "regular"]
                + TINY) == 0
    printed = capsys.readouterr().out
    assert "time limit 25 min" in printed  # the default net: the schedule at --threads 1 on a VM at 65 % speed fits
    assert "STOPPED EARLY" in printed and "NOTE: the time limit stopped regular crop pre-training" in printed
    summary = json.loads((out / "runs" / "summary.json").read_text())["results"]["regular"]
    assert summary["stopped_early"] and summary["iterations"] < 5
    assert summary["pretrain"]["stopped_early"] and summary["pretrain"]["iterations"] < 4
    assert "(stopped early)" in (out / "ap_table.md").read_text()
    # the analysis figure's reserve is read off the same clock: no time is left for it, and the demo says so
    assert "spatial-support analysis figure skipped" in printed and not (out / "analysis.png").exists()


@pytest.mark.parametrize("bad, message", [
    (["--iters", "0"], "--iters: 0 is below 1"), (["--pretrain-iters", "-1"], "--pretrain-iters: -1 is below 0"),
    (["--batch-size", "-2"], "--batch-size: -2 is below 1"), (["--pretrain-batch-size", "0"], "is below 1"),
    (["--minutes", "nan"], "--minutes: nan is not a positive finite number"), (["--lr", "x"], "'x' is not a number"),
    (["--image-size", "8"], "--image-size: 8 is below 32"), (["--num-val", "0"], "--num-val: 0 is below 1")])
def test_bad_numbers_are_refused_before_anything_runs(tmp_path, capsys, bad, message):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(out)] + bad)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()  # no data written, no model trained
