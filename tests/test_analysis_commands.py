"""`dcnv2 analyze figure` and `dcnv2 analyze focus` on small synthetic-data checkpoints of real presets."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dcnv2 import cli
from cli_run import run_cli
from dcnv2.analysis import load_analysis_model

SIZE = 64
KWARGS = dict(feature_channels=16, representation_size=32, mdpool_hidden=16, anchor_sizes=(8, 16, 32, 64, 128),
              roi_canonical_scale=28, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
              rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=32,
              box_batch_size_per_image=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 64-px synthetic set and two ResNet-18-FPN Faster R-CNNs (regular, DCNv2) trained two iterations each."""
    from dcnv2 import data
    from dcnv2.engine import ModelSpec, TrainConfig, train

    root = tmp_path_factory.mktemp("analysis")
    data.synthetic.generate(root / "data", seed=0, num_train=4, num_val=3, image_size=SIZE, min_objects=2)
    train_set = data.load_split(root / "data", "train", with_masks=False)
    ckpts = {}
    for preset in ("regular", "mdconv-c3c5-mdpool"):
        spec = ModelSpec(arch="faster_rcnn", preset=preset, backbone="resnet18", fpn=True,
                         num_classes=train_set.num_classes, class_names=train_set.class_names,
                         label_to_category_id=train_set.label_to_category_id, min_size=SIZE, max_size=SIZE,
                         kwargs=dict(KWARGS))
        from dcnv2.engine.config import build_model

        torch.manual_seed(0)
        model = build_model(spec)
        train(model, train_set, TrainConfig(out=str(root / preset), max_iters=2, batch_size=2, warmup_iters=1,
                                            lr_steps=(), num_workers=0, progress=False, optimizer="adamw",
                                            lr=1e-3), model_spec=spec, collate_fn=data.collate_fn)
        ckpts[preset] = root / preset / "model_final.pth"
    return root, ckpts


# small settings: a 64-px image needs few superpixels and coarse rectangle steps
FAST = ["--n-segments", "8", "--area-step", "0.1", "--greedy", "lazy", "--batch-size", "8"]


def test_figure_command_picks_nodes_and_draws(setup, capsys):
    root, ckpts = setup
    image = sorted((root / "data" / "val").glob("*.png"))[0]
    out = root / "fig.png"
    rc = cli.main(["analyze", "figure", "--checkpoint", str(ckpts["regular"]), "--checkpoint",
                   str(ckpts["mdconv-c3c5-mdpool"]), "--name", "regular", "--name", "dcnv2", "--image", str(image),
                   "--out", str(out)] + FAST)
    assert rc == 0
    text = capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 4 * im.height / 3  # 6 columns x 3 rows
    rows = [line for line in text.splitlines() if line.startswith("| regular") or line.startswith("| dcnv2")]
    assert len(rows) == 6  # small object, large object, background for each model
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] in {"small object", "large object", "background"}
        assert int(cells[3]) == 729  # 3 composed 3x3 layers
        area, err = float(cells[4]), float(cells[5])
        assert 0 <= area <= 100 and 0 <= err < 0.1
        cx, cy = (float(v) for v in re.findall(r"[-\d.]+", cells[2]))
        assert 0 <= cx <= SIZE and 0 <= cy <= SIZE


def test_figure_command_with_given_nodes_and_boxes(setup, tmp_path, capsys):
    root, ckpts = setup
    from PIL import Image

    image = tmp_path / "free.png"  # not part of any data set: nodes must be given
    Image.fromarray((torch.rand(SIZE, SIZE, 3) * 255).to(torch.uint8).numpy()).save(image)
    out = tmp_path / "fig.png"
    rc = cli.main(["analyze", "figure", "--checkpoint", str(ckpts["mdconv-c3c5-mdpool"]), "--image", str(image),
                   "--node", "20,30", "--box", "10,12,40,50", "--out", str(out), "--no-saliency"] + FAST)
    assert rc == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "node (20, 30)" in text and "box (10, 12, 40, 50)" in text
    assert "| 49 |" in text  # 7 x 7 bins of the RoI node
    rc = cli.main(["analyze", "figure", "--checkpoint", str(ckpts["regular"]), "--image", str(image),
                   "--out", str(out)])
    assert rc == 2
    assert "--node" in capsys.readouterr().err


