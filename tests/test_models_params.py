"""FLOP formulas of our ops in torch.utils.flop_counter, fixed RoI counts, and the `dcnv2 params` table."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dcnv2 import models
from dcnv2.cli import main
from dcnv2.models.flops import count_flops, count_parameters, fixed_roi_counts, register_flop_formulas
from dcnv2.nn import DeformConv2d, DeformRoIPool, ModulatedDeformConv2d


def flops_by_op(fn):
    register_flop_formulas()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("cls, mask_flop", [(DeformConv2d, 0), (ModulatedDeformConv2d, 1)])
def test_deform_conv2d_formula(cls, mask_flop):
    layer = cls(8, 16, 3, stride=2, padding=1, groups=2, offset_groups=2)
    x = torch.rand(2, 8, 10, 12)
    per_op = flops_by_op(lambda: layer(x))
    ho, wo = 5, 6
    conv = 2 * 2 * 16 * ho * wo * (8 // 2) * 9
    sampling = 2 * 8 * 9 * ho * wo * (8 + mask_flop)
    assert per_op["dcnv2.deform_conv2d"] == conv + sampling
    # the offset conv is an ordinary conv, counted by torch's own formula
    assert per_op["aten.convolution"] == 2 * 2 * layer.conv_offset.out_channels * ho * wo * 8 * 9
    register_flop_formulas()  # idempotent


def test_roi_pooling_formulas_count_regular_and_deformable_alike():
    from torchvision.ops import roi_align, roi_pool

    x = torch.rand(1, 4, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 12.0], [0, 0.0, 3.0, 15.0, 15.0]])
    bins = 2 * 4 * 7 * 7
    assert flops_by_op(lambda: roi_align(x, rois, 7, 1.0, 2, True))["torchvision.roi_align"] == bins * (4 * 8 + 1)
    assert flops_by_op(lambda: roi_pool(x, rois, 7, 1.0))["torchvision.roi_pool"] == bins * 4
    pool = DeformRoIPool(4, 7, sampling_ratio=2)
    per_op = flops_by_op(lambda: pool(x, rois))
    # pooled twice (plain, then deformed) around the offset fc
    assert per_op["dcnv2.deform_roi_pool"] == 2 * bins * (4 * 8 + 1)
    assert per_op["aten.addmm"] == 2 * 2 * (4 * 49) * (2 * 49)


@pytest.fixture(scope="module")
def tiny():
    return models.mask_rcnn(preset="mdconv-c3c5-mdpool", backbone="resnet18", num_classes=3, fpn=False,
                            min_size=64, max_size=64)


def test_fixed_roi_counts_fix_the_box_and_mask_head_work(tiny):
    seen = {}
    tiny.roi_heads.box_head.register_forward_hook(lambda m, a, o: seen.__setitem__("box", o.shape[0]))
    tiny.roi_heads.mask_head.register_forward_hook(lambda m, a, o: seen.__setitem__("mask", o.shape[0]))
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    total, per_op = count_flops(tiny, images, proposals=12, detections=5)
    assert seen == {"box": 24, "mask": 10}
    assert total == sum(per_op.values()) and {"dcnv2.deform_conv2d", "dcnv2.deform_roi_pool"} <= set(per_op)
    total2, per_op2 = count_flops(tiny, images, proposals=12, detections=5)
    assert total2 == total  # deterministic
    total3, per_op3 = count_flops(tiny, images, proposals=24, detections=5)
    box_fc = 2 * (256 * 49 * 1024 + 1024 * 1024 + 1024 * 3 + 1024 * 12)  # fc6, fc7, cls, bbox per RoI
    mdpool_fc = 2 * (256 * 49 * 1024 + 1024 * 1024 + 1024 * 147)
    assert per_op3["aten.addmm"] - per_op["aten.addmm"] == 24 * (box_fc + mdpool_fc)
    # the context leaves the model as it was
    assert "postprocess_detections" not in vars(tiny.roi_heads) and not tiny.rpn._forward_hooks
    assert tiny.training
    with fixed_roi_counts(tiny, None, None):
        pass


def test_params_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["params", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dcnv2 params") and "--image-size" in out and "--presets" in out


def _rows(out):
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| preset")]


def test_params_tiny_run(capsys):
    argv = ["params", "--backbone", "resnet18", "--presets", "mdconv-c3c5-mdpool", "regular", "--detectors", "faster-rcnn",
            "--image-size", "64", "96", "--proposals", "8", "--detections", "4", "--num-classes", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GFLOPs at 64x96, 8 proposals, 4 detections per image" in out
    assert "| preset | detector | params (M) | Δ vs regular (M) | GFLOPs |" in out
    rows = _rows(out)
    assert [r[:2] for r in rows] == [["mdconv-c3c5-mdpool", "faster-rcnn"], ["regular", "faster-rcnn"]]
    reg = count_parameters(models.faster_rcnn(preset="regular", backbone="resnet18", num_classes=5))
    dc5 = count_parameters(models.faster_rcnn(preset="mdconv-c3c5-mdpool", backbone="resnet18", num_classes=5))
    assert rows[0][2] == f"{dc5 / 1e6:.2f}" and rows[1][2] == f"{reg / 1e6:.2f}"
    assert rows[0][3] == f"{(dc5 - reg) / 1e6:+.2f}" and rows[1][3] == "—"
    g = [float(r[4]) for r in rows]
    assert g[0] > g[1] > 0  # deformable sampling and the mdpool offset branch cost FLOPs


def test_params_without_flops_and_errors(capsys):
    assert main(["params", "--no-flops", "--backbone", "resnet18", "--presets", "dcnv1",
                 "--detectors", "mask-rcnn-fpn"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][:2] == ["dcnv1", "mask-rcnn-fpn"] and rows[0][4] == "—"
    assert re.fullmatch(r"\+\d+\.\d\d", rows[0][3])
    assert main(["params", "--no-flops", "--presets", "dcnv3"]) == 2
    assert "unknown presets ['dcnv3']" in capsys.readouterr().err
