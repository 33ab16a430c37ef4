"""Training, evaluation and prediction for the dcnv2 detectors.

- :func:`train` — SGD with warm-up and step decay, AMP, gradient clipping, atomic checkpoints, exact resume,
  NaN guard, data-parallel under ``torchrun`` (:mod:`dcnv2.engine.distributed`).
- :func:`evaluate` — single/multi-scale inference and pycocotools COCOeval (:mod:`dcnv2.engine.evaluate`).
- :func:`load_model` / :func:`predict_images` — rebuild a detector from its checkpoint and draw detections.
"""
from dcnv2.engine.checkpoint import load_checkpoint, save_checkpoint
from dcnv2.engine.config import ModelSpec, TrainConfig, build_model
from dcnv2.engine.evaluate import coco_evaluate, evaluate, format_ap_table, inference, to_coco_results
from dcnv2.engine.predict import load_model, predict_images, read_image
from dcnv2.engine.train import NonFiniteLossError, train

__all__ = [
    "TrainConfig", "ModelSpec", "build_model", "train", "NonFiniteLossError", "save_checkpoint",
    "load_checkpoint", "evaluate", "inference", "to_coco_results", "coco_evaluate", "format_ap_table",
    "load_model", "predict_images", "read_image",
]
