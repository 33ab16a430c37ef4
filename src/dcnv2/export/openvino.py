"""OpenVINO IR (``.xml`` + ``.bin``) of the detectors through OpenVINO's PyTorch frontend, and running it.

Why the PyTorch frontend: OpenVINO's ONNX frontend (2026.4) has no conversion rule for the standard ONNX
``DeformConv``, so :func:`dcnv2.export.export_onnx`'s models do not load there. ``openvino.convert_model``
traces the module (``torch.jit.trace``) and maps ``torchvision::deform_conv2d`` to its own
``DeformableConvolution`` (``bilinear_interpolation_pad=True``: zero outside the map, as ours). So the model is
traced inside :func:`dcnv2.ops.trace_mode.torchvision_form`: deformable convs as torchvision's op (ours computes
the same), deformable RoI pooling as the standard-op decomposition of :mod:`dcnv2.ops.traceable`.

What the IR is: :class:`~dcnv2.export.detector.ExportableDetector`'s graph, one image ``[3, H, W]`` (float,
0..1) in, ``boxes [D, 4]``, ``scores [D]``, ``labels [D]`` (Mask R-CNN: ``+ masks [D, 1, H, W]``) out (D
dynamic, NMS in the graph), at the traced size only (``image_size``): the trace fixes which side limits the
resize, so the IR's input shape is fixed rather than left free to give other detections at another size. Weights are kept in float32 (``save_model`` would
compress them to float16 by default), and :func:`openvino_compile` asks the CPU plugin for float32 inference:
on CPUs with AVX-512 BF16 or AMX it otherwise runs in bfloat16, which moves scores by ~1e-3.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from dcnv2.export.detector import (ExportableDetector, default_image_size, example_image, is_detector,
                                   traceable_level_pooling)
from dcnv2.export.onnx import MissingDependencyError

__all__ = ["require_openvino", "export_openvino", "openvino_compile", "run_openvino"]

PathLike = Union[str, os.PathLike]


def require_openvino():
    """Imports and returns ``openvino``, or raises :class:`MissingDependencyError` saying how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError(
            "openvino is not installed, and the OpenVINO export needs it: pip install 'dcnv2[deploy]' "
            "(or pip install openvino)") from exc
    return openvino


def export_openvino(model: nn.Module, path: Optional[PathLike] = None, *,
                    image_size: Optional[Sequence[int]] = None, example_inputs: Optional[tuple] = None):
    """Converts a detector to an OpenVINO model; with ``path`` (``.xml``) also writes the IR (``.xml`` + ``.bin``).

    Args:
        model: a dcnv2 / torchvision Faster or Mask R-CNN (any preset), or a module of dcnv2 layers with
            ``example_inputs``.
        path: the ``.xml`` file to write (the weights go to the ``.bin`` beside it); None writes nothing.
        image_size: (height, width) of the detector's input (default: its test size, square).
        example_inputs: the inputs to trace with (detectors default to a random image of ``image_size``).

    Returns:
        the ``openvino.Model`` (compile it with :func:`openvino_compile`).

    Raises:
        MissingDependencyError: openvino is not installed.
        ValueError: a model not on the CPU, a path not ending in ``.xml``, or a layer without ``example_inputs``.
    """
    ov = require_openvino()
    from dcnv2.ops.trace_mode import torchvision_form

    if path is not None and Path(path).suffix != ".xml":
        raise ValueError(f"path must name the IR's .xml file (the weights go to a .bin beside it), got {str(path)!r}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"export_openvino traces on the CPU; the model is on {sorted(devices)}: call model.cpu() first")
    if is_detector(model):
        wrapped = model if isinstance(model, ExportableDetector) else ExportableDetector(model)
        if example_inputs is None:
            example_inputs = (example_image(image_size or default_image_size(wrapped)),)
    else:
        if example_inputs is None:
            raise ValueError(f"example_inputs are required to export a {type(model).__name__} (not a detector)")
        wrapped = model.eval()
    with torchvision_form(), traceable_level_pooling(), torch.no_grad(), warnings.catch_warnings():
        # the trace reads shapes as Python values in argument checks and torchvision's transform: harmless
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torchvision's helpers use torch.jit.script
        warnings.filterwarnings("ignore", message=".*(To copy construct from a tensor|advanced indexing).*")
        converted = ov.convert_model(wrapped, example_input=tuple(example_inputs))
    # the frontend leaves every axis free, but the trace fixed the resize's branch and scale: another size would
    # run and silently differ, so the IR takes the traced shapes only
    converted.reshape({port: ov.PartialShape(list(x.shape))
                       for port, x in zip(converted.inputs, [x for x in example_inputs if isinstance(x, Tensor)])})
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(converted, str(path), compress_to_fp16=False)
    return converted


def openvino_compile(model: Any, *, threads: Optional[int] = None, precision: str = "f32"):
    """A compiled model on OpenVINO's CPU plugin, from an ``openvino.Model`` or an IR ``.xml`` path.

    Args:
        threads: inference threads (default: OpenVINO's, one stream over every core).
        precision: ``"f32"`` (default; the comparison with PyTorch needs it) or ``"bf16"`` / ``"f16"``.

    Raises:
        MissingDependencyError: openvino is not installed. FileNotFoundError: a path that does not exist.
        ValueError: an unknown ``precision``.
    """
    ov = require_openvino()
    if precision not in ("f32", "bf16", "f16"):
        raise ValueError(f"precision must be 'f32', 'bf16' or 'f16', got {precision!r}")
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise FileNotFoundError(f"OpenVINO IR {str(model)!r} not found")
        model = str(model)
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(model, "CPU", config)


def run_openvino(compiled, *inputs: Tensor) -> List[Tensor]:
    """Runs a compiled model on tensors (in the order of its inputs); returns its outputs as tensors."""
    if len(inputs) != len(compiled.inputs):
        raise ValueError(f"the OpenVINO model takes {len(compiled.inputs)} inputs, got {len(inputs)}")
    for k, (port, x) in enumerate(zip(compiled.inputs, inputs)):
        shape = port.get_partial_shape()
        if shape.is_static and list(shape.to_shape()) != list(x.shape):
            raise ValueError(f"input {k} must have shape {list(shape.to_shape())} (the size the model was exported "
                             f"at: export again with that image size), got {list(x.shape)}")
    result = compiled([x.detach().cpu().contiguous().numpy() for x in inputs])
    return [torch.from_numpy(result[out].copy()) for out in compiled.outputs]
