"""Training loop: loss goes down, exact resume, NaN guard, LR schedule, atomic checkpoints, torchrun/gloo."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_support import TinyShapes, params_vector, tiny_detector, log_records as _log, tiny_train_config as _cfg
from dcnv2.engine import NonFiniteLossError, TrainConfig, load_checkpoint, save_checkpoint, train
from dcnv2.engine.train import LAST_CHECKPOINT, ResumableBatchSampler

HERE = Path(__file__).resolve().parent


def _crash_at(model, call, exc=RuntimeError("simulated crash")):
    """Makes the model's ``call``-th forward raise (or return NaN losses when ``exc`` is None)."""
    forward = model.forward
    count = {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        out = forward(*args, **kwargs)
        if count["n"] == call:
            if exc is None:
                return {k: v * float("nan") for k, v in out.items()}
            raise exc
        return out

    model.forward = patched
    return count


def test_fixed_batch_overfits(tmp_path):
    torch.manual_seed(0)
    data = TinyShapes(n=2, flip=False)
    model = tiny_detector()
    train(model, data, _cfg(tmp_path, max_iters=40, lr=0.02, warmup_iters=5))
    losses = [r["loss"] for r in _log(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "loss.png").is_file()


def test_lr_schedule_warmup_steps_and_offset_ratio(tmp_path):
    data = TinyShapes(n=4)  # 2 iterations per epoch
    model = tiny_detector()
    cfg = _cfg(tmp_path, max_iters=8, lr=0.01, warmup_iters=4, warmup_factor=0.25, lr_steps=(2.0, 3.0), gamma=0.1)
    train(model, data, cfg)
    lrs = [r["lr"] for r in _log(tmp_path)]
    expected = [0.01 * f for f in (0.25, 0.4375, 0.625, 0.8125, 0.1, 0.1, 0.01, 0.01)]
    assert lrs == pytest.approx(expected)
    state = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert set(groups) == {"base", "offset"}  # the deformable conv's offset branch has its own group
    assert groups["offset"]["lr"] == pytest.approx(0.1 * groups["base"]["lr"])
    assert groups["base"]["momentum"] == 0.9 and groups["base"]["weight_decay"] == 1e-4


def test_resume_matches_uninterrupted_run(tmp_path):
    # 6 images / batch 2 = 3 iterations per epoch: the checkpoint at 4 is mid-epoch, the decay at epoch 2
    # (iteration 6) and the warm-up straddle the interruption, flips draw random numbers per sample.
    data = TinyShapes(n=6)
    kw = dict(max_iters=9, warmup_iters=5, lr_steps=(2.0,), checkpoint_every=4)
    full = tiny_detector()
    train(full, data, _cfg(tmp_path / "full", **kw))

    part = tiny_detector()
    _crash_at(part, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        # workers here, none in the resumed part: the data order must not depend on it
        train(part, data, _cfg(tmp_path / "part", num_workers=1, **kw))
    assert load_checkpoint(tmp_path / "part" / LAST_CHECKPOINT)["iteration"] == 4

    resumed = tiny_detector(seed=123)  # different init: everything must come from the checkpoint
    result = train(resumed, data, _cfg(tmp_path / "part", **kw), resume=True)
    assert result["iteration"] == 9
    assert torch.equal(params_vector(resumed), params_vector(full))
    # the log of the resumed run continues where the checkpoint was, without duplicates
    assert [r["iter"] for r in _log(tmp_path / "part")] == list(range(1, 10))
    assert [r["loss"] for r in _log(tmp_path / "part")] == [r["loss"] for r in _log(tmp_path / "full")]


def test_nan_loss_stops_with_iteration_and_keeps_checkpoint(tmp_path):
    data = TinyShapes(n=4)
    model = tiny_detector()
    _crash_at(model, 5, exc=None)  # 5th forward returns NaN losses
    with pytest.raises(NonFiniteLossError, match="iteration 5") as info:
        train(model, data, _cfg(tmp_path, max_iters=10, checkpoint_every=2))
    assert info.value.iteration == 5
    assert "checkpoint_last.pth" in str(info.value)
    state = load_checkpoint(tmp_path / LAST_CHECKPOINT)
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_final.pth").exists()
    assert _log(tmp_path)[-1]["event"] == "non-finite loss"
    # the kept checkpoint is a valid starting point
    fresh = tiny_detector(seed=7)
    assert train(fresh, data, _cfg(tmp_path, max_iters=6, checkpoint_every=2), resume=True)["iteration"] == 6


def test_amp_and_gradient_clipping(tmp_path):
    # bfloat16 autocast on CPU; plain convs here (mixed-dtype support of the deformable op is tested with the op)
    model = tiny_detector(dcn=False)
    before = params_vector(model).clone()
    train(model, TinyShapes(n=4), _cfg(tmp_path, max_iters=3, amp=True, clip_grad_norm=0.5))
    losses = [r["loss"] for r in _log(tmp_path)]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = params_vector(model)
    assert after.dtype == torch.float32 and not torch.equal(before, after)


def test_batch_sampler_covers_each_epoch_and_resumes_mid_epoch():
    full = list(ResumableBatchSampler(7, 2, seed=3, epoch=1))
    assert len(full) == 4 and all(len(b) == 2 for b in full)
    assert {i for b in full for i, _ in b} == set(range(7))
    assert list(ResumableBatchSampler(7, 2, seed=3, epoch=1, start=2)) == full[2:]
    assert full != list(ResumableBatchSampler(7, 2, seed=3, epoch=2))
    ranks = [list(ResumableBatchSampler(7, 2, seed=3, epoch=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == ResumableBatchSampler.batches_per_epoch(7, 2, 2) == 2
    assert {i for r in ranks for b in r for i, _ in b} == set(range(7))


def test_adamw_trains_resumes_exactly_and_keeps_offset_ratio(tmp_path):
    data = TinyShapes(n=4)
    kw = dict(max_iters=6, warmup_iters=2, optimizer="adamw", lr=1e-3, checkpoint_every=3)
    full = tiny_detector()
    train(full, data, _cfg(tmp_path / "full", **kw))
    state = load_checkpoint(tmp_path / "full" / LAST_CHECKPOINT)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["base"]["betas"] == (0.9, 0.999)  # AdamW's state, not SGD's
    assert groups["offset"]["lr"] == pytest.approx(0.1 * groups["base"]["lr"])
    part = tiny_detector()
    _crash_at(part, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(part, data, _cfg(tmp_path / "part", **kw))
    resumed = tiny_detector(seed=7)
    train(resumed, data, _cfg(tmp_path / "part", **kw), resume=True)
    assert torch.equal(params_vector(resumed), params_vector(full))


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_atomic_checkpoint_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "iteration": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "iteration": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]  # temp file cleaned up


def test_atomic_checkpoint_survives_process_killed_mid_write(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.arange(4.0)}, "iteration": 3}, path)
    before = path.read_bytes()
    code = f"""
import os, torch
from dcnv2.engine import save_checkpoint
real = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"partial")
    f.flush()
    os._exit(9)  # killed: no cleanup, no rename
torch.save = dying_save
save_checkpoint({{"model": {{"w": torch.zeros(4)}}, "iteration": 4}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iteration"] == 3
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(next(p for p in tmp_path.iterdir() if p.name.endswith(".tmp")))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes (gloo rendezvous, each importing torch): ~30 s on 2 busy cores
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "engine_support.py"), "train", str(out), "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    p0, p1 = (torch.load(out / f"params_rank{r}.pt") for r in (0, 1))
    assert torch.equal(p0, p1)
    assert json.loads((out / "done_rank1.json").read_text()) == {"rank": 1, "world": 2}
    # the checkpoint (written by rank 0) holds the same parameters every rank ended with
    state = load_checkpoint(out / LAST_CHECKPOINT)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["iteration"] == 4
    assert torch.equal(torch.cat([v.flatten() for v in state["model"].values() if v.is_floating_point()]), p0)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # 8 images over 2 ranks x batch 2 = 2 iterations per epoch; one log line per iteration, written once
    assert [r["iter"] for r in _log(out)] == [1, 2, 3, 4] and {r["epoch"] for r in _log(out)} == {0, 1}
    # rank 1 was pointed at its own directory: it must not have written anything there
    assert not (tmp_path / "run_rank1_out").exists()
