"""State dicts named and shaped exactly as mmdetection's and detectron2's detectors save them (no peer code
runs here), filled with random numbers; the zoo tests convert them.

Where each name comes from:

mmdetection (github.com/open-mmlab/mmdetection, 2.x/3.x) and mmcv (github.com/open-mmlab/mmcv):
* ``backbone.conv1`` / ``bn1`` / ``layerN.i.conv1..3`` / ``bn1..3`` / ``downsample.0/1``: mmdet/models/backbones/
  resnet.py (``ResNet._make_stem_layer``, ``Bottleneck``: ``norm1_name = 'bn1'`` ..., ``downsample`` =
  Sequential(conv, norm)); DCN blocks' ``conv2`` is mmcv/ops/deform_conv.py ``DeformConv2dPack`` (``conv_offset``:
  2 * 9 * G outputs) or mmcv/ops/modulated_deform_conv.py ``ModulatedDeformConv2dPack`` (3 * 9 * G), bias-free.
* ``neck.lateral_convs.i.conv`` / ``neck.fpn_convs.i.conv``: mmdet/models/necks/fpn.py (``ConvModule`` -> ``.conv``).
* ``rpn_head.rpn_conv`` / ``rpn_cls`` (A = 3, sigmoid) / ``rpn_reg`` (4 A): mmdet/models/dense_heads/rpn_head.py.
* ``roi_head.bbox_head.shared_fcs.0/1``, ``fc_cls`` (C + 1, background last), ``fc_reg`` (4 C):
  mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py ``Shared2FCBBoxHead`` / bbox_head.py.
* ``roi_head.bbox_roi_extractor.roi_layers.L.offset_fc`` (3 fc, 2 * 49 out) and ``mask_fc`` (2 fc, 49 out):
  mmcv/ops/deform_roi_pool.py ``DeformRoIPoolPack`` / ``ModulatedDeformRoIPoolPack``, one per level from
  mmdet/models/roi_heads/roi_extractors/base_roi_extractor.py ``build_roi_layers``.
* ``roi_head.mask_head.convs.i.conv``, ``upsample`` (ConvTranspose2d 2x2), ``conv_logits`` (C):
  mmdet/models/roi_heads/mask_heads/fcn_mask_head.py.

detectron2 (github.com/facebookresearch/detectron2):
* ``backbone.bottom_up.stem.conv1`` (+ ``.norm``), ``resN.i.conv1..3`` (+ ``.norm``), ``shortcut`` (+ ``.norm``),
  ``conv2_offset``: detectron2/modeling/backbone/resnet.py (``BasicStem``, ``BottleneckBlock``,
  ``DeformBottleneckBlock``; FrozenBatchNorm2d has weight / bias / running_mean / running_var).
* ``backbone.fpn_lateralK`` / ``fpn_outputK``: detectron2/modeling/backbone/fpn.py.
* ``proposal_generator.rpn_head.conv`` / ``objectness_logits`` / ``anchor_deltas``: proposal_generator/rpn.py
  ``StandardRPNHead``.
* ``roi_heads.box_head.fc1/fc2``: roi_heads/box_head.py ``FastRCNNConvFCHead``; ``roi_heads.box_predictor.
  cls_score`` (C + 1, background last) / ``bbox_pred`` (4 C): roi_heads/fast_rcnn.py.
* ``roi_heads.mask_head.mask_fcn1..4``, ``deconv``, ``predictor``: roi_heads/mask_head.py.
* ``pixel_mean`` / ``pixel_std`` (BGR, shape [3, 1, 1]): modeling/meta_arch/rcnn.py buffers.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _rand(g, *shape, scale: float = 0.05):
    return torch.randn(*shape, generator=g) * scale


def _bn(sd, g, prefix, n, counter: bool):
    sd[prefix + "weight"] = 1 + _rand(g, n, scale=0.1)
    sd[prefix + "bias"] = _rand(g, n, scale=0.1)
    sd[prefix + "running_mean"] = _rand(g, n, scale=0.1)
    sd[prefix + "running_var"] = 0.5 + torch.rand(n, generator=g)
    if counter:
        sd[prefix + "num_batches_tracked"] = torch.tensor(1000)


def _conv(sd, g, prefix, cout, cin, k, bias=True):
    sd[prefix + "weight"] = _rand(g, cout, cin, k, k, scale=(2.0 / (cin * k * k)) ** 0.5)
    if bias:
        sd[prefix + "bias"] = _rand(g, cout, scale=0.01)


def _fc(sd, g, prefix, cout, cin):
    sd[prefix + "weight"] = _rand(g, cout, cin, scale=(1.0 / cin) ** 0.5)
    sd[prefix + "bias"] = _rand(g, cout, scale=0.01)


def _resnet(sd, g, depth, block_prefix, conv_name, norm_name, shortcut, offset_name, dcn: Optional[str],
            dcn_groups: int, counter: bool):
    """Bottleneck trunk: block_prefix(stage, i), conv_name(j) / norm_name(j) under it, shortcut names."""
    cin = 64
    for s, n in enumerate(BLOCKS[depth], start=1):
        width = 64 * 2 ** (s - 1)
        for i in range(n):
            p = block_prefix(s, i)
            for j, (co, ci, k) in enumerate(((width, cin, 1), (width, width, 3), (width * 4, width, 1)), start=1):
                _conv(sd, g, p + conv_name(j), co, ci, k, bias=False)
                _bn(sd, g, p + norm_name(j), co, counter)
            if dcn and s >= 2:
                per = 27 if dcn == "v2" else 18
                _conv(sd, g, p + offset_name, per * dcn_groups, width, 3)
                sd[p + offset_name + "weight"] *= 0.01  # small offsets, as trained ones are
            if i == 0:
                _conv(sd, g, p + shortcut[0], width * 4, cin, 1, bias=False)
                _bn(sd, g, p + shortcut[1], width * 4, counter)
            cin = width * 4


def mmdet_state_dict(*, depth: int = 50, dcn: Optional[str] = None, dcn_groups: int = 1, box_pool: str = "align",
                     masks: bool = False, classes: int = 80, seed: int = 0) -> Dict[str, torch.Tensor]:
    """An mmdetection Faster/Mask R-CNN R-50/101-FPN state dict (dcn: None, "v1" (dconv), "v2" (mdconv) in c3-c5;
    box_pool: "align", "dpool", "mdpool")."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    _conv(sd, g, "backbone.conv1.", 64, 3, 7, bias=False)
    _bn(sd, g, "backbone.bn1.", 64, True)
    _resnet(sd, g, depth, lambda s, i: f"backbone.layer{s}.{i}.", lambda j: f"conv{j}.", lambda j: f"bn{j}.",
            ("downsample.0.", "downsample.1."), "conv2.conv_offset.", dcn, dcn_groups, True)
    for i, c in enumerate((256, 512, 1024, 2048)):
        _conv(sd, g, f"neck.lateral_convs.{i}.conv.", 256, c, 1)
        _conv(sd, g, f"neck.fpn_convs.{i}.conv.", 256, 256, 3)
    _conv(sd, g, "rpn_head.rpn_conv.", 256, 256, 3)
    _conv(sd, g, "rpn_head.rpn_cls.", 3, 256, 1)
    _conv(sd, g, "rpn_head.rpn_reg.", 12, 256, 1)
    if box_pool in ("dpool", "mdpool"):
        for level in range(4):
            p = f"roi_head.bbox_roi_extractor.roi_layers.{level}."
            _fc(sd, g, p + "offset_fc.0.", 1024, 256 * 49)
            _fc(sd, g, p + "offset_fc.2.", 1024, 1024)
            _fc(sd, g, p + "offset_fc.4.", 2 * 49, 1024)
            if box_pool == "mdpool":
                _fc(sd, g, p + "mask_fc.0.", 1024, 256 * 49)
                _fc(sd, g, p + "mask_fc.2.", 49, 1024)
    _fc(sd, g, "roi_head.bbox_head.shared_fcs.0.", 1024, 256 * 49)
    _fc(sd, g, "roi_head.bbox_head.shared_fcs.1.", 1024, 1024)
    _fc(sd, g, "roi_head.bbox_head.fc_cls.", classes + 1, 1024)
    _fc(sd, g, "roi_head.bbox_head.fc_reg.", 4 * classes, 1024)
    if masks:
        for i in range(4):
            _conv(sd, g, f"roi_head.mask_head.convs.{i}.conv.", 256, 256, 3)
        sd["roi_head.mask_head.upsample.weight"] = _rand(g, 256, 256, 2, 2)  # ConvTranspose2d: [in, out, kh, kw]
        sd["roi_head.mask_head.upsample.bias"] = _rand(g, 256, scale=0.01)
        _conv(sd, g, "roi_head.mask_head.conv_logits.", classes, 256, 1)
    return sd


