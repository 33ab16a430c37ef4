"""Time-budgeted training: the re-planned schedule ends inside the budget whether the machine speeds up
or slows down, and the lr schedule stretches with it (simulated clocks: no test asserts on real time)."""
from __future__ import annotations

import json

import pytest
import torch

from engine_support import TinyShapes, tiny_detector
from dcnv2.engine import TrainConfig, train
from dcnv2.engine import timekeeping
from dcnv2.engine.timekeeping import IterationPlanner
from dcnv2.engine.train import LOG_FILE


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _simulate(budget, planned, step_time):
    """Runs a plan with ``step_time(i)`` seconds for step i; returns (iterations run, time used, planner)."""
    clock = FakeClock()
    planner = IterationPlanner(budget, planned, clock=clock)
    start, it, total = clock.t, 0, planner.total
    while it < total:
        clock.t += step_time(it)
        it += 1
        total = planner.step_done(it)
    return it, clock.t - start, planner


@pytest.mark.parametrize("name,step_time", [
    ("as probed", lambda i: 1.0),
    ("machine 3x slower after a quiet probe", lambda i: 1.0 if i < 20 else 3.0),
    ("machine 3x faster after a busy probe", lambda i: 3.0 if i < 20 else 1.0),
    ("bursty neighbour", lambda i: 4.0 if (i // 10) % 2 else 0.5),
    ("slow first step (lazy initialisation)", lambda i: 30.0 if i == 0 else 1.0),
])
def test_plan_ends_inside_the_budget(name, step_time):
    budget = 300.0
    it, used, planner = _simulate(budget, planned=300, step_time=step_time)
    assert used <= budget + 4.0, (name, used)            # at most one (slow) step past the deadline
    assert used >= budget - 2 * 4.0, (name, used)         # and no budget left unused
    assert planner.planned == 300 and it == planner.total


def test_probe_too_pessimistic_uses_the_whole_budget():
    # the case: planned 580 iterations for 10 min, each ran 2.5x faster than probed
    it, used, _ = _simulate(620.0, planned=580, step_time=lambda i: 0.43)
    assert it > 1400 and used > 615.0


def test_tail_keeps_room_for_an_evaluation_that_slows_down_with_the_machine():
    """A 100 s budget for training + an evaluation that takes 20 s at the probed speed (1 s / step). From
    step 30 the machine is 3x slower: the evaluation will take 60 s, so training must stop ~60 s early."""
    clock = FakeClock()
    planner = IterationPlanner(100.0, 80, clock=clock, window=5, tail=lambda sec: 20.0 * max(1.0, sec / 1.0))
    start, it, total = clock.t, 0, planner.total
    while it < total:
        clock.t += 1.0 if it < 30 else 3.0
        it += 1
        total = planner.step_done(it)
    trained = clock.t - start
    evaluation = 20.0 * 3.0
    # the slowdown is seen through the 5-step window: at most two slow steps late
    assert trained + evaluation <= 100.0 + 2 * 3.0, (trained, it)
    assert trained + evaluation >= 100.0 - 2 * 3.0
    # without the tail the same run would train to the deadline and the evaluation would overrun by 60 s
    clock = FakeClock()
    plain = IterationPlanner(100.0, 80, clock=clock, window=5)
    it, total = 0, plain.total
    while it < total:
        clock.t += 1.0 if it < 30 else 3.0
        it += 1
        total = plain.step_done(it)
    assert clock.t - 1000.0 >= 97.0


def test_past_the_deadline_stops_at_once_but_runs_min_iters():
    it, _, _ = _simulate(1.0, planned=50, step_time=lambda i: 5.0)
    assert it == 1
    clock = FakeClock()
    planner = IterationPlanner(1.0, 50, min_iters=3, clock=clock)
    clock.t += 10
    assert planner.step_done(1) == 3


@pytest.mark.parametrize("bad", [dict(budget_s=0), dict(budget_s=float("nan")), dict(planned=0), dict(window=0)])
def test_planner_rejects_bad_arguments(bad):
    kw = dict(budget_s=10.0, planned=5)
    kw.update(bad)
    with pytest.raises(ValueError, match="IterationPlanner"):
        IterationPlanner(**kw)


def test_lr_schedule_stretches_with_the_plan():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, lr_steps=(1.5,), lr_schedule="step")  # step at it 75
    assert cfg.lr_factor(80, 50) == pytest.approx(0.1)
    assert cfg.lr_factor(80, 50, total=200) == 1.0 and cfg.lr_factor(150, 50, total=200) == pytest.approx(0.1)
    cos = TrainConfig(max_iters=100, warmup_iters=10, lr_schedule="cosine", min_lr_factor=0.01)
    assert cos.lr_factor(10, 50) == pytest.approx(1.0)
    assert cos.lr_factor(55, 50) == pytest.approx(0.01 + 0.99 * 0.5)          # half-way after warm-up
    assert cos.lr_factor(105, 50, total=200) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cos.lr_factor(199, 50, total=200) == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_train_with_a_time_budget_replans_and_reports(tmp_path, monkeypatch):
    """Every forward advances a simulated clock: 1 s per step, then 4 s from step 6 (a neighbour starts).
    The run was planned for 40 iterations in a 20 s budget; it must stop inside the budget, say how many it
    planned and ran, and end its cosine at the re-planned length."""
    clock = FakeClock()
    monkeypatch.setattr(timekeeping, "now", clock)
    model = tiny_detector()
    forward = model.forward
    calls = {"n": 0}

    def timed_forward(*args, **kwargs):
        calls["n"] += 1
        clock.t += 1.0 if calls["n"] <= 5 else 4.0
        return forward(*args, **kwargs)

    model.forward = timed_forward
    cfg = TrainConfig(out=str(tmp_path), batch_size=2, lr=0.01, max_iters=40, warmup_iters=0, lr_schedule="cosine",
                      time_budget_s=20.0, log_every=1, num_workers=0, progress=False)
    t0 = clock.t
    result = train(model, TinyShapes(n=8), cfg)
    assert result["planned_iterations"] == 40
    assert 5 < result["iteration"] < 40
    assert clock.t - t0 <= 20.0 + 4.0
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert log[-1]["iter"] == result["iteration"]
    # the cosine reached (close to) its end at the re-planned length, not at 40
    assert log[-1]["lr"] < 0.01 * 0.2
    assert (tmp_path / "model_final.pth").is_file()


def test_planner_cap_never_lengthens_a_fixed_schedule():
    clock = FakeClock()
    planner = IterationPlanner(100.0, 30, clock=clock, cap=30)
    it, total = 0, planner.total
    while it < total:  # 1 s per step: the budget would fit 100
        clock.t += 1.0
        it += 1
        total = planner.step_done(it)
    assert it == 30 and planner.total == 30
    with pytest.raises(ValueError, match="cap"):
        IterationPlanner(10.0, 5, cap=0)


@pytest.mark.parametrize("step_s,stops", [(1.0, False), (3.0, True)])
def test_fixed_schedule_safety_net_stops_a_slow_machine_within_the_budget(tmp_path, monkeypatch, step_s, stops):
    """A fixed 10-iteration schedule planned at 1 s per step with a 12 s limit: at the planned speed it runs
    all 10 (never more); on a machine 3x slower it stops inside the limit and reports that it stopped early."""
    clock = FakeClock()
    monkeypatch.setattr(timekeeping, "now", clock)
    model = tiny_detector()
    forward = model.forward

    def timed_forward(*args, **kwargs):
        clock.t += step_s
        return forward(*args, **kwargs)

    model.forward = timed_forward
    cfg = TrainConfig(out=str(tmp_path), batch_size=2, lr=0.01, max_iters=10, warmup_iters=0, lr_schedule="cosine",
                      time_budget_s=12.0, time_budget_shortens_only=True, log_every=1, num_workers=0,
                      progress=False)
    t0 = clock.t
    result = train(model, TinyShapes(n=8), cfg)
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert result["planned_iterations"] == 10 and result["stopped_early"] is stops
    if stops:
        assert 1 <= result["iteration"] < 10
        assert clock.t - t0 <= 12.0
        assert log[-1]["event"] == "stopped early by the time budget" and log[-1]["ran"] == result["iteration"]
    else:
        assert result["iteration"] == 10 and not any("event" in r for r in log)
