"""R-CNN feature mimicking: patch crops, the loss, the region sets, where its gradients go, and that the
inference model is the base preset's, parameter for parameter."""
from __future__ import annotations

import pytest
import torch

from dcnv2 import models
from dcnv2.models.flops import count_parameters
from dcnv2.models.mimic import (FeatureMimicking, MimicConfig, MimicRoIHeads, crop_patches, mimic_loss,
                                select_mimic_rois)
from dcnv2.nn import ModulatedDeformConv2d, ModulatedDeformRoIPool

from test_models_detection import NARROW, NUM_CLASSES, SMALL, batch

MIMIC_PRESETS = ["regular-mimic", "dcnv2", "dcnv2-fgbg", "dcnv2-bg"]
SMALL_MIMIC = dict(patch_size=32, rois_per_image=4)


def build(preset, builder="faster_rcnn", fpn=False, seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(models, builder)(preset=preset, backbone="resnet18", num_classes=NUM_CLASSES, fpn=fpn,
                                    **SMALL, **{**NARROW, **kw})


# --- crops -------------------------------------------------------------------------------------------------

def test_crop_of_a_pixel_aligned_box_at_its_own_size_is_the_pixels():
    img = torch.arange(2 * 3 * 20 * 24, dtype=torch.float64).reshape(2, 3, 20, 24)
    boxes = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 0.0, 24.0, 20.0]], dtype=torch.float64)
    # an 8x8 box at 8 px, and a whole image (24x20) at... a square patch: check the 8x8 one exactly
    patch = crop_patches(img, boxes[:1], torch.tensor([1]), 8)
    assert patch.shape == (1, 3, 8, 8) and patch.dtype == img.dtype
    torch.testing.assert_close(patch[0], img[1, :, 2:10, 4:12])


def test_crop_upsamples_bilinearly_and_reads_zero_outside_the_image():
    # a horizontal ramp: a bilinear resize of a ramp is a ramp, exact at the patch pixel centres
    w = 16
    img = torch.arange(w, dtype=torch.float64).repeat(1, 3, 16, 1)            # value = x index
    patch = crop_patches(img, torch.tensor([[4.0, 4.0, 8.0, 8.0]], dtype=torch.float64), torch.tensor([0]), 8)
    # patch pixel j samples x = 4 + (j + 0.5) * 0.5 in continuous coordinates -> index x - 0.5
    expected = 4 + (torch.arange(8, dtype=torch.float64) + 0.5) * 0.5 - 0.5
    torch.testing.assert_close(patch[0, 0, 3], expected)
    # a box hanging over the right border: inside the image the ramp, beyond the half-pixel border 0
    patch = crop_patches(img, torch.tensor([[12.0, 0.0, 20.0, 8.0]], dtype=torch.float64), torch.tensor([0]), 8)
    torch.testing.assert_close(patch[0, 0, 0, :4], torch.tensor([12.0, 13.0, 14.0, 15.0], dtype=torch.float64))
    assert (patch[0, :, :, 5:] == 0).all()
    # a box touching the top-left corner keeps the corner pixel
    patch = crop_patches(img, torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64), torch.tensor([0]), 4)
    torch.testing.assert_close(patch[0, 0, 0], torch.arange(4, dtype=torch.float64))


def test_crop_downsamples_by_averaging_and_handles_no_boxes():
    img = torch.zeros(1, 3, 8, 8)
    img[..., ::2] = 1.0                                                     # stripes average to 0.5
    patch = crop_patches(img, torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([0]), 4)
    torch.testing.assert_close(patch, torch.full((1, 3, 4, 4), 0.5))
    assert crop_patches(img, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 5).shape == (0, 3, 5, 5)


# --- loss and region sets ----------------------------------------------------------------------------------

def test_mimic_loss_is_zero_for_identical_two_for_opposite_features():
    f = torch.randn(5, 16, dtype=torch.float64)
    assert mimic_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert mimic_loss(f, -f).item() == pytest.approx(2.0, abs=1e-6)
    assert mimic_loss(f, -f, "sum").item() == pytest.approx(10.0, abs=1e-5)    # the paper's sum over Ω
    assert mimic_loss(f, 3 * f).item() == pytest.approx(0.0, abs=1e-6)      # cosine: scale does not matter
    orth = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert mimic_loss(*orth).item() == pytest.approx(1.0)
    a = torch.zeros(0, 16, requires_grad=True)
    zero = mimic_loss(a, torch.zeros(0, 16))
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="same shape"):
        mimic_loss(torch.zeros(2, 3), torch.zeros(3, 3))