def detectron2_state_dict(*, depth: int = 50, dcn: Optional[str] = "v1", masks: bool = True, classes: int = 80,
                          seed: int = 0, pixel_buffers: bool = True) -> Dict[str, torch.Tensor]:
    """A detectron2 (Mask) R-CNN R-50/101-FPN state dict with deformable c3-c5 (DCNv1 by default, as in
    configs/Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml)."""
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    b = "backbone.bottom_up."
    _conv(sd, g, b + "stem.conv1.", 64, 3, 7, bias=False)
    _bn(sd, g, b + "stem.conv1.norm.", 64, False)
    _resnet(sd, g, depth, lambda s, i: f"{b}res{s + 1}.{i}.", lambda j: f"conv{j}.", lambda j: f"conv{j}.norm.",
            ("shortcut.", "shortcut.norm."), "conv2_offset.", dcn, 1, False)
    for level, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        _conv(sd, g, f"backbone.fpn_lateral{level}.", 256, c, 1)
        _conv(sd, g, f"backbone.fpn_output{level}.", 256, 256, 3)
    _conv(sd, g, "proposal_generator.rpn_head.conv.", 256, 256, 3)
    _conv(sd, g, "proposal_generator.rpn_head.objectness_logits.", 3, 256, 1)
    _conv(sd, g, "proposal_generator.rpn_head.anchor_deltas.", 12, 256, 1)
    _fc(sd, g, "roi_heads.box_head.fc1.", 1024, 256 * 49)
    _fc(sd, g, "roi_heads.box_head.fc2.", 1024, 1024)
    _fc(sd, g, "roi_heads.box_predictor.cls_score.", classes + 1, 1024)
    _fc(sd, g, "roi_heads.box_predictor.bbox_pred.", 4 * classes, 1024)
    if masks:
        for i in range(1, 5):
            _conv(sd, g, f"roi_heads.mask_head.mask_fcn{i}.", 256, 256, 3)
        sd["roi_heads.mask_head.deconv.weight"] = _rand(g, 256, 256, 2, 2)
        sd["roi_heads.mask_head.deconv.bias"] = _rand(g, 256, scale=0.01)
        _conv(sd, g, "roi_heads.mask_head.predictor.", classes, 256, 1)
    if pixel_buffers:
        sd["pixel_mean"] = torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
        sd["pixel_std"] = torch.tensor([1.0, 1.0, 1.0]).view(3, 1, 1)
    return sd


