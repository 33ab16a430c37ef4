"""ONNX and torch.export round trips of the dcnv2 layers and ops: DeformConv (opset 19) in ONNX Runtime,
deform_roi_pool's decomposition, and the errors for a missing onnxruntime or a too-old opset."""
from __future__ import annotations

import builtins
import io
import sys

import pytest
import torch

import dcnv2  # noqa: F401
from dcnv2.export import onnx_ops
from dcnv2.export.onnx import MissingDependencyError, export_onnx, onnx_session, require_onnxruntime, run_onnx
from dcnv2.export.torch_export import export_program, load_program, save_program
from dcnv2.nn import DeformConv2d, DeformRoIPool, ModulatedDeformConv2d, ModulatedDeformRoIPool
from dcnv2.ops import deform_roi_pool, traceable

pytest.importorskip("onnxruntime")

ATOL = 1e-4  # layers, float32 (the bound)

CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, offset_groups, bias)
    (4, 6, 3, 1, 1, 1, 1, 1, True),
    (4, 6, 3, (2, 1), (1, 2), (1, 2), 2, 2, True),
    (6, 4, (3, 2), 2, 0, 1, 2, 3, False),
    (4, 4, 1, 1, 0, 1, 1, 4, True),
    (8, 8, 3, 1, 2, 2, 4, 2, False),
]


def _layer(cls, case, seed=0):
    cin, cout, k, s, p, d, g, og, bias = case
    torch.manual_seed(seed)
    m = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, offset_groups=og, bias=bias).eval()
    # non-zero offsets (several pixels, some outside the map) and masks: a fresh layer would be a plain conv
    torch.nn.init.normal_(m.conv_offset.weight, std=0.7)
    torch.nn.init.normal_(m.conv_offset.bias, std=1.0)
    return m


def _onnx_ops_of(model_bytes):
    onnx = pytest.importorskip("onnx")
    return [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]


@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"case{i}" for i in range(len(CONV_CASES))])
def test_deform_conv_layer_onnx_round_trip(cls, case):
    m = _layer(cls, case)
    x = torch.randn(2, case[0], 11, 9)
    model = export_onnx(m, example_inputs=(x,), dynamic=True)
    assert _onnx_ops_of(model).count("DeformConv") == 1  # the standard op, not a decomposition
    session = onnx_session(model)
    for shape in ((2, case[0], 11, 9), (1, case[0], 14, 10)):  # the traced and another size
        xx = torch.randn(shape)
        (y,) = run_onnx(session, xx)
        with torch.no_grad():
            ref = m(xx)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


def test_deform_conv_zero_bias_with_mask():
    """No bias but a mask: ONNX's positional B input gets zeros, the mask still lands in the mask slot."""
    m = _layer(ModulatedDeformConv2d, (4, 4, 3, 1, 1, 1, 1, 1, False))
    x = torch.randn(1, 4, 8, 8)
    blob = export_onnx(m, example_inputs=(x,))
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load_from_string(blob), full_check=True)  # a valid standard-domain model
    (y,) = run_onnx(onnx_session(blob), x)
    torch.testing.assert_close(y, m(x).detach(), atol=ATOL, rtol=0)


def test_onnx_offset_layout_is_torchvisions():
    """ONNX Runtime's DeformConv on our offsets/mask equals torchvision's deform_conv2d: catches a swapped
    (dy, dx), a tap order or an offset-group order that differs between the layouts."""
    import torchvision

    torch.manual_seed(3)
    x = torch.randn(1, 4, 7, 6)
    weight = torch.randn(4, 2, 3, 3)
    off = torch.randn(1, 2 * 2 * 9, 7, 6) * 1.5  # two offset groups
    mask = torch.rand(1, 2 * 9, 7, 6)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", weight)

        def forward(self, x, off, mask):
            return dcnv2.ops.deform_conv2d(x, off, self.weight, None, 1, 1, 1, mask)

    (y,) = run_onnx(onnx_session(export_onnx(Fixed(), example_inputs=(x, off, mask))), x, off, mask)
    ref = torchvision.ops.deform_conv2d(x, off, weight, None, 1, 1, 1, mask)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("kind", ["roialign", "dpool", "mdpool"])