def test_region_sets_pick_the_right_rois_and_cap_the_count():
    boxes = [torch.arange(40, dtype=torch.float32).reshape(10, 4), torch.zeros(3, 4)]
    labels = [torch.tensor([0, 2, 0, 1, 0, 0, 3, 0, 0, 1]), torch.tensor([0, 0, 0])]
    fg, fg_labels = select_mimic_rois(boxes, labels, "fg", 32)
    assert fg_labels[0].tolist() == [2, 1, 3, 1] and fg[0].tolist() == boxes[0][[1, 3, 6, 9]].tolist()
    assert fg[1].shape == (0, 4) and fg_labels[1].numel() == 0             # an image without positives
    bg, bg_labels = select_mimic_rois(boxes, labels, "bg", 32)
    assert (bg_labels[0] == 0).all() and len(bg_labels[0]) == 6 and len(bg_labels[1]) == 3
    both, both_labels = select_mimic_rois(boxes, labels, "fg+bg", 32)
    assert len(both_labels[0]) == 10
    torch.manual_seed(0)
    capped, capped_labels = select_mimic_rois(boxes, labels, "fg+bg", 4)
    assert [len(c) for c in capped] == [4, 3]
    rows = {tuple(r) for r in boxes[0].tolist()}
    assert all(tuple(r) in rows for r in capped[0].tolist())                # a subset of the sampled RoIs
    assert [len(x) for x in select_mimic_rois(boxes, labels, "none", 4)[0]] == [0, 0]
    with pytest.raises(ValueError, match="regions"):
        select_mimic_rois(boxes, labels, "foreground", 4)


def test_config_checks_and_overrides():
    assert MimicConfig().to_dict() == dict(regions="fg", rois_per_image=32, patch_size=224, mimic_weight=0.1,
                                           cls_weight=0.1, level=None, reduction="image", gradient="both",
                                           roi_source="sampled", patch_bn="batch")
    cfg = MimicConfig.resolve("fg+bg", {"patch_size": 64})
    assert cfg.regions == "fg+bg" and cfg.patch_size == 64 and cfg.rois_per_image == 32
    assert not MimicConfig.resolve("none", None).enabled
    for bad in (dict(reduction="sum"), dict(regions="all"), dict(rois_per_image=0), dict(patch_size=2.5), dict(mimic_weight=float("nan")),
                dict(cls_weight=-1.0)):
        with pytest.raises(ValueError):
            MimicConfig(**bad)
    with pytest.raises(ValueError, match="unknown mimic settings"):
        MimicConfig.resolve("fg", {"patch": 64})
    with pytest.raises(ValueError, match="mimic level"):
        build("dcnv2", fpn=True, mimic=dict(level="7"))


# --- the branch inside the detector ------------------------------------------------------------------------

def test_presets_are_their_base_plus_mimicking():
    for name, base, regions in [("dcnv2", "mdconv-c3c5-mdpool", "fg"), ("regular-mimic", "regular", "fg"),
                                ("dcnv2-fgbg", "mdconv-c3c5-mdpool", "fg+bg"), ("dcnv2-bg", "mdconv-c3c5-mdpool", "bg")]:
        p, b = models.PRESETS[name], models.PRESETS[base]
        assert p.mimic == regions and p.base == base and b.mimic == "none" and b.base == base
        assert p.replace(name=base, description=b.description, mimic="none") == b


def test_mimic_gradients_reach_backbone_offsets_pooling_branch_and_box_head():
    model = build("dcnv2", mimic=SMALL_MIMIC)
    assert isinstance(model.roi_heads, MimicRoIHeads) and isinstance(model.mimic, FeatureMimicking)
    head_params = {id(p) for p in model.roi_heads.box_predictor.parameters()}
    assert all(id(p) not in head_params for p in model.mimic.parameters())  # an unshared classifier
    assert model.mimic.rcnn_classifier.out_features == NUM_CLASSES
    # give the zero-initialised last layer of the mdpool branch some weight so the hidden fcs are reachable
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, ModulatedDeformRoIPool)
    with torch.no_grad():
        pool.offset_fc[-1].weight.normal_(std=1e-3)
    model.train()
    images, targets = batch()
    losses = model(images, targets)
    assert {"loss_mimic", "loss_rcnn_cls"} <= set(losses)
    assert losses["loss_mimic"] > 0 and losses["loss_rcnn_cls"] > 0
    model.zero_grad()
    losses["loss_mimic"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}

    def some(prefix_or_pred):
        sel = [g for n, g in grads.items() if prefix_or_pred(n)]
        return bool(sel) and any(g is not None and g.abs().sum() > 0 for g in sel)

    assert some(lambda n: n.startswith("backbone.body.conv1"))            # the shared trunk
    dcn = [n for n, m in model.named_modules() if isinstance(m, ModulatedDeformConv2d)]
    assert dcn and all(some(lambda n, d=d: n.startswith(d + ".conv_offset")) for d in dcn)
    assert some(lambda n: n.startswith("roi_heads.box_roi_pool.offset_fc.0"))  # the shared pooling branch
    assert some(lambda n: n.startswith("roi_heads.box_head.fc6")) and some(lambda n: n.startswith("roi_heads.box_head.fc7"))
    assert not some(lambda n: n.startswith("mimic.")) and not some(lambda n: n.startswith("roi_heads.box_predictor"))
    model.zero_grad()
    model(images, targets)["loss_rcnn_cls"].backward()
    assert model.mimic.rcnn_classifier.weight.grad.abs().sum() > 0


