"""Semantic segmentation: the DCN segmenter, instance masks as semantic labels, mIoU, train/eval through the CLI."""
from __future__ import annotations

import json
import random
import re

import pytest
import torch
from torch import nn

from dcnv2.data.semantic import SemanticSegmentation, load_semantic_split, semantic_labels
from dcnv2.engine.segmentation import confusion_matrix, evaluate_segmentation, segmentation_metrics
from dcnv2.models import segmenter
from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

SMALL = dict(backbone="resnet18", num_classes=4, min_size=32, max_size=48, atrous_rates=(1, 2, 3))


def _targets(shapes, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"semantic": torch.randint(0, num_classes, s, generator=g)} for s in shapes]


@pytest.mark.parametrize("head,output_stride,preset", [("deeplabv3", 8, "dcnv2"), ("fcn", 16, "regular"),
                                                         ("deeplabv3", 16, "dcnv1")])
def test_output_shapes_and_trunk(head, output_stride, preset):
    torch.manual_seed(0)
    model = segmenter(preset=preset, head=head, output_stride=output_stride, **SMALL).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 40, 56))
        listed = model([torch.rand(3, 30, 50), torch.rand(3, 64, 33)])
        feats = model.backbone(torch.rand(1, 3, 64, 64))
    assert out.shape == (2, 4, 40, 56)  # logits at the input size
    assert [t.shape for t in listed] == [(4, 30, 50), (4, 64, 33)]
    assert feats["out"].shape[-1] == 64 // output_stride
    convs = [m for m in model.backbone.modules() if isinstance(m, (DeformConv2d, ModulatedDeformConv2d))]
    expected = {"dcnv2": (12, ModulatedDeformConv2d), "regular": (0, None), "dcnv1": (4, DeformConv2d)}[preset]
    assert len(convs) == expected[0] and all(type(c) is expected[1] for c in convs)
    if preset == "dcnv2" and output_stride == 8:  # torchvision's dilation: conv4 1,2; conv5 2,4
        assert model.backbone.layer3[1].conv1.dilation == (2, 2) and model.backbone.layer4[0].conv1.dilation == (2, 2)
        assert model.backbone.layer4[1].conv2.dilation == (4, 4)
        assert model.backbone.layer4[1].conv2.conv_offset.dilation == (4, 4)