def test_traceable_roi_pool_matches_kernel(kind, aligned):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, 10)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, -5.0, -3.0, 8.0, 50.0], [1, 20.0, 20.0, 20.0, 20.0],
                         [0, 35.0, 40.0, 60.0, 60.0], [1, -40.0, -40.0, -30.0, -35.0]])
    off = torch.randn(5, 2, 3, 4) if kind != "roialign" else None
    mask = torch.rand(5, 1, 3, 4) if kind == "mdpool" else None
    got = traceable.deform_roi_pool(x, rois, off, mask, (3, 4), 0.25, 2, 0.1, aligned)
    ref = deform_roi_pool(x, rois, off, mask, (3, 4), 0.25, 2, 0.1, aligned)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    empty = traceable.deform_roi_pool(x, rois[:0], off[:0] if off is not None else None,
                                      mask[:0] if mask is not None else None, (3, 4), 0.25, 2, 0.1, aligned)
    assert empty.shape == (0, 5, 3, 4)


def test_traceable_roi_pool_rejects_adaptive_grid():
    with pytest.raises(ValueError, match="sampling_ratio"):
        traceable.deform_roi_pool(torch.randn(1, 2, 4, 4), torch.zeros(1, 5), None, None, (2, 2), 1.0, 0, 0.1, True)


@pytest.mark.parametrize("cls", [DeformRoIPool, ModulatedDeformRoIPool], ids=["dpool", "mdpool"])
def test_deform_roi_pool_layer_onnx_round_trip(cls):
    torch.manual_seed(0)
    kw = dict(hidden_channels=16) if cls is ModulatedDeformRoIPool else {}
    layer = cls(5, 3, spatial_scale=0.25, **kw).eval()
    for p in layer.offset_fc.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 5, 12, 10)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, -5.0, -3.0, 8.0, 50.0], [1, 3.0, 4.0, 20.0, 20.0]])
    model = export_onnx(layer, example_inputs=(x, rois), input_names=["x", "rois"], output_names=["y"],
                        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "rois": {0: "k"}})
    ops = _onnx_ops_of(model)
    assert "Gather" in ops and not any(o.startswith("dcnv2") for o in ops)  # standard ops only
    session = onnx_session(model)
    for xx, rr in ((x, rois), (torch.randn(1, 5, 17, 9), rois[1:2] * torch.tensor([0, 1, 1, 1, 1.0])),
                   (x, rois[:0])):
        (y,) = run_onnx(session, xx, rr)
        with torch.no_grad():
            ref = layer(xx, rr)
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


def test_too_old_opset_is_a_clear_error():
    m = _layer(DeformConv2d, CONV_CASES[0])
    with pytest.raises(ValueError, match=r"opset 18 is too old.*DeformConv.*>= 19"):
        export_onnx(m, example_inputs=(torch.randn(1, 4, 8, 8),), opset=18)
    # the symbolic itself refuses too, for a direct torch.onnx.export at an old opset
    onnx_ops.register()
    with pytest.raises(Exception, match="too old"):
        torch.onnx.export(m, (torch.randn(1, 4, 8, 8),), io.BytesIO(), dynamo=False, opset_version=17)


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MissingDependencyError, match=r"onnxruntime is not installed.*dcnv2\[deploy\]"):
        require_onnxruntime()
    with pytest.raises(RuntimeError, match="onnxruntime is not installed"):
        onnx_session(b"not used")


@pytest.mark.parametrize("cls", [DeformConv2d, ModulatedDeformConv2d], ids=["dcnv1", "dcnv2"])
def test_deform_conv_layer_torch_export(cls, tmp_path):
    m = _layer(cls, CONV_CASES[1])
    x = torch.randn(2, 4, 11, 9)
    program = export_program(m, example_inputs=(x,), dynamic=True)
    assert "torch.ops.dcnv2.deform_conv2d" in str(program.graph_module.code)
    loaded = load_program(save_program(program, tmp_path / "layer.pt2"))
    for xx in (x, torch.randn(3, 4, 13, 8)):
        torch.testing.assert_close(loaded.module()(xx), m(xx).detach(), atol=1e-5, rtol=0)


def test_deform_roi_pool_layer_torch_export():
    torch.manual_seed(0)
    layer = ModulatedDeformRoIPool(5, 3, spatial_scale=0.25, hidden_channels=16).eval()
    for p in layer.offset_fc.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 5, 12, 10)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, -5.0, -3.0, 8.0, 50.0]])
    program = export_program(layer, example_inputs=(x, rois))
    assert "torch.ops.dcnv2.deform_roi_pool" in str(program.graph_module.code)
    torch.testing.assert_close(program.module()(x, rois), layer(x, rois).detach(), atol=1e-5, rtol=0)
