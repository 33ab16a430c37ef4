"""Budget planning for the demo / ablation: speed measurement leaves no trace, iterations fit the budget."""
from __future__ import annotations

import pytest
import torch

from engine_support import TinyShapes, params_vector, tiny_detector
from dcnv2.experiments.recipes import SyntheticRecipe, plan_iterations, seconds_per_image_eval, seconds_per_iteration


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


def test_detection_grid_draws_each_images_confident_detections(tmp_path, monkeypatch):
    """Each model panel gets the image's highest-scoring detections (at most its object count + 2) and draws
    those scoring at least the threshold: 0.5 by default (the demo's models are trained), lower when asked."""
    from dcnv2.engine import plots
    from dcnv2.experiments import demo

    val = TinyShapes(n=2, flip=False)
    all_scores = [0.9, 0.02, 0.6, 0.1, 0.45, 0.3, 0.7]
    preds = []
    for i in range(2):
        image, target = val[i]
        n = len(all_scores)
        preds.append((image, {"boxes": torch.tensor([[1.0, 1, 10, 10]]).repeat(n, 1),
                              "labels": torch.ones(n, dtype=torch.int64), "scores": torch.tensor(all_scores)}))
    real = plots.draw_detections
    for threshold in (None, 0.05):
        drawn = []

        def spy(ax, image, pred, **kw):
            count = real(ax, image, pred, **kw)
            drawn.append((pred["scores"].tolist(), kw["score_threshold"], count))
            return count

        monkeypatch.setattr(plots, "draw_detections", spy)
        kw = {} if threshold is None else {"score_threshold": threshold}
        out = demo.plot_detection_grid({"m": {"predictions": preds}}, val, tmp_path / f"grid{threshold}.png",
                                       examples=2, **kw)
        assert out.is_file() and out.stat().st_size > 0
        model_panels = [d for d in drawn if d[1] > 0]
        assert len(model_panels) == 2
        for (scores, used, count), i in zip(model_panels, range(2)):
            k = len(val[i][1]["labels"]) + 2
            top = sorted(all_scores, reverse=True)[:k]
            assert scores == pytest.approx(top)
            assert used == (0.5 if threshold is None else threshold)
            assert count == sum(s >= used for s in top)
