"""Small randomised detectors of every preset, synthetic images and a checkpoint for the export tests (ONNX,
torch.export, OpenVINO): seconds per conversion on 2 CPU cores."""
from __future__ import annotations

import numpy as np
import torch

from dcnv2.models import PRESETS, faster_rcnn

SIZE = 64
SMALL = dict(backbone="resnet18", num_classes=4, min_size=SIZE, max_size=SIZE, feature_channels=16,
             representation_size=32, mdpool_hidden=16, rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20,
             box_score_thresh=0.0, box_detections_per_img=100)
# every candidate (20 proposals x 3 classes) survives the score threshold and the detection cap: a near-tie
# at a cut could otherwise keep different detections in two runtimes that agree to 1e-7


def _base(name: str) -> str:
    return getattr(PRESETS[name], "base", name) or name


BASE_PRESETS = [n for n in PRESETS if _base(n) == n]
MIMIC_PRESETS = [n for n in PRESETS if _base(n) != n]


def _randomise(model, seed=0):
    """Untrained detectors score every box ~1/C; random offsets and wider logits make a real test."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        for name in ("conv_offset", "offset_fc"):
            sub = getattr(mod, name, None)
            if sub is not None:
                for p in sub.parameters():
                    p.data = torch.randn(p.shape, generator=g) * 0.02
    cls = model.roi_heads.box_predictor.cls_score
    cls.weight.data = torch.randn(cls.weight.shape, generator=g) * 0.5
    return model


def _detector(preset, *, fpn=False, builder=faster_rcnn, seed=0):
    torch.manual_seed(seed)
    anchors = (8, 16, 32, 48, 64) if fpn else (8, 16, 32)
    model = builder(preset=preset, fpn=fpn, anchor_sizes=anchors, roi_canonical_scale=28, **SMALL)
    return _randomise(model.eval(), seed)


def _synthetic_images(n=2, size=SIZE, seed=0):
    from dcnv2.data.synthetic import SynthConfig, render_image

    rng = np.random.default_rng(seed)
    cfg = SynthConfig(image_size=size)
    return [torch.from_numpy(render_image(rng, cfg)[0].copy()).permute(2, 0, 1).float() / 255 for _ in range(n)]


def _deform_conv_layers(model):
    from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

    return sum(isinstance(m, (DeformConv2d, ModulatedDeformConv2d)) for m in model.modules())


def _checkpoint(tmp_path, preset="mdconv-c3c5-mdpool"):
    from dcnv2.engine import ModelSpec, build_model, save_checkpoint

    kwargs = {k: v for k, v in SMALL.items() if k not in ("backbone", "num_classes", "min_size", "max_size")}
    spec = ModelSpec(arch="faster_rcnn", preset=preset, backbone="resnet18", fpn=False, num_classes=4,
                     min_size=SIZE, max_size=SIZE, kwargs=dict(kwargs, anchor_sizes=(8, 16, 32)))
    torch.manual_seed(0)
    model = _randomise(build_model(spec).eval())
    return save_checkpoint({"model": model.state_dict(), "model_spec": spec.to_dict()}, tmp_path / "model_final.pth")


class LevelPool(torch.nn.Module):
    """An FPN RoI pooling layer (two levels, 16x16 and 8x8 maps of a 64 px image) called with tensors only, for
    exporters: ``(p2, p3, boxes [L, 4]) -> [L, C, 7, 7]``. 8 px boxes map to the first level, 40 px ones to the
    second (canonical scale 28)."""

    def __init__(self, kind: str, channels: int = 8):
        super().__init__()
        from dcnv2.models.poolers import make_roi_pool

        torch.manual_seed(0)
        self.pool = make_roi_pool(kind, ["0", "1"], 7, channels, hidden_channels=16, canonical_scale=28)
        _randomise_offsets(self.pool)

    def forward(self, p2, p3, boxes):
        return self.pool({"0": p2, "1": p3}, [boxes], [(SIZE, SIZE)])


def _randomise_offsets(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        sub = getattr(mod, "offset_fc", None)
        if sub is not None:
            for p in sub.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.02


def level_pool_inputs(big: int, small: int, seed: int = 0, channels: int = 8):
    """FPN maps and ``small`` 8 px + ``big`` 40 px boxes in a random order."""
    g = torch.Generator().manual_seed(seed)
    p2, p3 = torch.rand(1, channels, 16, 16, generator=g), torch.rand(1, channels, 8, 8, generator=g)
    sides = torch.tensor([8.0] * small + [40.0] * big)[torch.randperm(big + small, generator=g)]
    corners = torch.rand(big + small, 2, generator=g) * (SIZE - sides[:, None])
    return p2, p3, torch.cat([corners, corners + sides[:, None]], dim=1)
