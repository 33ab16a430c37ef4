"""Error-bounded saliency regions (appendix A1) on toy nodes whose support is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dcnv2.analysis.saliency import masked_error, rectangle_mask, saliency_region

H = W = 32
REGION = (slice(8, 24), slice(8, 24))  # rows, cols: 2 x 2 blocks of the 8-px grid below


def _grid_segments(block=8):
    ys, xs = np.mgrid[0:H, 0:W]
    return (ys // block) * (W // block) + xs // block


def _region_mask():
    m = np.zeros((H, W), dtype=bool)
    m[REGION] = True
    return m


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, H, W, generator=g) + 0.5  # positive everywhere; the fill is 0


def _min_node(x):
    """Per-channel minimum over the region: any masked region pixel zeroes it (error 1), nothing else matters."""
    return x[:, :, REGION[0], REGION[1]].amin(dim=(2, 3))


def _pixels_node(x):
    """The region's pixels themselves: the error grows smoothly as region pixels are masked."""
    return x[:, :, REGION[0], REGION[1]].flatten(1)


def _check_bound(result, x, response, eps):
    keep = torch.from_numpy(result.mask)[None, None].float()
    err = float(masked_error(response(x)[0], response(x * keep))[0])
    assert err == pytest.approx(result.error, abs=1e-9)
    assert err < eps
    assert all(e < eps for e in result.removed_errors)


def test_returns_exactly_the_region_the_node_depends_on():
    x = _image()
    # off-centre: the square must overshoot the region on two sides before it holds it
    result = saliency_region(_min_node, x, size=(H, W), center=(17.0, 15.0), segments=_grid_segments(),
                             batch_size=7)
    assert np.array_equal(result.mask, _region_mask())
    assert result.error == pytest.approx(0.0, abs=1e-12)
    _check_bound(result, x, _min_node, 0.1)
    # step 1 stopped at the first square holding the region, and everything before it missed the bound
    assert result.rect_mask[REGION].all() and result.rect_errors[-1] < 0.1
    assert all(e >= 0.1 for e in result.rect_errors[:-1])
    assert len(result.removed) > 0  # step 2 removed the superpixels around the region


@pytest.mark.parametrize("area_step", [0.01, 0.035])
def test_rectangle_grows_by_even_area_steps(area_step):
    x = _image(1)
    result = saliency_region(_min_node, x, size=(H, W), center=(16.0, 16.0), area_step=area_step,
                             segments=_grid_segments(), refine=False)
    n = len(result.rect_areas)
    np.testing.assert_allclose(result.rect_areas, area_step * H * W * np.arange(1, n + 1))
    assert np.array_equal(result.mask, result.rect_mask)
    # the square of area n * step covers the 16 x 16 region, the one before does not
    side = np.sqrt(result.rect_areas[-1])
    assert side >= 15.0 and np.sqrt(result.rect_areas[-2]) < 17.0
    x1, y1, x2, y2 = result.rect
    assert x2 - x1 == pytest.approx(y2 - y1)  # a square (the image node's shape)


def test_roi_aspect_ratio_is_kept():
    x = _image(2)
    result = saliency_region(_min_node, x, size=(H, W), center=(16.0, 16.0), aspect=2.0, segments=_grid_segments(),
                             refine=False)
    x1, y1, x2, y2 = result.rect
    assert (x2 - x1) == pytest.approx(2 * (y2 - y1))


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("greedy", ["exact", "lazy"])
def test_error_bound_is_never_violated_and_eps_is_respected(eps, greedy):
    x = _image(3)
    segs = _grid_segments(4)
    result = saliency_region(_pixels_node, x, size=(H, W), center=(16.0, 16.0), eps=eps, segments=segs,
                             greedy=greedy, batch_size=8)
    _check_bound(result, x, _pixels_node, eps)
    assert result.eps == eps
    # a looser bound leaves a smaller part of the region; every kept pixel outside the region is useless
    kept = result.mask[REGION].mean()
    assert kept < 1.0 if eps >= 0.1 else kept > 0.5
    assert not result.mask[~_region_mask()].any()


def test_looser_bound_gives_smaller_region():
    x = _image(4)
    segs = _grid_segments(4)
    areas = [saliency_region(_pixels_node, x, size=(H, W), center=(16.0, 16.0), eps=e, segments=segs).area
             for e in (0.02, 0.1, 0.4)]
    assert areas[0] > areas[1] > areas[2]


def test_fill_value_and_padding():
    # a node reading the padding (outside size) is unaffected by masks, which only cover the image
    x = _image(5)
    node = lambda t: t[:, :, 28:, :].flatten(1)  # noqa: E731  rows 28..31 lie in the padding of a 28-row image
    result = saliency_region(node, x, size=(28, W), center=(16.0, 14.0), segments=_grid_segments()[:28])
    assert result.mask.shape == (28, W)
    assert len(result.rect_areas) == 1 and result.area == 0 and result.error == pytest.approx(0.0, abs=1e-12)
    # the fill is what masked pixels become: a node equal to the fill everywhere keeps error 0
    ones = torch.ones(1, 3, H, W)
    res = saliency_region(lambda t: t.flatten(1), ones, size=(H, W), center=(16.0, 16.0), fill=1.0,
                         segments=_grid_segments())
    assert res.area == 0


def test_rectangle_mask_clips_to_the_image():
    m, box = rectangle_mask((10, 20), (1.0, 9.0), 6.0, 4.0)
    assert box == (0.0, 7.0, 4.0, 10.0)
    assert m.sum() == 4 * 3 and m[7:10, 0:4].all()


def test_bad_arguments():
    x = _image()
    for kw, match in [(dict(eps=0), "eps"), (dict(eps=1.5), "eps"), (dict(area_step=0), "area_step"),
                      (dict(aspect=0), "aspect"), (dict(greedy="fast"), "greedy"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            saliency_region(_min_node, x, size=(H, W), center=(16.0, 16.0), segments=_grid_segments(), **kw)
    with pytest.raises(ValueError, match="rgb"):
        saliency_region(_min_node, x, size=(H, W), center=(16.0, 16.0))
    with pytest.raises(ValueError, match="shape"):
        saliency_region(_min_node, x, size=(H, W), center=(16.0, 16.0), segments=_grid_segments()[:8])
