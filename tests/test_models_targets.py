"""Target validation: bad boxes, labels, dtypes, shapes and masks are rejected before any compute, with the
image index and the bad value in the message."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dcnv2 import models
from dcnv2.models.targets import validate_targets

NUM_CLASSES = 3


def good(masks=False):
    images = [torch.rand(3, 32, 40), torch.rand(3, 30, 30)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 20.0, 25.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 29.0, 20.0]]), "labels": torch.tensor([2, 1])}]
    if masks:
        for img, t in zip(images, targets):
            t["masks"] = torch.zeros(len(t["labels"]), *img.shape[1:], dtype=torch.uint8)
    return images, targets


def bad(field, value):
    def apply(images, targets):
        targets[1][field] = value
    return apply


INF, NAN = float("inf"), float("nan")
CASES = [
    # (mutation, error type, message fragment)
    (bad("boxes", torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, INF, 20.0]])), ValueError,
     r"targets\[1\]\['boxes'\]\[1\] is not finite: \[5.0, 5.0, inf, 20.0\]"),
    (bad("boxes", torch.tensor([[NAN, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 20.0]])), ValueError,
     r"targets\[1\]\['boxes'\]\[0\] is not finite: \[nan, 0.0, 10.0, 10.0\]"),
    (bad("boxes", torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 20.0]])), ValueError,
     r"targets\[1\]\['boxes'\]\[1\] is degenerate .*\[5.0, 5.0, 5.0, 20.0\]"),
    (bad("boxes", torch.tensor([[0.0, 12.0, 10.0, 10.0], [5.0, 5.0, 9.0, 20.0]])), ValueError,
     r"targets\[1\]\['boxes'\]\[0\] is degenerate"),
    (bad("labels", torch.tensor([2, 0])), ValueError, r"targets\[1\]\['labels'\]\[1\] = 0 is out of range \[1, 3\)"),
    (bad("labels", torch.tensor([3, 1])), ValueError, r"targets\[1\]\['labels'\]\[0\] = 3 is out of range \[1, 3\)"),
    (bad("labels", torch.tensor([-1, 1])), ValueError, r"\['labels'\]\[0\] = -1 is out of range"),
    (bad("labels", torch.tensor([2.0, 1.0])), TypeError, r"targets\[1\]\['labels'\] must be int64, got torch.float32"),
    (bad("labels", torch.tensor([2, 1], dtype=torch.int32)), TypeError, r"must be int64, got torch.int32"),
    (bad("labels", torch.tensor([2])), ValueError, r"targets\[1\]\['labels'\] must be a Tensor\[2\] .*got shape \(1,\)"),
    (bad("boxes", torch.tensor([[0, 0, 10, 10], [5, 5, 9, 20]])), TypeError,
     r"targets\[1\]\['boxes'\] must have a floating dtype, got torch.int64"),
    (bad("boxes", torch.zeros(2, 5)), ValueError, r"targets\[1\]\['boxes'\] must be a Tensor\[K, 4\], got shape \(2, 5\)"),
    (bad("boxes", [[0.0, 0.0, 10.0, 10.0]]), TypeError, r"targets\[1\]\['boxes'\] must be a Tensor, got list"),
    (lambda i, t: t[1].pop("labels"), ValueError, r"targets\[1\] has no 'labels'"),
    (lambda i, t: t.pop(), ValueError, r"got 1 targets for 2 images"),
    (lambda i, t: t.__setitem__(0, "boxes"), TypeError, r"targets\[0\] must be a dict"),
    (lambda i, t: i.__setitem__(1, torch.zeros(3, 30, 30, dtype=torch.uint8)), TypeError,
     r"images\[1\] must have a floating dtype"),
    (lambda i, t: i.__setitem__(0, torch.rand(1, 3, 32, 40)), ValueError, r"images\[0\] must be a non-empty Tensor\[C, H, W\]"),
]


@pytest.mark.parametrize("mutate, exc, message", CASES)
def test_bad_targets_raise_naming_image_and_value(mutate, exc, message):
    images, targets = good()
    mutate(images, targets)
    with pytest.raises(exc, match=message):
        validate_targets(images, targets, NUM_CLASSES)


MASK_CASES = [
    (lambda i, t: t[1].pop("masks"), ValueError, r"targets\[1\] has no 'masks'"),
    (bad("masks", torch.zeros(2, 30, 31, dtype=torch.uint8)), ValueError,
     r"targets\[1\]\['masks'\] must be a Tensor\[2, 30, 30\] .*got shape \(2, 30, 31\)"),
    (bad("masks", torch.zeros(1, 30, 30, dtype=torch.uint8)), ValueError, r"must be a Tensor\[2, 30, 30\]"),
    (bad("masks", torch.zeros(2, 30, 30, dtype=torch.int64)), TypeError, r"must be uint8, bool or floating"),
    (bad("masks", torch.full((2, 30, 30), NAN)), ValueError, r"targets\[1\]\['masks'\] contains non-finite"),
]


@pytest.mark.parametrize("mutate, exc, message", MASK_CASES)
def test_bad_masks(mutate, exc, message):
    images, targets = good(masks=True)
    mutate(images, targets)
    with pytest.raises(exc, match=message):
        validate_targets(images, targets, NUM_CLASSES, masks=True)


def test_good_targets_pass_including_empty_and_bool_masks():
    images, targets = good(masks=True)
    validate_targets(images, targets, NUM_CLASSES, masks=True)
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 32, 40, dtype=torch.bool)}
    validate_targets(images, targets, NUM_CLASSES, masks=True)
    validate_targets(images, [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets], NUM_CLASSES)


@pytest.fixture(scope="module")
def tiny_models():
    kw = dict(backbone="resnet18", num_classes=NUM_CLASSES, min_size=32, max_size=48, feature_channels=16,
              representation_size=32)
    return models.faster_rcnn(**kw), models.mask_rcnn(**kw)


def test_detectors_validate_before_any_compute(tiny_models):
    for model in tiny_models:
        calls = []
        handle = model.backbone.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            images, targets = good(masks=model.has_masks)
            targets[1]["labels"] = torch.tensor([2, NUM_CLASSES])
            for mode in (True, False):  # training, and evaluation with targets
                model.train(mode)
                with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\]\[1\] = 3 is out of range"):
                    model(images, targets)
            model.train()
            with pytest.raises(ValueError, match="targets must be given in training mode"):
                model(images)
            if model.has_masks:
                images, targets = good(masks=False)
                with pytest.raises(ValueError, match=r"targets\[0\] has no 'masks'"):
                    model(images, targets)
            assert calls == []
            model.eval()
            with torch.no_grad():
                model(images)  # inference needs no targets
            assert calls == [1]
        finally:
            handle.remove()


def test_inf_and_nan_boxes_fail_cleanly_in_a_subprocess():
    """torchvision alone crashes on an inf box and trains on NaN: ours raises a ValueError, and the process
    exits normally."""
    script = textwrap.dedent("""
        import torch
        from dcnv2 import models
        model = models.faster_rcnn(backbone="resnet18", num_classes=3, min_size=32, max_size=32,
                                   feature_channels=16, representation_size=32).train()
        img = [torch.rand(3, 32, 32)]
        for v in (float("inf"), float("nan"), -float("inf")):
            try:
                model(img, [{"boxes": torch.tensor([[1.0, 1.0, v, 20.0]]), "labels": torch.tensor([1])}])
            except ValueError as e:
                assert "targets[0]['boxes'][0] is not finite" in str(e), e
                print("rejected", v)
            else:
                raise SystemExit("accepted a non-finite box")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["rejected", "inf", "rejected", "nan", "rejected", "-inf"]