def test_focus_command_prints_and_writes_table(setup, capsys):
    root, ckpts = setup
    out = root / "focus"
    rc = cli.main(["analyze", "focus", "--checkpoint", str(ckpts["regular"]), "--checkpoint",
                   str(ckpts["mdconv-c3c5-mdpool"]), "--data", str(root / "data"), "--split", "val",
                   "--num-images", "1", "--objects-per-image", "1", "--kinds", "image", "roi",
                   "--out", str(out)] + FAST)
    assert rc == 0
    text = capsys.readouterr().out
    head = [line for line in text.splitlines() if line.startswith("| model")][0]
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "model", "node", "nodes", "ERF in box (%)", "ERF in mask (%)", "saliency area (%)", "saliency IoU box (%)",
        "saliency IoU mask (%)"]
    report = json.loads((out / "focus.json").read_text())
    assert (out / "focus.md").read_text().startswith("| model")
    summary = report["summary"]
    assert [(r["model"], r["kind"]) for r in summary] == [("regular", "image"), ("regular", "roi"),
                                                          ("mdconv-c3c5-mdpool", "image"), ("mdconv-c3c5-mdpool", "roi")]
    for row in summary:
        assert row["nodes"] == 1  # one object of the one image
        for key in ("erf_in_box", "erf_in_mask", "sal_area", "sal_iou_box", "sal_iou_mask"):
            assert 0 <= row[key] <= 1, (key, row)
    for rec in report["records"]:
        assert rec["sal_error"] < 0.1 and rec["erf_in_mask"] <= rec["erf_in_box"] + 1e-9 or math.isnan(rec["sal_error"])


