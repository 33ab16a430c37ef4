"""Tiny detectors and data sets for the engine tests (seconds per run on 2 CPU cores).

Also runnable as a script: ``python tests/engine_support.py train OUT ITERS`` trains the tiny model under
whatever torch.distributed environment it finds (the torchrun test uses it).
"""
from __future__ import annotations

import sys
from typing import Dict, List, Tuple

import torch
from torch import nn


class TinyBackbone(nn.Module):
    """Two strided convs and one modulated deformable conv (so the offset lr group exists)."""

    def __init__(self, channels: int = 16, dcn: bool = True):
        super().__init__()
        from dcnv2.nn import ModulatedDeformConv2d

        self.body = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        )
        self.dcn = ModulatedDeformConv2d(channels, channels, 3, padding=1) if dcn else nn.Conv2d(channels, channels, 3, padding=1)
        self.out_channels = channels

    def forward(self, x):
        return torch.relu(self.dcn(self.body(x)))


def tiny_detector(num_classes: int = 3, *, masks: bool = False, size: int = 48, seed: int = 0,
                  dcn: bool = True) -> nn.Module:
    """A torchvision Faster/Mask R-CNN with a tiny backbone and heads, deterministic for ``seed``."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(seed)
    backbone = TinyBackbone(dcn=dcn)
    kwargs = dict(
        num_classes=num_classes, min_size=size, max_size=size,
        rpn_anchor_generator=AnchorGenerator(sizes=((8, 16, 32),), aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(backbone.out_channels * 49, 64),
        box_predictor=None,
        rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=32, box_batch_size_per_image=32,
    )
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    kwargs["box_predictor"] = FastRCNNPredictor(64, num_classes)
    kwargs["num_classes"] = None
    if masks:
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(["0"], 7, 2)
        kwargs["mask_head"] = MaskRCNNHeads(backbone.out_channels, (16,), 1)
        kwargs["mask_predictor"] = MaskRCNNPredictor(16, 16, num_classes)
        return MaskRCNN(backbone, **kwargs)
    return FasterRCNN(backbone, **kwargs)


MIMIC_SPEC_KWARGS = dict(
    feature_channels=16, representation_size=32, mdpool_hidden=16, anchor_sizes=(8, 16, 24, 32, 48),
    roi_canonical_scale=24, rpn_pre_nms_top_n_train=60, rpn_post_nms_top_n_train=30, rpn_pre_nms_top_n_test=60,
    rpn_post_nms_top_n_test=30, rpn_batch_size_per_image=64, box_batch_size_per_image=16,
    mimic=dict(patch_size=24, rois_per_image=4))


def tiny_mimic_spec(preset: str = "dcnv2"):
    """A ModelSpec of a small ResNet-18-FPN detector of ``preset`` (a feature mimicking one by default) for
    48 px images: patches of 24 px, 4 RoIs per image."""
    from dcnv2.engine import ModelSpec

    return ModelSpec(arch="faster_rcnn", preset=preset, backbone="resnet18", fpn=True, num_classes=3,
                     class_names=["square", "bar"], label_to_category_id={1: 10, 2: 20}, min_size=48, max_size=48,
                     kwargs=dict(MIMIC_SPEC_KWARGS))


def tiny_mimic_detector(seed: int = 0, preset: str = "dcnv2") -> nn.Module:
    from dcnv2.engine import build_model

    torch.manual_seed(seed)
    return build_model(tiny_mimic_spec(preset))


class TinyShapes(torch.utils.data.Dataset):
    """``n`` images of ``size``² px, each with 1–2 filled rectangles of class 1 or 2 (squares vs bars).

    A random horizontal flip (global torch RNG) exercises the engine's per-sample seeding. Exposes the
    COCO-style attributes the evaluator reads: ``coco``, ``ids``, ``label_to_category_id``.
    """

    def __init__(self, n: int = 8, size: int = 48, seed: int = 0, flip: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.size, self.flip = size, flip
        self.items: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []
        for i in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.1
            boxes, labels, masks = [], [], []
            for _ in range(1 + int(torch.randint(0, 2, (1,), generator=g))):
                label = 1 + int(torch.randint(0, 2, (1,), generator=g))
                w = int(torch.randint(10, 18, (1,), generator=g))
                h = w if label == 1 else max(4, w // 3)
                x0 = int(torch.randint(0, size - w, (1,), generator=g))
                y0 = int(torch.randint(0, size - h, (1,), generator=g))
                color = torch.tensor([1.0, 0.2, 0.2]) if label == 1 else torch.tensor([0.2, 0.4, 1.0])
                img[:, y0:y0 + h, x0:x0 + w] = color[:, None, None]
                m = torch.zeros(size, size, dtype=torch.uint8)
                m[y0:y0 + h, x0:x0 + w] = 1
                boxes.append([x0, y0, x0 + w, y0 + h])
                labels.append(label)
                masks.append(m)
            target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                      "masks": torch.stack(masks), "image_id": torch.tensor(i + 1)}
            self.items.append((img, target))
        self.ids = [i + 1 for i in range(n)]
        self.label_to_category_id = {1: 10, 2: 20}
        self.class_names = ["square", "bar"]
        self.num_classes = 3
        self._coco = None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, t = self.items[i]
        t = dict(t)
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
            b = t["boxes"].clone()
            b[:, [0, 2]] = self.size - t["boxes"][:, [2, 0]]
            t["boxes"], t["masks"] = b, t["masks"].flip(-1)
        return img, t

    @property
    def coco(self):
        """The ground truth as a pycocotools COCO object (unflipped), masks as RLE."""
        if self._coco is None:
            import numpy as np
            from pycocotools import mask as mask_util
            from pycocotools.coco import COCO

            images, anns = [], []
            for img, t in self.items:
                iid = int(t["image_id"])
                images.append({"id": iid, "width": self.size, "height": self.size, "file_name": f"{iid}.png"})
                for box, label, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
                    rle = mask_util.encode(np.asfortranarray(m.numpy()))
                    rle["counts"] = rle["counts"].decode("ascii")
                    x0, y0, x1, y1 = box
                    anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": self.label_to_category_id[label],
                                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()), "iscrowd": 0,
                                 "segmentation": rle})
            coco = COCO()
            coco.dataset = {"images": images, "annotations": anns,
                            "categories": [{"id": 10, "name": "square"}, {"id": 20, "name": "bar"}]}
            coco.createIndex()
            self._coco = coco
        return self._coco


def params_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def _main(argv):
    # python tests/engine_support.py train OUT ITERS [mimic] : the torchrun tests' worker
    import json
    import os

    from dcnv2.engine import TrainConfig, train
    from dcnv2.engine import distributed as D

    _, out, iters, *kind = argv
    torch.set_num_threads(1)
    model = tiny_mimic_detector() if kind == ["mimic"] else tiny_detector()
    # rank > 0 gets a directory of its own: the test checks that it stays empty (rank-0-only writing)
    run_dir = out if os.environ.get("RANK", "0") == "0" else out.rstrip("/") + "_rank1_out"
    cfg = TrainConfig(out=run_dir, max_iters=int(iters), batch_size=2, lr=0.01, warmup_iters=2, lr_steps=(),
                      checkpoint_every=2, log_every=1, num_workers=0, progress=False)
    train(model, TinyShapes(n=8), cfg)
    rank = D.get_rank()
    torch.save(params_vector(model), os.path.join(out, f"params_rank{rank}.pt"))
    # parameters alone: BatchNorm running statistics (ResNet backbones) follow each rank's last batch
    torch.save(torch.cat([p.detach().flatten() for p in model.parameters()]), os.path.join(out, f"weights_rank{rank}.pt"))
    with open(os.path.join(out, f"done_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": D.get_world_size()}, f)
    D.cleanup_distributed()


def tiny_train_config(out, **changes):
    """Batch 2, a 2-iteration warm-up, no decay, a log record per iteration, no worker processes, no bar."""
    from dcnv2.engine import TrainConfig

    base = dict(out=str(out), batch_size=2, lr=0.01, warmup_iters=2, lr_steps=(), log_every=1,
                checkpoint_every=1000, num_workers=0, progress=False)
    base.update(changes)
    return TrainConfig(**base)


def log_records(out) -> list:
    """The records of OUT/log.jsonl."""
    import json
    from pathlib import Path

    from dcnv2.engine.train import LOG_FILE

    return [json.loads(line) for line in (Path(out) / LOG_FILE).read_text().splitlines()]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "train":
        _main(sys.argv[1:])
    else:
        raise SystemExit(__doc__)
