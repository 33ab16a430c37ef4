"""The CPU runtimes' deformable convolutions, for benchmarks/deform_conv.py ``--peers``.

OpenVINO's ``DeformableConvolution`` (opset 8, ``bilinear_interpolation_pad=True``: torchvision's
zero-padded bilinear sampling) and ONNX Runtime's ``DeformConv`` (opset 19), each built for one fixed
shape with the weight as a constant, run in float32 (OpenVINO's ``INFERENCE_PRECISION_HINT`` is set to
f32: on a CPU with bf16 support it would otherwise compute in bfloat16) on a given number of threads.
Both come from the optional ``bench`` extra (``pip install -e '.[bench]'``); ``missing()`` names
what is not installed.
"""
from __future__ import annotations

import importlib.util

import numpy as np

PEERS = {"openvino": "openvino", "onnxruntime": "onnxruntime"}  # peer -> the package it needs


def missing() -> list[str]:
    """The peers' packages that are not installed."""
    return [pkg for pkg in PEERS.values() if importlib.util.find_spec(pkg) is None]


def openvino_runner(x, w, off, mask, threads: int, padding: int = 1):
    """A callable that runs OpenVINO's DeformableConvolution on (x, off, mask) and returns its output."""
    import openvino as ov
    import openvino.opset8 as ops

    xn, on, mn = (t.detach().numpy() for t in (x, off, mask))
    px = ops.parameter(list(xn.shape), np.float32, name="x")
    po = ops.parameter(list(on.shape), np.float32, name="offset")
    pm = ops.parameter(list(mn.shape), np.float32, name="mask")
    y = ops.deformable_convolution(px, po, ops.constant(w.detach().numpy()), [1, 1], [padding] * 2,
                                   [padding] * 2, [1, 1], mask=pm, bilinear_interpolation_pad=True)
    model = ov.Model([y], [px, po, pm], "deform_conv")
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                "INFERENCE_PRECISION_HINT": "f32",
                                                "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    inputs = {0: xn, 1: on, 2: mn}

    def run():
        request.infer(inputs, share_inputs=True)
        return request.get_output_tensor(0).data

    return run


def onnxruntime_runner(x, w, off, mask, threads: int, padding: int = 1):
    """A callable that runs ONNX Runtime's DeformConv (opset 19) on (x, off, mask) and returns its output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    xn, on, mn = (t.detach().numpy() for t in (x, off, mask))
    wn = w.detach().numpy()
    node = helper.make_node("DeformConv", ["x", "w", "offset", "", "mask"], ["y"],
                            kernel_shape=list(wn.shape[2:]), pads=[padding] * 4, strides=[1, 1],
                            dilations=[1, 1], group=1, offset_group=1)
    N, C, H, W = xn.shape
    graph = helper.make_graph(
        [node], "deform_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xn.shape)),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, list(on.shape)),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, list(mn.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(wn, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: its spinning threads would take the cores from whatever runs next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"x": xn, "offset": on, "mask": mn}
    return lambda: sess.run(None, feeds)[0]