def test_mimicking_branch_is_dropped(setup, tmp_path):
    root, ckpts = setup
    from dcnv2.engine import load_checkpoint, save_checkpoint

    state = load_checkpoint(ckpts["regular"])
    state["model"]["mimic.rcnn_classifier.weight"] = torch.zeros(3, 4)
    save_checkpoint(state, tmp_path / "mimic.pth")
    model, spec = load_analysis_model(tmp_path / "mimic.pth")
    ref, _ = load_analysis_model(ckpts["regular"])
    assert not model.training and spec.preset == "regular"
    assert not any(k.startswith("mimic.") for k in model.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_demo_figure_of_trained_models(setup, monkeypatch, capsys):
    root, ckpts = setup
    from dcnv2 import data
    from dcnv2.analysis import report

    # the saliency search is covered above; here the demo's plumbing (image choice, checkpoints, figure)
    monkeypatch.setattr(report, "DEMO_OPTIONS", dict(saliency=False))
    val = data.load_split(root / "data", "val", with_masks=True)
    idx = report.pick_demo_image(val)
    boxes = val[idx][1]["boxes"]
    assert 0 <= idx < len(val) and len(boxes) >= 1
    path, seconds = report.demo_figure({"regular": ckpts["regular"], "dcnv2": ckpts["mdconv-c3c5-mdpool"]}, val,
                                       root / "demo_analysis.png")
    assert path.is_file() and path.stat().st_size > 1000 and seconds > 0
    assert "spatial-support analysis" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# bad input on the same checkpoints, through the CLI (in this process, with what a terminal would show:
# tests/cli_run.py): exit status, the argument or file named, no traceback, and nothing silently moved or NaN

@pytest.mark.parametrize("where,words", [
    (["--box", "100,100,140,130"], ["--box 100,100,140,130 does not overlap the image", "[0, 64] x [0, 64]"]),
    (["--node", "500,10"], ["--node 500,10 is outside the image", "x must be in [0, 64)"]),
    (["--node=-3,10"], ["--node -3,10 is outside the image"]),
    (["--box", "10,10,5,20"], ["--box must be x1,y1,x2,y2 (finite) with x2 > x1"]),
    (["--box", "nan,0,10,10"], ["--box must be x1,y1,x2,y2 (finite)"]),
])
def test_figure_refuses_places_outside_the_image(setup, where, words):
    root, ckpts = setup
    image = sorted((root / "data" / "val").glob("*.png"))[0]
    proc = run_cli("analyze", "figure", "--checkpoint", str(ckpts["regular"]), "--image", str(image),
                           "--out", str(root / "never.png"), *where, *FAST)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for w in words:
        assert w in proc.stderr
    assert "Traceback" not in proc.stderr and not (root / "never.png").exists()


def test_figure_clips_a_box_partly_outside_and_says_so(setup):
    root, ckpts = setup
    image = sorted((root / "data" / "val").glob("*.png"))[0]
    proc = run_cli("analyze", "figure", "--checkpoint", str(ckpts["mdconv-c3c5-mdpool"]), "--image",
                           str(image), "--out", str(root / "clipped.png"), "--box", "40,-10,90,30", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "box (40, 0, 64, 30, clipped to the image)" in proc.stdout
    assert "nan" not in proc.stdout.lower() and (root / "clipped.png").is_file()


def test_image_node_is_never_moved_silently(setup):
    from dcnv2.analysis.nodes import ImageNode, prepare_image, trunk_of

    _, ckpts = setup
    model, _ = load_analysis_model(ckpts["regular"])
    x = prepare_image(model, torch.rand(3, 64, 64)).tensor
    with pytest.raises(ValueError, match=r"outside the 64x64 input: x must be in \[0, 64\)"):
        ImageNode(trunk_of(model), 70.0, 5.0).response(x)


def test_predict_skips_degenerate_and_corrupt_images_and_processes_the_rest(setup, tmp_path):
    from PIL import Image

    root, ckpts = setup
    good = sorted((root / "data" / "val").glob("*.png"))[0]
    thin = tmp_path / "thin.png"
    Image.new("RGB", (900, 3), (200, 10, 10)).save(thin)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "pred"
    proc = run_cli("predict", str(thin), str(broken), str(good), "--checkpoint", str(ckpts["regular"]), "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"image {str(thin)!r} skipped: the 900x3 image would be resized to" in proc.stderr
    assert str(broken) in proc.stderr and "2 of 3 images failed" in proc.stderr
    assert "Traceback" not in proc.stderr and (out / f"{good.stem}.png").is_file()


def test_eval_gives_a_degenerate_image_no_detections_and_names_it(setup):
    from dcnv2.engine import load_model
    from dcnv2.engine.evaluate import inference

    _, ckpts = setup
    model, _ = load_model(ckpts["regular"])
    samples = [(torch.rand(3, 2, 700), {"image_id": torch.tensor(7)}), (torch.rand(3, 64, 64), {"image_id": torch.tensor(8)})]
    with pytest.warns(UserWarning, match="image 7 .* gets no detections at test size 64: the 700x2 image"):
        out = list(inference(model, samples, progress=False))
    assert [i for i, _, _ in out] == [7, 8] and len(out[0][2]["boxes"]) == 0


def test_commands_refuse_a_checkpoint_of_the_wrong_kind_and_an_unusable_out(setup, tmp_path):
    """A classifier checkpoint given to the detector commands, and an --out that cannot be created, fail
    before any work with a message naming them."""
    import numpy as np
    from PIL import Image

    from dcnv2.engine import ModelSpec, save_checkpoint
    from dcnv2.engine.predict import read_image
    from dcnv2.models import classifier

    root, ckpts = setup
    image = sorted((root / "data" / "val").glob("*.png"))[0]
    cls = tmp_path / "cls.pth"
    model = classifier("regular", "resnet18", num_classes=3)
    spec = ModelSpec(arch="classifier", preset="regular", backbone="resnet18", num_classes=3)
    save_checkpoint({"model": model.state_dict(), "model_spec": spec.to_dict()}, cls)
    for args in (["predict", str(image), "--out", str(tmp_path / "p")],
                 ["analyze", "figure", "--image", str(image), "--node", "5,5", "--out", str(tmp_path / "f.png")]):
        proc = run_cli(*args, "--checkpoint", str(cls))
        assert proc.returncode == 2 and "holds a classifier" in proc.stderr and "Traceback" not in proc.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_cli("analyze", "figure", "--checkpoint", str(ckpts["regular"]), "--image", str(image),
                           "--node", "5,5", "--out", str(blocker / "fig.png"), *FAST)
    assert proc.returncode == 2 and f"--out's folder {str(blocker)!r} cannot be created" in proc.stderr
    # 16-bit grayscale reads as its picture (white stays white), not clipped to 255 everywhere
    Image.fromarray(np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)).save(tmp_path / "g16.png")
    x = read_image(tmp_path / "g16.png")
    assert x.shape == (3, 64, 64) and x.min() == 0 and x.max() == 1 and 0.4 < float(x.mean()) < 0.6


def test_eval_cli_names_a_degenerate_image_and_evaluates_the_others(setup, tmp_path):
    import json
    import shutil

    from PIL import Image

    root, ckpts = setup
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    Image.new("RGB", (900, 3), (90, 90, 90)).save(data / "val" / "thin.png")
    ann_file = data / "annotations" / "instances_val.json"
    ann = json.loads(ann_file.read_text())
    ann["images"].append({"id": 999, "file_name": "thin.png", "width": 900, "height": 3})
    ann_file.write_text(json.dumps(ann))
    proc = run_cli("eval", "--checkpoint", str(ckpts["regular"]), "--data", str(data), "--split", "val",
                "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "image 999 (thin.png) gets no detections at test size 64: the 900x3 image" in proc.stderr
    assert "Traceback" not in proc.stderr and "| bbox |" in proc.stdout
