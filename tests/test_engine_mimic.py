"""Training with R-CNN feature mimicking: logged losses, exact resume, AMP, the NaN guard and torchrun with the
branch on; the final model is the base preset's inference model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine_support import TinyShapes, params_vector, tiny_mimic_detector, tiny_mimic_spec
from dcnv2.engine import NonFiniteLossError, build_model, load_checkpoint, load_model, train
from dcnv2.engine.train import LAST_CHECKPOINT
from test_engine_train import HERE, _cfg, _crash_at, _free_port, _log


def test_losses_logged_and_final_model_loads_into_the_base_preset(tmp_path):
    spec = tiny_mimic_spec("dcnv2")
    model = tiny_mimic_detector()
    train(model, TinyShapes(n=4), _cfg(tmp_path, max_iters=3, lr=0.005), model_spec=spec)
    log = _log(tmp_path)
    assert len(log) == 3 and all("loss_mimic" in r and "loss_rcnn_cls" in r for r in log)
    assert all(r["loss_mimic"] >= 0 and r["loss_rcnn_cls"] > 0 for r in log)
    # the sum the optimiser saw includes both
    r = log[-1]
    parts = sum(v for k, v in r.items() if k.startswith("loss_"))
    assert r["loss"] == pytest.approx(parts, rel=1e-4)

    final = load_checkpoint(tmp_path / "model_final.pth")["model"]
    assert not any(k.startswith("mimic.") for k in final)
    assert any(k.startswith("mimic.") for k in load_checkpoint(tmp_path / LAST_CHECKPOINT)["model"])
    base = build_model(tiny_mimic_spec("mdconv-c3c5-mdpool"))
    base.load_state_dict(final)                                   # strict: the very same keys
    for ckpt in ("model_final.pth", LAST_CHECKPOINT):             # eval/predict rebuild the inference model
        loaded, loaded_spec = load_model(tmp_path / ckpt)
        assert loaded_spec.preset == "dcnv2" and getattr(loaded, "mimic", None) is None
        assert torch.equal(params_vector(loaded), params_vector(base))


@pytest.mark.slow  # 8 ResNet-18-FPN iterations; the plain exact-resume test stays in make test
def test_resume_with_mimicking_matches_uninterrupted_run(tmp_path):
    # the RoIs mimicked are drawn from the global RNG: the checkpoint's RNG state must restore that draw too
    data = TinyShapes(n=4)
    kw = dict(max_iters=4, warmup_iters=2, lr=0.005, checkpoint_every=2)
    full = tiny_mimic_detector()
    train(full, data, _cfg(tmp_path / "full", **kw))
    part = tiny_mimic_detector()
    _crash_at(part, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(part, data, _cfg(tmp_path / "part", **kw))
    resumed = tiny_mimic_detector(seed=5)
    assert train(resumed, data, _cfg(tmp_path / "part", **kw), resume=True)["iteration"] == 4
    assert torch.equal(params_vector(resumed), params_vector(full))
    assert [r["loss_mimic"] for r in _log(tmp_path / "part")] == [r["loss_mimic"] for r in _log(tmp_path / "full")]


@pytest.mark.slow  # bfloat16 autocast training with the mimicking branch (~5-9 s)
def test_amp_with_mimicking(tmp_path):
    model = tiny_mimic_detector()
    before = params_vector(model).clone()
    train(model, TinyShapes(n=4), _cfg(tmp_path, max_iters=2, lr=0.005, amp=True, clip_grad_norm=1.0))
    log = _log(tmp_path)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor([r["loss_mimic"], r["loss_rcnn_cls"]])).all()
                                 for r in log)
    assert not torch.equal(before, params_vector(model))


def test_nan_mimic_loss_stops_training(tmp_path):
    model = tiny_mimic_detector()
    forward = model.mimic.forward

    def nan_mimic(*args, **kwargs):
        out = forward(*args, **kwargs)
        if nan_mimic.calls == 2:
            out["loss_mimic"] = out["loss_mimic"] * float("nan")
        nan_mimic.calls += 1
        return out

    nan_mimic.calls = 0
    model.mimic.forward = nan_mimic
    with pytest.raises(NonFiniteLossError, match="iteration 3") as info:
        train(model, TinyShapes(n=4), _cfg(tmp_path, max_iters=5, lr=0.005, checkpoint_every=2))
    assert "loss_mimic=nan" in str(info.value)
    assert load_checkpoint(tmp_path / LAST_CHECKPOINT)["iteration"] == 2


@pytest.mark.slow  # two torchrun processes with the mimicking branch: ~30 s on 2 busy cores
def test_torchrun_two_processes_with_mimicking(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "engine_support.py"), "train", str(out), "2", "mimic"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every rank ends with the same parameters (DDP averaged the gradients of both losses' graphs)
    w0, w1 = (torch.load(out / f"weights_rank{r}.pt") for r in (0, 1))
    assert torch.equal(w0, w1)
    assert all("loss_mimic" in r for r in _log(out)) and len(_log(out)) == 2


@pytest.mark.slow  # the train and eval commands with mimicking (~12 s); the engine-level mimicking tests stay in make test
def test_cli_train_with_mimicking_then_eval(tmp_path, capsys):
    from dcnv2.cli import build_parser, main
    from dcnv2.commands.train import mimic_options
    from dcnv2.data import synthetic

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--mimic-regions", "fg+bg",
                                      "--mimic-rois", "16", "--mimic-patch-size", "96", "--mimic-weight", "0.2",
                                      "--rcnn-cls-weight", "0.3", "--mimic-level", "1", "--mimic-reduction", "roi"])
    assert mimic_options(args) == dict(regions="fg+bg", rois_per_image=16, patch_size=96, mimic_weight=0.2,
                                       cls_weight=0.3, level="1", reduction="roi")
    assert mimic_options(build_parser().parse_args(["train", "--data", "d", "--out", "o"])) == {}

    data = tmp_path / "synth"
    synthetic.generate(data, seed=1, num_train=4, num_val=2, image_size=64)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--preset", "dcnv2", "--backbone", "resnet18", "--fpn",
            "--min-size", "64", "--max-size", "64", "--max-iters", "1", "--batch-size", "2", "--warmup-iters", "1",
            "--lr-steps", "--workers", "0", "--no-progress", "--mimic-patch-size", "32", "--mimic-rois", "2",
            "--model-arg", "rpn_post_nms_top_n_train=100", "--model-arg", "box_batch_size_per_image=32"]
    assert main(argv) == 0, capsys.readouterr().err
    assert {"loss_mimic", "loss_rcnn_cls"} <= set(_log(run)[0])
    spec = json.loads((run / "config.json").read_text())["model"]
    assert spec["preset"] == "dcnv2" and spec["kwargs"]["mimic"] == {"patch_size": 32, "rois_per_image": 2}
    assert main(["eval", "--checkpoint", str(run / "checkpoint_last.pth"), "--data", str(data),
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0, capsys.readouterr().err
