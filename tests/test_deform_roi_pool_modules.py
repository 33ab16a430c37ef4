"""DeformRoIPool / ModulatedDeformRoIPool: initial state, offset branch, both call forms, FPN level
routing against MultiScaleRoIAlign, use inside torchvision's RoIHeads, and bad arguments."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from dcnv2.nn import DeformRoIPool, ModulatedDeformRoIPool, param_groups
from dcnv2.ops import deform_roi_pool


def boxes_for(g, n, img=128.0, min_size=4.0, max_size=120.0):
    xy = torch.rand(n, 2, generator=g) * (img - min_size)
    wh = min_size + torch.rand(n, 2, generator=g) * (max_size - min_size)
    return torch.cat([xy, (xy + wh).clamp(max=img)], 1)


def fpn_features(g, C=4, N=2, img=128):
    return OrderedDict(
        (name, torch.randn(N, C, img // s, img // s, generator=g))
        for name, s in (("0", 4), ("1", 8), ("2", 16), ("3", 32))
    )


@pytest.mark.parametrize("cls", [DeformRoIPool, ModulatedDeformRoIPool])
def test_initial_state_is_roi_align(cls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 20, generator=g)
    rois = [boxes_for(g, 5, img=64), boxes_for(g, 3, img=64)]
    kw = dict(hidden_channels=16) if cls is ModulatedDeformRoIPool else {}
    layer = cls(3, output_size=(5, 4), spatial_scale=0.25, **kw)
    got = layer(x, rois)
    expected = torchvision.ops.roi_align(x, rois, (5, 4), 0.25, 2, aligned=True)
    factor = 0.5 if cls is ModulatedDeformRoIPool else 1.0  # sigmoid(0) masks
    assert got.shape == (8, 3, 5, 4)
    assert torch.equal(got, expected * factor)


def test_offset_branch_initialisation_and_lr_group():
    v1 = DeformRoIPool(8, 7)
    assert v1.offset_branch() is v1.offset_fc
    assert v1.offset_fc.weight.shape == (2 * 49, 8 * 49)
    assert v1.offset_fc.weight.eq(0).all() and v1.offset_fc.bias.eq(0).all()
    v2 = ModulatedDeformRoIPool(8, 7, hidden_channels=64)
    fc1, fc2, fc3 = v2.offset_fc[0], v2.offset_fc[2], v2.offset_fc[4]
    assert (fc1.in_features, fc1.out_features, fc2.out_features, fc3.out_features) == (8 * 49, 64, 64, 3 * 49)
    assert fc3.weight.eq(0).all() and fc3.bias.eq(0).all()
    for fc in (fc1, fc2):
        assert fc.bias.eq(0).all() and 0.008 < fc.weight.std().item() < 0.012 and abs(fc.weight.mean()) < 1e-3
    assert ModulatedDeformRoIPool(8).hidden_channels == 1024 and v2.gamma == 0.1 and v2.output_size == (7, 7)

    model = torch.nn.ModuleDict(dict(pool=v2, head=torch.nn.Linear(8 * 49, 10)))
    groups = {grp["name"]: grp for grp in param_groups(model, lr=0.02)}
    assert {id(p) for p in groups["offset"]["params"]} == {id(p) for p in v2.offset_fc.parameters()}
    assert groups["offset"]["lr"] == pytest.approx(0.002)


@pytest.mark.parametrize("cls", [DeformRoIPool, ModulatedDeformRoIPool])
def test_learned_offsets_deform_the_pooling(cls):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 20, generator=g, dtype=torch.float64)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), boxes_for(g, 3, img=16).double()], 1)
    kw = dict(hidden_channels=16) if cls is ModulatedDeformRoIPool else {}
    layer = cls(3, output_size=3, gamma=0.2, **kw).double()
    with torch.no_grad():
        for p in layer.offset_branch().parameters():
            p.normal_(0, 0.1, generator=g)
    out = layer(x, rois)
    # the same computation by hand: RoIAlign -> fc -> offsets (x, y) and masks -> the op
    plain = torchvision.ops.roi_align(x, rois, 3, 1.0, 2, aligned=True)
    pred = layer.offset_fc(plain.flatten(1))
    offset = pred[:, :18].reshape(-1, 2, 3, 3)
    mask = torch.sigmoid(pred[:, 18:]).reshape(-1, 1, 3, 3) if cls is ModulatedDeformRoIPool else None
    expected = deform_roi_pool(x, rois, offset, mask, 3, gamma=0.2)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, plain)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.offset_branch().parameters())


def test_zero_init_branch_still_gets_gradients():
    # offsets start at zero, but the fc must learn: its gradient is grad_offset x RoIAlign features
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 12, 12, generator=g, requires_grad=True)
    layer = DeformRoIPool(4, 3)
    layer(x, [boxes_for(g, 4, img=12)]).square().sum().backward()
    assert layer.offset_fc.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("names", [["0"], ["0", "1", "2", "3"], ["1", "3"]])
def test_dict_call_matches_multiscale_roi_align(names):
    g = torch.Generator().manual_seed(3)
    feats = fpn_features(g)
    feats["pool"] = torch.randn(2, 4, 2, 2, generator=g)  # ignored, as in torchvision's FPN output
    proposals = [boxes_for(g, 30, min_size=2, max_size=128), boxes_for(g, 20, min_size=2, max_size=128)]
    image_shapes = [(128, 128), (120, 124)]
    expected = MultiScaleRoIAlign(names, 7, 2)(feats, proposals, image_shapes)
    layer = DeformRoIPool(4, 7, featmap_names=names, aligned=False)  # MultiScaleRoIAlign: aligned=False
    assert torch.equal(layer(feats, proposals, image_shapes), expected)
    v2 = ModulatedDeformRoIPool(4, 7, featmap_names=names, aligned=False, hidden_channels=8)
    assert torch.equal(v2(feats, proposals, image_shapes), expected * 0.5)


def test_multilevel_offsets_use_each_rois_level_and_a_shared_branch():
    g = torch.Generator().manual_seed(4)
    feats = fpn_features(g, img=512)
    big = torch.tensor([[0.0, 0.0, 500.0, 470.0], [10.0, 20.0, 300.0, 260.0]])
    proposals = [torch.cat([boxes_for(g, 12, img=512, min_size=2, max_size=300), big]),
                 boxes_for(g, 9, img=512, min_size=2, max_size=500)]
    image_shapes = [(512, 512)] * 2
    names = ["0", "1", "2", "3"]
    layer = ModulatedDeformRoIPool(4, 3, featmap_names=names, hidden_channels=8, aligned=False)
    with torch.no_grad():
        layer.offset_fc[4].weight.normal_(0, 0.5, generator=g)
    out = layer(feats, proposals, image_shapes)

    plain = MultiScaleRoIAlign(names, 3, 2)(feats, proposals, image_shapes)
    pred = layer.offset_fc(plain.flatten(1))
    offset, mask = pred[:, :18].reshape(-1, 2, 3, 3), torch.sigmoid(pred[:, 18:]).reshape(-1, 1, 3, 3)
    levels = torchvision.ops.poolers.initLevelMapper(2, 5)(proposals)
    assert len(levels.unique()) >= 3  # the case exercises several levels
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(n)), b], 1) for n, b in enumerate(proposals)])
    for k in range(len(rois)):
        lvl = int(levels[k])
        f = feats[names[lvl]]
        expected = deform_roi_pool(f, rois[k : k + 1], offset[k : k + 1], mask[k : k + 1], 3,
                                   spatial_scale=2.0 ** -(lvl + 2), aligned=False)
        torch.testing.assert_close(out[k : k + 1], expected)


def test_single_map_dict_call_and_explicit_scale():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 32, 32, generator=g)
    proposals = [boxes_for(g, 3), boxes_for(g, 2)]
    layer = DeformRoIPool(4, 5)  # no featmap_names: the dict's only map, scale inferred (1/4)
    expected = torchvision.ops.roi_align(x, proposals, 5, 0.25, 2, aligned=True)
    assert torch.equal(layer({"feat": x}, proposals, [(128, 128)] * 2), expected)
    fixed = DeformRoIPool(4, 5, spatial_scale=0.5)
    assert torch.equal(fixed({"feat": x}, proposals, [(128, 128)] * 2),
                       torchvision.ops.roi_align(x, proposals, 5, 0.5, 2, aligned=True))


def test_empty_proposals():
    g = torch.Generator().manual_seed(6)
    feats = fpn_features(g)
    layer = ModulatedDeformRoIPool(4, 7, featmap_names=["0", "1", "2", "3"], hidden_channels=8)
    out = layer(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(128, 128)] * 2)
    assert out.shape == (0, 4, 7, 7)
    assert DeformRoIPool(4, 7)(feats["0"], torch.zeros(0, 5)).shape == (0, 4, 7, 7)


@pytest.mark.parametrize("cls", [DeformRoIPool, ModulatedDeformRoIPool])
def test_inside_torchvision_roi_heads(cls):
    """Box and mask pooling of a torchvision RoIHeads replaced by ours: training losses, backward, eval."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    C, names = 4, ["0", "1", "2", "3"]
    kw = dict(hidden_channels=16) if cls is ModulatedDeformRoIPool else {}
    box_pool = cls(C, 7, sampling_ratio=2, featmap_names=names, **kw)
    mask_pool = cls(C, 14, sampling_ratio=2, featmap_names=names, **kw)
    heads = RoIHeads(
        box_roi_pool=box_pool,
        box_head=TwoMLPHead(C * box_pool.output_size[0] ** 2, 32),
        box_predictor=FastRCNNPredictor(32, 3),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=32, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.0, nms_thresh=0.5, detections_per_img=10,
        mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(C, [8], 1), mask_predictor=MaskRCNNPredictor(8, 8, 3),
    )
    feats = fpn_features(g, C=C)
    image_shapes = [(128, 128), (128, 128)]
    targets = []
    for _ in range(2):
        boxes = boxes_for(g, 3, min_size=16, max_size=80)
        masks = torch.zeros(3, 128, 128, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2, 1]), masks=masks))
    proposals = [torch.cat([t["boxes"] + torch.randn(3, 4, generator=g), boxes_for(g, 20)]) for t in targets]

    heads.train()
    _, losses = heads(feats, proposals, image_shapes, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for pool in (box_pool, mask_pool):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pool.offset_branch().parameters())
    # the zero-initialised last fc learns from the first step (the layers before it only once it moved)
    last_weight = list(box_pool.offset_branch().parameters())[-2]
    assert last_weight.grad.abs().sum() > 0

    heads.eval()
    with torch.no_grad():
        detections, losses = heads(feats, proposals, image_shapes)
    assert losses == {} and len(detections) == 2
    for det in detections:
        n = len(det["boxes"])
        assert det["scores"].shape == (n,) and det["masks"].shape == (n, 1, 28, 28)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(in_channels=0), ValueError, ["in_channels", "positive", "0"]),
        (dict(in_channels=4, output_size=0), ValueError, ["output_size", "(0, 0)"]),
        (dict(in_channels=4, sampling_ratio=1.5), TypeError, ["sampling_ratio", "1.5"]),
        (dict(in_channels=4, gamma=float("nan")), ValueError, ["gamma", "nan"]),
        (dict(in_channels=4, spatial_scale=-1.0), ValueError, ["spatial_scale", "-1.0"]),
        (dict(in_channels=4, featmap_names="0"), TypeError, ["featmap_names", "list of str", "'0'"]),
        (dict(in_channels=4, featmap_names=[]), ValueError, ["featmap_names", "[]"]),
        (dict(in_channels=4, featmap_names=["0", "1"], spatial_scale=0.25), ValueError,
         ["spatial_scale=0.25", "2 maps"]),
        (dict(in_channels=4, aligned=None), TypeError, ["aligned", "None"]),
        (dict(in_channels=4, hidden_channels=0), ValueError, ["hidden_channels", "0"]),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, words):
    cls = ModulatedDeformRoIPool if "hidden_channels" in kwargs else DeformRoIPool
    with pytest.raises(exc) as info:
        cls(**kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_bad_call_arguments():
    g = torch.Generator().manual_seed(8)
    feats = fpn_features(g)
    props = [boxes_for(g, 2), boxes_for(g, 2)]
    shapes = [(128, 128)] * 2
    layer = DeformRoIPool(4, 3, featmap_names=["0", "1"])
    cases = [
        (lambda: DeformRoIPool(5, 3)(feats["0"], props), ValueError, ["in_channels=5", "(2, 4, 32, 32)"]),
        (lambda: DeformRoIPool(4, 3)(feats, props, shapes), ValueError, ["featmap_names is None", "4 maps"]),
        (lambda: DeformRoIPool(4, 3, featmap_names=["7"])(feats, props, shapes), ValueError, ["['7']", "not in"]),
        (lambda: layer(feats, props), ValueError, ["image_shapes", "required"]),
        (lambda: layer(feats, torch.zeros(2, 5), shapes), TypeError, ["proposals", "list", "Tensor"]),
        (lambda: layer(feats, [props[0]], shapes), ValueError, ["rois", "expected 2", "got 1"]),
        (lambda: layer([feats["0"]], props, shapes), TypeError, ["x", "dict", "list"]),
        (lambda: layer(dict(feats, **{"1": feats["1"].double()}), props, shapes), TypeError,
         ["features['1']", "float64"]),
        (lambda: layer(feats["0"], torch.tensor([[0, 1.0, 2.0, float("nan"), 4.0]])), ValueError, ["finite", "nan"]),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc) as info:
            fn()
        for w in words:
            assert w in str(info.value), f"{w!r} not in {info.value}"


def test_low_precision_features_with_float32_boxes():
    # autocast-style bfloat16 features with float32 proposals: boxes are not rounded to bfloat16
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 32, 32, generator=g)
    proposals = [boxes_for(g, 3), boxes_for(g, 2)]
    layer = ModulatedDeformRoIPool(4, 5, hidden_channels=8)
    out = layer({"0": x.bfloat16()}, proposals, [(128, 128)] * 2)
    assert out.dtype == torch.bfloat16
    expected = layer({"0": x.bfloat16().float()}, proposals, [(128, 128)] * 2)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def test_layer_compiles_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(10)
    layer = ModulatedDeformRoIPool(4, 5, hidden_channels=8, spatial_scale=0.25)
    with torch.no_grad():
        layer.offset_fc[4].weight.normal_(0, 0.1, generator=g)
    x = torch.randn(2, 4, 32, 32, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 50.0, 60.0], [1, 3.0, 4.0, 90.0, 100.0]])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xc, rois), layer(xe, rois)
    out_c.sum().backward()
    out_e.sum().backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_pooler_align_runs_our_kernel_and_equals_torchvision(aligned, monkeypatch):
    """The regular rows' RoIAlign pooler runs on our C++ kernel on CPU (faster backward): the same values
    and gradients as torchvision's roi_align level by level, bit for bit, in the RoIs' order."""
    from dcnv2.models import poolers

    g = torch.Generator().manual_seed(5)
    feats = OrderedDict((k, v.requires_grad_()) for k, v in fpn_features(g, C=6).items())
    proposals = [boxes_for(g, 40, min_size=2, max_size=128), boxes_for(g, 25, min_size=2, max_size=128)]
    image_shapes = [(128, 128), (120, 124)]
    pooler = poolers.RoIPooler(list(feats), 7, 2, mode="align", aligned=aligned, canonical_scale=56)
    calls = []
    real = poolers.deform_roi_pool
    monkeypatch.setattr(poolers, "deform_roi_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = pooler(feats, proposals, image_shapes)
    assert len(calls) >= 2  # several levels, each through our kernel
    go = torch.randn(ours.shape, generator=g)
    grads = torch.autograd.grad(ours, list(feats.values()), go, allow_unused=True, materialize_grads=True)
    monkeypatch.setattr(poolers, "_native_roi_align", lambda x: False)  # torchvision's roi_align
    theirs = pooler(feats, proposals, image_shapes)
    assert torch.equal(ours, theirs)
    for a, b in zip(grads, torch.autograd.grad(theirs, list(feats.values()), go, allow_unused=True,
                                              materialize_grads=True)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # the backward sums in another order


def test_pool_by_level_keeps_the_rois_order_and_empty_shape():
    from dcnv2.nn.deform_roi_pool import pool_by_level

    levels = torch.tensor([2, 0, 1, 0, 2, 2])
    out = pool_by_level(levels, 3, lambda level, idx: (idx * 10 + level).float()[:, None])
    assert out[:, 0].tolist() == [2, 10, 21, 30, 42, 52]
    empty = pool_by_level(torch.zeros(0, dtype=torch.long), 3, lambda level, idx: torch.zeros(len(idx), 4, 7, 7))
    assert empty.shape == (0, 4, 7, 7)
