"""dcnv2.data.transforms: boxes, masks and area follow the image through flips and resizes."""
from __future__ import annotations

import pytest
import torch

from dcnv2.data import transforms as T


def sample(h: int = 20, w: int = 30):
    """An image with two filled rectangles and the matching boxes/masks (box = the mask's pixel extent)."""
    rects = [(2, 3, 10, 9), (15, 1, 29, 19)]  # x0, y0, x1, y1 (exclusive)
    image = torch.zeros(3, h, w)
    masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(rects):
        image[k, y0:y1, x0:x1] = 1.0
        masks[k, y0:y1, x0:x1] = 1
    target = {"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.tensor([1, 2]), "masks": masks,
              "area": masks.flatten(1).sum(1).float(), "image_id": torch.tensor(3)}
    return image, target


def mask_box(mask: torch.Tensor) -> list:
    """The tight xyxy box (exclusive max) of a 0/1 mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_flip_moves_boxes_and_masks_together():
    image, target = sample()
    original = {k: v.clone() for k, v in target.items()}
    out_image, out = T.RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(out_image, image.flip(-1))
    assert out["boxes"].tolist() == [[20, 3, 28, 9], [1, 1, 15, 19]]
    for box, mask, k in zip(out["boxes"], out["masks"], range(2)):
        assert mask_box(mask) == box.int().tolist()
        # the image's painted pixels are under the flipped mask
        assert torch.equal(out_image[k] > 0, mask.bool())
    assert torch.equal(out["labels"], target["labels"]) and torch.equal(out["area"], target["area"])
    for k, v in original.items():  # inputs untouched
        assert torch.equal(target[k], v)


def test_flip_twice_is_identity():
    image, target = sample()
    flip = T.RandomHorizontalFlip(1.0)
    image2, target2 = flip(*flip(image, target))
    assert torch.equal(image2, image)
    for k in target:
        assert torch.equal(target2[k], target[k])


def test_flip_probability_and_global_rng():
    image, target = sample()
    out_image, out = T.RandomHorizontalFlip(0.0)(image, target)
    assert out_image is image and out is target
    flip = T.RandomHorizontalFlip(0.5)
    torch.manual_seed(123)
    first = [bool(torch.equal(flip(image, target)[0], image)) for _ in range(40)]
    torch.manual_seed(123)
    second = [bool(torch.equal(flip(image, target)[0], image)) for _ in range(40)]
    assert first == second and 5 < sum(first) < 35


def test_flip_empty_target():
    image = torch.rand(3, 5, 7)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 5, 7, dtype=torch.uint8)}
    _, out = T.RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 5, 7)


def test_resize_scales_boxes_masks_and_area():
    image, target = sample(20, 30)
    out_image, out = T.ResizeShorterSide(40)(image, target)
    assert out_image.shape == (3, 40, 60) and out_image.dtype == image.dtype
    assert torch.allclose(out["boxes"], target["boxes"] * 2)
    assert out["masks"].shape == (2, 40, 60) and out["masks"].dtype == torch.uint8
    assert set(out["masks"].unique().tolist()) <= {0, 1}
    for box, mask in zip(out["boxes"], out["masks"]):
        assert mask_box(mask) == box.int().tolist()
    assert torch.allclose(out["area"], target["area"] * 4)
    assert torch.allclose(out["area"], out["masks"].flatten(1).sum(1).float())
    assert torch.equal(out["labels"], target["labels"]) and int(out["image_id"]) == 3


def test_resize_down_keeps_box_and_mask_consistent():
    image, target = sample(20, 30)
    _, out = T.ResizeShorterSide(10)(image, target)
    assert out["masks"].shape == (2, 10, 15)
    assert torch.allclose(out["boxes"], target["boxes"] / 2)
    for box, mask in zip(out["boxes"], out["masks"]):
        got = mask_box(mask)
        assert all(abs(a - b) <= 1 for a, b in zip(got, box.tolist()))


def test_resize_max_size_caps_the_longer_side():
    image, target = sample(20, 60)
    out_image, out = T.ResizeShorterSide(100, max_size=120)(image, target)
    assert out_image.shape == (3, 40, 120)  # 100 would make the long side 300
    assert torch.allclose(out["boxes"], target["boxes"] * 2)
    assert T.ResizeShorterSide(100, max_size=120).output_size(20, 60, 100) == (40, 120)
    assert T.ResizeShorterSide(30, max_size=1000).output_size(20, 60, 30) == (30, 90)


def test_resize_same_size_is_a_no_op():
    image, target = sample(20, 30)
    out_image, out = T.ResizeShorterSide(20)(image, target)
    assert out_image is image and out is target


def test_multi_scale_picks_from_sizes():
    image, target = sample(20, 30)
    resize = T.ResizeShorterSide([16, 24, 32])
    torch.manual_seed(0)
    seen = {resize(image, target)[0].shape[1] for _ in range(30)}
    assert seen == {16, 24, 32}
    torch.manual_seed(5)
    a = [resize(image, target)[0].shape[1] for _ in range(10)]
    torch.manual_seed(5)
    assert a == [resize(image, target)[0].shape[1] for _ in range(10)]


def test_resize_empty_masks():
    image = torch.rand(3, 5, 10)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 5, 10, dtype=torch.uint8), "area": torch.zeros(0)}
    out_image, out = T.ResizeShorterSide(10)(image, target)
    assert out_image.shape == (3, 10, 20) and out["masks"].shape == (0, 10, 20) and out["boxes"].shape == (0, 4)


def test_compose_and_to_dtype():
    image, target = sample()
    pipeline = T.Compose([T.RandomHorizontalFlip(1.0), T.ResizeShorterSide(40), T.ToDtype(torch.float64)])
    out_image, out = pipeline(image, target)
    assert out_image.dtype == torch.float64 and out_image.shape == (3, 40, 60)
    assert out["boxes"].tolist() == [[40, 6, 56, 18], [2, 2, 30, 38]]
    assert "RandomHorizontalFlip" in repr(pipeline)


@pytest.mark.parametrize("make, fragment", [
    (lambda: T.RandomHorizontalFlip(1.5), "p must be a probability"),
    (lambda: T.RandomHorizontalFlip(-0.1), "p must be a probability"),
    (lambda: T.RandomHorizontalFlip(float("nan")), "p must be a probability"),
    (lambda: T.RandomHorizontalFlip("0.5"), "p must be a probability"),
    (lambda: T.ResizeShorterSide(0), "sizes must be"),
    (lambda: T.ResizeShorterSide([]), "sizes must be"),
    (lambda: T.ResizeShorterSide([600, -1]), "sizes must be"),
    (lambda: T.ResizeShorterSide([600.5]), "sizes must be"),
    (lambda: T.ResizeShorterSide(600, max_size=0), "max_size must be"),
    (lambda: T.ToDtype(torch.int64), "floating torch dtype"),
])
def test_bad_arguments(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make()


def test_compose_rejects_non_callables():
    with pytest.raises(TypeError, match=r"transforms\[1\]"):
        T.Compose([T.RandomHorizontalFlip(), 3])
