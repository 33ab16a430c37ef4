"""Models: the DCN backbones (ResNet/ResNeXt with deformable stages), the paper's Faster R-CNN and FPN Faster /
Mask R-CNN, the Table 1 presets, classifiers and segmenters, the training-only R-CNN feature mimicking of
Table 3, backbone transfer, and the model description every checkpoint stores (:class:`ModelSpec`, with
:func:`build_model` that rebuilds the model from it). Built on :mod:`dcnv2.nn` and :mod:`dcnv2.ops` only.
"""
from dcnv2.models.classification import CLASSIFIER_PRESETS, DCNClassifier, classifier
from dcnv2.models.detection import DCNFasterRCNN, DCNMaskRCNN, faster_rcnn, mask_rcnn
from dcnv2.models.mimic import FeatureMimicking, MimicConfig, inference_state_dict, strip_mimicking
from dcnv2.models.presets import PRESETS, DetectorPreset, get_preset
from dcnv2.models.resnet import BACKBONES, convert_to_deformable, dcn_resnet, dilate_conv5
from dcnv2.models.segmentation import DCNSegmenter, segmenter
from dcnv2.models.spec import ModelSpec, build_model
from dcnv2.models.transfer import TransferError, TransferReport, load_backbone_checkpoint
from dcnv2.models.targets import validate_targets

__all__ = ["faster_rcnn", "mask_rcnn", "DCNFasterRCNN", "DCNMaskRCNN", "PRESETS", "DetectorPreset", "get_preset",
           "BACKBONES", "dcn_resnet", "convert_to_deformable", "dilate_conv5", "validate_targets",
           "MimicConfig", "FeatureMimicking", "strip_mimicking", "inference_state_dict",
           "classifier", "DCNClassifier", "CLASSIFIER_PRESETS", "segmenter", "DCNSegmenter",
           "load_backbone_checkpoint", "TransferReport", "TransferError", "ModelSpec", "build_model"]
