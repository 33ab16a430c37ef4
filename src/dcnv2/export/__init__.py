"""Deployment: ONNX export (standard ``DeformConv``, opset >= 19) run by ONNX Runtime, ``torch.export``, and
reduced-precision CPU inference of the detectors."""