def mmdet_modulated_conv(x, weight, conv_offset_w, conv_offset_b, stride, padding, dilation):
    """mmcv's ModulatedDeformConv2dPack.forward written out: conv_offset -> chunk(3) -> cat(o1, o2) offsets,
    sigmoid(third chunk) masks, then the modulated deformable conv (here torchvision's op, an independent
    implementation)."""
    from torchvision.ops import deform_conv2d

    out = torch.nn.functional.conv2d(x, conv_offset_w, conv_offset_b, stride, padding, dilation)
    o1, o2, mask = torch.chunk(out, 3, dim=1)
    return deform_conv2d(x, torch.cat((o1, o2), dim=1), weight, None, stride, padding, dilation,
                         mask=torch.sigmoid(mask))


def mmdet_modulated_roi_pool(x, rois, layer_sd: Dict[str, torch.Tensor], output_size: int = 7,
                             spatial_scale: float = 0.25, sampling_ratio: int = 0) -> torch.Tensor:
    """mmcv's ModulatedDeformRoIPoolPack.forward written out with its own parameter names: plain pooling ->
    offset_fc (fc, ReLU, fc, ReLU, fc) -> view(K, 2, 7, 7); mask_fc (fc, ReLU, fc, sigmoid) -> view(K, 1, 7, 7);
    deformed pooling times the mask. The pooling is our reference op (mmcv's deform_roi_pool semantics:
    aligned boxes, offset channel 0 = x times the RoI width)."""
    import torch.nn.functional as F

    from dcnv2.ops.reference import deform_roi_pool

    def mlp(prefix, n, h):
        for i in range(n):
            h = F.linear(h, layer_sd[f"{prefix}.{2 * i}.weight"], layer_sd[f"{prefix}.{2 * i}.bias"])
            if i < n - 1:
                h = F.relu(h)
        return h

    size = (output_size, output_size)
    plain = deform_roi_pool(x, rois, None, None, size, spatial_scale, sampling_ratio, 0.1, True)
    flat = plain.flatten(1)
    offset = mlp("offset_fc", 3, flat).view(-1, 2, *size)
    mask = torch.sigmoid(mlp("mask_fc", 2, flat)).view(-1, 1, *size)
    return deform_roi_pool(x, rois, offset, None, size, spatial_scale, sampling_ratio, 0.1, True) * mask


def layer_state(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def tiny_image(seed: int = 0, size: Tuple[int, int] = (96, 128)) -> torch.Tensor:
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))