def test_no_positive_roi_gives_a_zero_loss_with_a_graph():
    model = build("dcnv2", mimic=SMALL_MIMIC)
    model.train()
    images, _ = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    for k in ("loss_mimic", "loss_rcnn_cls"):
        assert losses[k].item() == 0.0 and losses[k].requires_grad and torch.isfinite(losses[k])
    sum(losses.values()).backward()
    assert torch.isfinite(model.mimic.rcnn_classifier.weight.grad).all()


def test_reduction_sums_over_each_image_and_averages_over_images():
    # the same step twice (same RNG): "image" = sum over Ω / images, "roi" = mean over Ω
    losses, counts = {}, []
    for reduction in ("image", "roi"):
        model = build("dcnv2", mimic=dict(SMALL_MIMIC, reduction=reduction))
        forward = model.roi_heads.select_training_samples
        model.train()
        torch.manual_seed(3)
        losses[reduction] = model(*batch())["loss_mimic"].item()
        if reduction == "roi":
            torch.manual_seed(3)
            model.roi_heads.select_training_samples = lambda *a: (lambda out: counts.append(
                sum(min(int((l > 0).sum()), 4) for l in out[2])) or out)(forward(*a))
            model(*batch())
    images = len(batch()[0])
    assert counts[0] > 0
    assert losses["image"] == pytest.approx(losses["roi"] * counts[0] / images, rel=1e-4)


def test_weights_and_patch_settings_are_applied():
    model = build("dcnv2", mimic=dict(SMALL_MIMIC, mimic_weight=0.0, cls_weight=0.0))
    model.train()
    losses = model(*batch())
    assert losses["loss_mimic"].item() == 0.0 and losses["loss_rcnn_cls"].item() == 0.0
    seen = []
    model = build("dcnv2", mimic=dict(patch_size=40, rois_per_image=2))
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    model.train()
    model(*batch())
    # the image batch, then the patches: at most 2 per image, 40 px
    assert len(seen) == 2 and seen[1][1:] == (3, 40, 40) and 1 <= seen[1][0] <= 4


@pytest.mark.parametrize("preset, base", [("dcnv2", "mdconv-c3c5-mdpool"), ("regular-mimic", "regular")])
def test_inference_model_is_the_base_preset(preset, base):
    mimic_model = build(preset, mimic=SMALL_MIMIC)
    plain = build(base)
    assert set(mimic_model.inference_state_dict()) == set(plain.state_dict())
    assert count_parameters(mimic_model) == count_parameters(plain)
    # a mimic model's inference weights load strictly into the base preset, and predict the same
    plain.load_state_dict(mimic_model.inference_state_dict())
    mimic_model.eval(), plain.eval()
    images, _ = batch()
    with torch.no_grad():
        a, b = mimic_model(images), plain(images)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    stripped = models.strip_mimicking(mimic_model)
    assert not hasattr(stripped, "mimic") or stripped.mimic is None
    assert set(stripped.state_dict()) == set(plain.state_dict())
    assert sum(p.numel() for p in stripped.parameters()) == sum(p.numel() for p in plain.parameters())


def test_flops_equal_the_base_preset():
    from dcnv2.models.flops import count_flops

    image = [torch.rand(3, 64, 64)]
    assert count_flops(build("dcnv2"), image, proposals=20, detections=5)[0] == \
        count_flops(build("mdconv-c3c5-mdpool"), image, proposals=20, detections=5)[0]


@pytest.mark.parametrize("builder, fpn, preset, level", [
    ("faster_rcnn", False, "dcnv2-fgbg", None),
    ("faster_rcnn", True, "regular-mimic", None),
    ("faster_rcnn", True, "dcnv2", "1"),
    ("mask_rcnn", True, "dcnv2", None),
    ("mask_rcnn", True, "dcnv2-bg", "0"),
])
def test_mimic_presets_train_a_step_and_evaluate(builder, fpn, preset, level):
    model = build(preset, builder=builder, fpn=fpn, mimic=dict(SMALL_MIMIC, level=level))
    masks = builder == "mask_rcnn"
    model.train()
    losses = model(*batch(masks))
    assert {"loss_mimic", "loss_rcnn_cls"} <= set(losses) and ("loss_mask" in losses) == masks
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(batch(masks)[0])
    assert len(out) == 2 and all("boxes" in o for o in out)