def test_training_step_lowers_the_loss_and_ignores_255():
    torch.manual_seed(0)
    model = segmenter(preset="dcnv2", output_stride=16, aux_loss=True, **SMALL)
    images, targets = [], []
    for h, w in ((32, 32), (40, 36)):  # left half class 1 (red), right half class 2 (blue), bottom rows class 3
        sem = torch.ones(h, w, dtype=torch.long)
        sem[:, w // 2:] = 2
        sem[-8:] = 3
        images.append(torch.stack([(sem == 1).float(), (sem == 3).float(), (sem == 2).float()]))
        targets.append({"semantic": sem})
    targets[0]["semantic"][:8] = 255
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        out = model(images, targets)
        assert set(out) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
        losses.append(out["loss_seg"].item())
    assert losses[-1] < losses[0]
    offset = model.backbone.layer3[0].conv1.conv_offset.weight
    assert offset.grad is not None and offset.grad.abs().sum() > 0  # the deformable layers learn
    everything_ignored = [{"semantic": torch.full((32, 32), 255)}, {"semantic": torch.full((40, 36), 255)}]
    assert model(images, everything_ignored)["loss_seg"].item() == 0.0


def test_bad_inputs_are_clear_errors():
    model = segmenter(preset="regular", output_stride=16, **SMALL)
    with pytest.raises(ValueError, match="one dict with 'semantic' per image"):
        model([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        model([torch.rand(3, 32, 32)] * 2, [{"semantic": torch.full((32, 32), 7)}] * 2)
    with pytest.raises(ValueError, match="of the image's size"):
        model([torch.rand(3, 32, 32)] * 2, [{"semantic": torch.zeros(8, 8, dtype=torch.long)}] * 2)
    with pytest.raises(ValueError, match="head must be one of"):
        segmenter(head="pspnet", **SMALL)
    with pytest.raises(ValueError, match="output_stride"):
        segmenter(output_stride=4, **SMALL)


def test_engine_trains_the_segmenter_unchanged(tmp_path):
    from dcnv2.engine import ModelSpec, TrainConfig, load_model, train

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.rand(3, 32, 32, generator=g), {"semantic": torch.randint(0, 4, (32, 32), generator=g)}

    spec = ModelSpec(arch="segmenter", preset="dcnv2", backbone="resnet18", num_classes=4, min_size=32, max_size=48,
                     kwargs={"output_stride": 16, "atrous_rates": [1, 2, 3]})
    from dcnv2.engine import build_model

    torch.manual_seed(0)
    model = build_model(spec)
    cfg = TrainConfig(out=str(tmp_path), max_iters=2, batch_size=2, lr=0.01, warmup_iters=1, lr_steps=(),
                      num_workers=0, progress=False, log_every=1)
    result = train(model, Tiny(), cfg, model_spec=spec)
    assert result["iteration"] == 2 and result["loss"] == result["loss"]
    restored, spec2 = load_model(result["final_model"])
    assert spec2.arch == "segmenter"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), model.eval()(x))


def test_semantic_labels_later_instance_wins():
    masks = torch.zeros(3, 4, 5, dtype=torch.uint8)
    masks[0, :2, :3] = 1
    masks[1, 1:3, 2:5] = 1  # overlaps instance 0 at (1, 2)
    masks[2, 3, 0] = 1
    sem = semantic_labels(masks, torch.tensor([2, 1, 3]), 4, 5)
    expected = torch.tensor([[2, 2, 2, 0, 0], [2, 2, 1, 1, 1], [0, 0, 1, 1, 1], [3, 0, 0, 0, 0]])
    assert torch.equal(sem, expected)
    assert torch.equal(semantic_labels(torch.zeros(0, 4, 5), torch.zeros(0), 4, 5), torch.zeros(4, 5, dtype=torch.long))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from dcnv2.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, num_train=4, num_val=3, image_size=48, classes=("square", "triangle", "star"))
    return root


def test_semantic_dataset_from_the_synthetic_masks_with_flip(tiny_set):
    from dcnv2.data import load_split

    plain = load_semantic_split(tiny_set, "val", train=False)
    inst = load_split(tiny_set, "val", with_masks=True)
    assert plain.num_classes == 4 and plain.class_names == ["square", "triangle", "star"]
    for i in range(len(plain)):
        image, target = plain[i]
        _, t = inst[i]
        sem = target["semantic"]
        assert sem.shape == image.shape[-2:] and sem.dtype == torch.int64
        for m, lab in zip(t["masks"], t["labels"]):  # visible masks are disjoint: every pixel has its class
            assert torch.all(sem[m.bool()] == lab)
        assert torch.all(sem[t["masks"].sum(0) == 0] == 0)
    from dcnv2.data import transforms as T

    flipped = load_semantic_split(tiny_set, "val", train=True, transforms=T.Compose([T.RandomHorizontalFlip(1.0)]))
    for i in range(len(plain)):
        (im0, t0), (im1, t1) = plain[i], flipped[i]
        assert torch.equal(im1, im0.flip(-1)) and torch.equal(t1["semantic"], t0["semantic"].flip(-1))
    resized = load_semantic_split(tiny_set, "val", train=True, flip=False, sizes=(32,), max_size=64)
    image, target = resized[0]
    assert image.shape[-2:] == target["semantic"].shape == (32, 32)
    assert set(target["semantic"].unique().tolist()) <= set(plain[0][1]["semantic"].unique().tolist())


