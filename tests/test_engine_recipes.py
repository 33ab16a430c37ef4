"""Budget planning for the demo / ablation: speed measurement leaves no trace, iterations fit the budget."""
from __future__ import annotations

import pytest
import torch

from engine_support import TinyShapes, params_vector, tiny_detector
from dcnv2.engine.recipes import SyntheticRecipe, plan_iterations, seconds_per_image_eval, seconds_per_iteration


def test_plan_iterations_fits_budget():
    assert plan_iterations(600, [1.0, 2.0]) == 200
    assert plan_iterations(10, [1.0, 2.0], minimum=20) == 20
    assert plan_iterations(600, [1.0], maximum=50) == 50
    with pytest.raises(ValueError):
        plan_iterations(600, [0.0])


def test_speed_measurement_changes_nothing():
    model, data = tiny_detector(), TinyShapes(n=4)
    before, rng = params_vector(model).clone(), torch.get_rng_state()
    assert seconds_per_iteration(model, data, 2, steps=1) > 0
    assert seconds_per_image_eval(model, data, images=1) > 0
    assert torch.equal(params_vector(model), before) and torch.equal(torch.get_rng_state(), rng)
    assert model.training  # the copy was switched to eval, not the model


def test_recipe_schedule_scales_with_iterations():
    recipe = SyntheticRecipe(lr_steps=(0.75,), warmup_iters=50)
    cfg = recipe.train_config("/tmp/x", iterations=400, iters_per_epoch=100)
    assert cfg.total_iters(100) == 400 and cfg.step_iters(100) == [300]
    assert cfg.lr_factor(299, 100) == 1.0 and cfg.lr_factor(300, 100) == pytest.approx(0.1)
    short = recipe.train_config("/tmp/x", iterations=40, iters_per_epoch=100)
    assert short.warmup_iters == 8  # warm-up never eats the whole short schedule


def test_detection_grid_draws_each_images_top_scoring_detections(tmp_path, monkeypatch):
    """A short-trained model's scores sit far below 0.5: the grid draws the top-k per image (k = objects in
    the image) above a low floor instead of a blank panel."""
    from dcnv2.engine import demo, plots

    val = TinyShapes(n=2, flip=False)
    preds = []
    for i in range(2):
        image, target = val[i]
        scores = torch.tensor([0.3, 0.02, 0.25, 0.1, 0.2])
        preds.append((image, {"boxes": torch.tensor([[1.0, 1, 10, 10]]).repeat(5, 1), "labels": torch.ones(5, dtype=torch.int64),
                              "scores": scores}))
    drawn = []
    real = plots.draw_detections
    monkeypatch.setattr(plots, "draw_detections",
                        lambda ax, image, pred, **kw: (drawn.append((pred["scores"].tolist(), kw)), real(ax, image, pred, **kw)))
    out = demo.plot_detection_grid({"m": {"predictions": preds}}, val, tmp_path / "grid.png", examples=2)
    assert out.is_file() and out.stat().st_size > 0
    model_panels = [(s, kw) for s, kw in drawn if kw["score_threshold"] > 0]
    assert len(model_panels) == 2
    for (scores, _), i in zip(model_panels, range(2)):
        k = len(val[i][1]["labels"])
        assert scores == pytest.approx(sorted([0.3, 0.02, 0.25, 0.1, 0.2], reverse=True)[:k])
