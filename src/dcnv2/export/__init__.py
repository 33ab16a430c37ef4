"""Deployment: ONNX export (standard ``DeformConv``, opset >= 19) run by ONNX Runtime, OpenVINO IR, ``torch.export``,
and reduced-precision CPU inference of the detectors.

* :func:`export_onnx` / :func:`onnx_session` / :func:`run_onnx` — :mod:`dcnv2.export.onnx`
* :func:`export_openvino` / :func:`openvino_compile` / :func:`run_openvino` — :mod:`dcnv2.export.openvino`
  (imports openvino only when called)
* :func:`export_program` / :func:`save_program` / :func:`load_program` — :mod:`dcnv2.export.torch_export`
* :class:`ExportableDetector` (one image in, boxes/scores/labels out) — :mod:`dcnv2.export.detector`
* :class:`Bfloat16Detector` (CPU bfloat16 autocast) — :mod:`dcnv2.export.precision`
* :func:`compare_detections` (exported vs PyTorch, stated tolerances) — :mod:`dcnv2.export.verify`
"""
from dcnv2.export.detector import ExportableDetector
from dcnv2.export.onnx import MIN_OPSET, MissingDependencyError, export_onnx, onnx_session, run_onnx
from dcnv2.export.openvino import export_openvino, openvino_compile, run_openvino
from dcnv2.export.precision import Bfloat16Detector
from dcnv2.export.torch_export import export_program, load_program, save_program
from dcnv2.export.verify import compare_detections

__all__ = ["ExportableDetector", "MIN_OPSET", "MissingDependencyError", "export_onnx", "onnx_session", "run_onnx",
           "export_openvino", "openvino_compile", "run_openvino", "Bfloat16Detector", "export_program", "load_program", "save_program", "compare_detections"]