def test_miou_perfect_nothing_and_by_hand():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    perfect = segmentation_metrics(confusion_matrix(gt.clamp(max=2), gt, 4))
    assert perfect["mIoU"] == 1.0 and perfect["pixel_accuracy"] == 1.0
    assert perfect["classes"] == ["0", "1", "2"] and perfect["iou"]["3"] is None  # class 3 absent: left out
    wrong = segmentation_metrics(confusion_matrix((gt.clamp(max=2) + 1) % 3, gt, 4))
    assert wrong["mIoU"] == 0.0 and wrong["pixel_accuracy"] == 0.0
    # by hand: gt 0 0 1 1 / 2 2, pred 0 1 1 1 / 2 3 -> IoU0 1/2, IoU1 2/3, IoU2 1/2, IoU3 0/1
    m = segmentation_metrics(confusion_matrix(torch.tensor([[0, 1, 1, 1], [2, 3, 0, 0]]), gt, 4))
    assert m["iou"] == pytest.approx({"0": 0.5, "1": 2 / 3, "2": 0.5, "3": 0.0})
    assert m["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.5 + 0) / 4) and m["pixel_accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(3, 3), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        confusion_matrix(torch.full((2, 2), 5), torch.zeros(2, 2), 4)


class _Oracle(nn.Module):
    """Returns one-hot logits of the label map it is told about (or of a shifted one)."""

    def __init__(self, dataset, shift=0):
        super().__init__()
        self.maps = [dataset[i][1]["semantic"] for i in range(len(dataset))]
        self.shift, self.calls, self.num_classes = shift, 0, dataset.num_classes
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        sem = (self.maps[self.calls] + self.shift) % self.num_classes
        self.calls += 1
        return [torch.nn.functional.one_hot(sem, self.num_classes).permute(2, 0, 1).float()]


def test_evaluate_segmentation_perfect_and_wrong(tiny_set):
    ds = load_semantic_split(tiny_set, "val", train=False)
    assert evaluate_segmentation(_Oracle(ds), ds, progress=False)["metrics"]["mIoU"] == 1.0
    wrong = evaluate_segmentation(_Oracle(ds, shift=1), ds, progress=False)["metrics"]
    assert wrong["mIoU"] == 0.0 and wrong["classes"][0] == "background"


def test_cli_train_and_eval_segmenter(tiny_set, tmp_path, capsys):
    from dcnv2.cli import main

    run = tmp_path / "seg"
    assert main(["train", "--arch", "segmenter", "--preset", "dcnv2", "--backbone", "resnet18", "--data", str(tiny_set),
                 "--out", str(run), "--max-iters", "2", "--batch-size", "2", "--min-size", "48", "--max-size", "48",
                 "--workers", "0", "--no-progress", "--warmup-iters", "1", "--model-arg", "output_stride=16",
                 "--model-arg", "atrous_rates=[1,2,3]"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "model_final.pth"), "--data", str(tiny_set), "--split", "val",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| model | mIoU | pixel acc |" in out and "| background | square | triangle | star |" in out
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())
    printed = float(re.search(r"mIoU (\d+\.\d)", out).group(1))
    assert 0.0 <= metrics["mIoU"] <= 1.0 and printed == round(100 * metrics["mIoU"], 1)
    assert metrics["pixels"] == 3 * 48 * 48


def test_transform_one_size_per_training_batch_and_padding():
    from dcnv2.models.segmentation import SegmentationTransform

    t = SegmentationTransform((32, 64), 200).train()
    labels = [torch.ones(40, 40, dtype=torch.long), torch.full((20, 40), 2)]
    for seed in range(6):
        random.seed(seed)
        batch, target, sizes = t([torch.rand(3, 40, 40), torch.rand(3, 20, 40)], labels)
        short = {min(s) for s in sizes}
        assert len(short) == 1 and short <= {32, 64}  # both images at the same drawn shorter side
        h, w = sizes[1]
        assert torch.all(target[1, :h, :w] == 2) and torch.all(target[1, h:] == 255)  # padding ignored
        assert batch.shape[-2:] == target.shape[-2:] == (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert t.eval()([torch.rand(3, 40, 40)])[2] == [(64, 64)]