# --- where the cosine loss's gradient flows, and which RoIs are mimicked ---------------------------------------

def _box_head_outputs(model):
    """The box head's outputs in call order (detector's RoIs, f_FRCNN, f_RCNN), each keeping its gradient."""
    outs = []

    def hook(module, args, out):
        out.retain_grad()
        outs.append(out)

    model.roi_heads.box_head.register_forward_hook(hook)
    return outs


@pytest.mark.parametrize("gradient, into_frcnn, into_rcnn", [("both", True, True), ("rcnn", False, True),
                                                             ("frcnn", True, False)])
def test_gradient_option_decides_which_branch_the_cosine_loss_trains(gradient, into_frcnn, into_rcnn):
    model = build("dcnv2", mimic=dict(SMALL_MIMIC, gradient=gradient))
    outs = _box_head_outputs(model)
    model.train()
    losses = model(*batch())
    assert len(outs) == 3 and losses["loss_mimic"] > 0
    losses["loss_mimic"].backward()
    f_frcnn, f_rcnn = outs[1], outs[2]
    reached = lambda t: t.grad is not None and bool(t.grad.abs().sum() > 0)  # noqa: E731
    assert reached(f_frcnn) is into_frcnn and reached(f_rcnn) is into_rcnn
    # the R-CNN classifier trains the R-CNN branch whatever the option
    model.zero_grad()
    for t in outs:
        t.grad = None
    outs.clear()
    model(*batch())["loss_rcnn_cls"].backward()
    assert reached(outs[2])


def test_roi_source_proposals_mimics_labelled_rpn_proposals_without_the_ground_truth(monkeypatch):
    from torchvision.ops import box_iou

    from dcnv2.models import mimic as mimic_module

    seen = {}
    original = mimic_module.select_mimic_rois

    def spy(proposals, labels, regions, rois_per_image):
        seen["candidates"] = (proposals, labels)
        return original(proposals, labels, regions, rois_per_image)

    monkeypatch.setattr(mimic_module, "select_mimic_rois", spy)
    images, targets = batch()
    for source in ("sampled", "proposals"):
        model = build("dcnv2", mimic=dict(SMALL_MIMIC, roi_source=source))
        rpn_out = []
        model.rpn.register_forward_hook(lambda m, a, out: rpn_out.append(out[0]))
        scaled = []
        model.transform.register_forward_hook(lambda m, a, out: scaled.append(out[1]))
        model.train()
        torch.manual_seed(0)
        model(images, targets)
        proposals, labels = seen["candidates"]
        gt = [t["boxes"] for t in scaled[0]]
        has_gt = any(bool((box_iou(g, p) > 0.999).any()) for g, p in zip(gt, proposals) if len(g) and len(p))
        if source == "sampled":
            assert has_gt  # torchvision's sampler adds the ground-truth boxes to the proposals
            continue
        for p, lab, g, rpn in zip(proposals, labels, gt, rpn_out[0]):
            assert len(p) <= len(rpn) and (lab >= 0).all()
            best = box_iou(p, g).max(dim=1).values if len(g) else torch.zeros(len(p))
            assert (best[lab > 0] >= 0.5).all() and (best[lab == 0] < 0.5).all()
            kept = {tuple(b.tolist()) for b in p}
            assert kept <= {tuple(b.tolist()) for b in rpn}  # RPN proposals only


def test_mimic_options_are_checked():
    with pytest.raises(ValueError, match="gradient"):
        MimicConfig(gradient="teacher")
    with pytest.raises(ValueError, match="roi_source"):
        MimicConfig(roi_source="gt")


@pytest.mark.parametrize("patch_bn", ["batch", "running"])
def test_patch_bn_decides_whether_patches_move_the_running_statistics(patch_bn):
    """'running': the patch batch is normalised with the running statistics and leaves them as the image batch
    alone would (the same step without the branch); 'batch': the patches move them too."""
    def running_stats(model):
        return torch.cat([m.running_mean for m in model.backbone.modules()
                          if isinstance(m, torch.nn.BatchNorm2d)])

    after = {}
    for mimicking in (True, False):
        model = build("dcnv2" if mimicking else "mdconv-c3c5-mdpool", mimic=dict(SMALL_MIMIC, patch_bn=patch_bn)
                      if mimicking else None)
        model.train()
        torch.manual_seed(5)
        model(*batch())
        after[mimicking] = running_stats(model)
    same = torch.allclose(after[True], after[False], atol=1e-6)
    assert same is (patch_bn == "running")
    model = build("dcnv2", mimic=dict(SMALL_MIMIC, patch_bn=patch_bn))
    model.train()
    model(*batch())["loss_mimic"].backward()  # gradients still reach the trunk through the frozen statistics
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
