"""The training engine: the loop that ``dcnv2 train`` / ``train-cls`` run and its machinery, and the evaluation
of each task. It owns :func:`train` (SGD with warm-up and step or cosine decay, AMP, clipping, NaN guard,
exact resume, data-parallel under ``torchrun``: ``train``, ``checkpoint``, ``distributed``, ``timekeeping``,
``tensorboard``, ``config``, ``finetune``), the data sets the CLI reads (``datasets``), evaluation (COCO AP
``evaluate``, VOC AP ``voc_eval``, top-1 ``classification``, mIoU ``segmentation``), prediction from a
checkpoint (``predict``: :func:`load_model`, :func:`predict_images`) and its figures (``plots``). It uses
models, data, nn and ops; the experiments built on it (demo, comparisons, recipes, crop pre-training,
ablations) live a floor up in :mod:`dcnv2.experiments`. ``ModelSpec`` / ``build_model`` live in
:mod:`dcnv2.models.spec` and are re-exported here.
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
