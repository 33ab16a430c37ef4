"""ONNX export (TorchScript-based ``torch.onnx.export(dynamo=False)``) and running the result in ONNX Runtime.

Why this exporter: it is the one that exports torchvision's detectors (their ONNX-aware code paths —
resize, anchors, NMS, RoIAlign, mask pasting — target it), and it takes our symbolic functions through
``torch.onnx.register_custom_op_symbolic``. The dynamo exporter would need ``onnxscript`` translations and
cannot decide the detectors' data-dependent branches.

What the exported detector is (see :class:`dcnv2.export.detector.ExportableDetector`):

* input ``image``: Tensor[3, H, W] float in [0, 1], one image per run. With ``dynamic=True`` H and W are
  free; otherwise the graph is fixed to ``image_size``. The model's own resize (``min_size`` /
  ``max_size``), normalisation and padding are inside the graph.
* outputs ``boxes`` [D, 4], ``scores`` [D], ``labels`` [D] (int64) and for Mask R-CNN ``masks``
  [D, 1, H, W]: D is dynamic (NMS and score threshold in the graph), at most ``box_detections_per_img``.
* fixed at export: the RoI pooling scales of each feature map (torchvision infers them from the traced
  image; they are the backbone's true strides, 1/4 ... 1/32 or 1/16, so any input size is right), the
  RPN/RoI-head settings, the sample grid of RoI pooling (``sampling_ratio``; adaptive cannot export).
* ``deform_conv2d`` is the standard ``DeformConv`` (opset >= 19); ``deform_roi_pool`` a decomposition
  into Gather / arithmetic (:mod:`dcnv2.ops.traceable`).
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dcnv2.export import onnx_ops
from dcnv2.export.detector import (ExportableDetector, default_image_size, example_image, is_detector,
                                   traceable_level_pooling)

__all__ = ["MIN_OPSET", "DEFAULT_OPSET", "export_onnx", "onnx_session", "run_onnx", "require_onnxruntime",
           "MissingDependencyError"]

MIN_OPSET = onnx_ops.MIN_OPSET
DEFAULT_OPSET = 19

PathLike = Union[str, os.PathLike]


class MissingDependencyError(ImportError, RuntimeError):
    """An optional dependency (onnxruntime / onnx) is not installed; the message says how to install it."""


def require_onnxruntime():
    """Imports and returns ``onnxruntime``, or raises :class:`MissingDependencyError` saying how to get it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "onnxruntime is not installed, and running an exported ONNX model needs it: "
            "pip install 'dcnv2[deploy]' (or pip install 'onnxruntime>=1.31')"
        ) from exc
    return onnxruntime


def export_onnx(
    model: nn.Module,
    path: Optional[PathLike] = None,
    *,
    example_inputs: Optional[Tuple[Any, ...]] = None,
    image_size: Optional[Sequence[int]] = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_axes: Optional[Mapping[str, Mapping[int, str]]] = None,
) -> Union[Path, bytes]:
    """Exports a detector or a layer to ONNX.

    Args:
        model: a dcnv2 / torchvision detector (exported as :class:`ExportableDetector`: one image in,
            boxes/scores/labels[/masks] out), or any module built from dcnv2 layers (exported as is, in
            eval mode; give ``example_inputs``).
        path: the ``.onnx`` file to write; None returns the serialised model as bytes.
        example_inputs: inputs to trace with. Detectors default to a random Tensor[3, H, W] of
            ``image_size``.
        image_size: (height, width) of the detector's traced input (default: the model's test size,
            square). Without ``dynamic`` the exported graph only accepts this size.
        dynamic: detectors: free image height and width; layers: every axis of every 4-d input except
            the channels, and the first axis of other inputs, is free.
        opset: ONNX opset, >= 19 (the first with ``DeformConv``).
        input_names, output_names, dynamic_axes: override the defaults (``image`` / ``boxes`` ...,
            ``input_<i>`` / ``output_<i>``).

    Returns:
        ``path`` as a Path, or the model bytes when ``path`` is None.

    Raises:
        ValueError: ``opset`` < 19, a malformed ``image_size``, or a layer without ``example_inputs``.
    """
    onnx_ops.check_opset(opset)
    onnx_ops.register()
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"export_onnx traces on CPU (where deform_conv2d maps to DeformConv); the model is on "
                         f"{sorted(devices)}: call model.cpu() first")
    if is_detector(model):
        wrapped = model if isinstance(model, ExportableDetector) else ExportableDetector(model)
        if example_inputs is None:
            example_inputs = (example_image(image_size or default_image_size(wrapped)),)
        inputs = list(input_names or ["image"])
        outputs = list(output_names or wrapped.names)
        axes = dynamic_axes
        if axes is None and dynamic:
            axes = {inputs[0]: {1: "height", 2: "width"}}
    else:
        if example_inputs is None:
            raise ValueError(f"example_inputs are required to export a {type(model).__name__} (not a detector)")
        wrapped = model.eval()
        tensors = [x for x in example_inputs if isinstance(x, Tensor)]
        inputs = list(input_names or [f"input_{i}" for i in range(len(tensors))])
        outputs = list(output_names or ["output_0"])
        axes = dynamic_axes
        if axes is None and dynamic:
            axes = {name: ({0: f"{name}_n", 2: f"{name}_h", 3: f"{name}_w"} if x.dim() == 4 else {0: f"{name}_n"})
                    for name, x in zip(inputs, tensors)}
            axes.update({name: {0: f"{name}_n", 2: f"{name}_h", 3: f"{name}_w"} for name in outputs})
    f: Union[io.BytesIO, str] = io.BytesIO() if path is None else str(path)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the ops' argument checks read shapes as Python values while tracing: harmless for the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torchvision's ONNX helpers use torch.jit.script
        warnings.filterwarnings("ignore", message=".*(To copy construct from a tensor|advanced indexing).*")
        with torch.no_grad(), traceable_level_pooling():
            torch.onnx.export(wrapped, tuple(example_inputs), f, dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=dict(axes) if axes else None,
                              do_constant_folding=True)
    return f.getvalue() if isinstance(f, io.BytesIO) else Path(path)


def onnx_session(model: Union[PathLike, bytes], *, threads: Optional[int] = None):
    """An ONNX Runtime CPU ``InferenceSession`` for an exported model (file path or bytes).

    Args:
        threads: intra-op threads (default: ONNX Runtime's, one per core).

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        FileNotFoundError: ``model`` is a path that does not exist.
    """
    ort = require_onnxruntime()
    if not isinstance(model, (bytes, bytearray)):
        if not Path(model).is_file():
            raise FileNotFoundError(f"ONNX model {str(model)!r} not found")
        model = str(model)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx(session, *inputs: Tensor) -> List[Tensor]:
    """Runs ``session`` on tensors (given in the order of the model's inputs); returns its outputs as tensors."""
    names = [i.name for i in session.get_inputs()]
    if len(inputs) != len(names):
        raise ValueError(f"the ONNX model takes {len(names)} inputs {names}, got {len(inputs)}")
    feed: Dict[str, Any] = {n: x.detach().cpu().contiguous().numpy() for n, x in zip(names, inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]
