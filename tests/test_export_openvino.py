"""Detectors converted to OpenVINO IR through its PyTorch frontend (deformable convs as its DeformableConvolution),
run on OpenVINO's CPU plugin and compared with PyTorch on synthetic validation images; ``dcnv2 export --format
openvino`` from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from export_support import SIZE, LevelPool, _checkpoint, _deform_conv_layers, _detector, _synthetic_images, \
    level_pool_inputs
from dcnv2.export.detector import ExportableDetector
from dcnv2.export.verify import compare_detections

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'dcnv2[deploy]'): the OpenVINO "
                                            "export cannot be tested")

from dcnv2.export.openvino import export_openvino, openvino_compile, run_openvino  # noqa: E402


def _deformable_ops(model):
    return [op for op in model.get_ops() if op.get_type_name() == "DeformableConvolution"]


def _check(model, images, path):
    wrapped = ExportableDetector(model)
    converted = export_openvino(wrapped, path, image_size=(SIZE, SIZE))
    ops = _deformable_ops(converted)
    assert len(ops) == _deform_conv_layers(model) > 0
    # bilinear samples near the border mix in zeros from outside the map, as torchvision's op (and ours) do
    assert all(op.get_attributes()["bilinear_interpolation_pad"] for op in ops)
    assert path.is_file() and path.with_suffix(".bin").is_file()
    compiled = openvino_compile(path)  # from the written IR, not the in-memory model
    for image in images:
        with torch.no_grad():
            expected = wrapped(image)
        match = compare_detections(expected, run_openvino(compiled, image))
        assert match.expected > 0 and match.ok, match
    return compiled


# slow (CI runs it): make test converts and verifies the same mdconv-c3c5-mdpool detector through the CLI
# (test_cli_export_openvino_writes_and_verifies); dcnv2's inference graph, its training-only mimicking branch
# stripped, is mdconv-c3c5-mdpool's
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mdconv-c3c5-mdpool", "dcnv2"])
def test_preset_converts_to_openvino_and_gives_pytorchs_detections(preset, tmp_path):
    """The paper's Faster R-CNN with modulated deformable c3-c5 convs and mdpool (dcnv2: its inference model,
    the feature-mimicking branch left out)."""
    compiled = _check(_detector(preset), _synthetic_images(2), tmp_path / "det.xml")
    with pytest.raises(ValueError, match=r"input 0 must have shape \[3, 64, 64\].*got \[3, 64, 48\]"):
        run_openvino(compiled, torch.rand(3, SIZE, 48))  # the IR takes the traced size only


@pytest.mark.parametrize("kind", [pytest.param("align", marks=pytest.mark.slow), "mdpool"])  # align: ~7 s
def test_fpn_roi_pooling_traced_on_one_level_pools_every_level(kind):
    """Traced with every RoI on the first FPN level, run with RoIs on both and other RoI counts: none is lost."""
    layer = LevelPool(kind).eval()
    traced_inputs = level_pool_inputs(big=0, small=5)
    converted = export_openvino(layer, example_inputs=traced_inputs)
    for port in converted.inputs[2:]:  # any number of RoIs
        port.get_node().set_partial_shape(ov.PartialShape([-1, 4]))
    converted.validate_nodes_and_infer_types()
    compiled = openvino_compile(converted)
    for inputs in (traced_inputs, level_pool_inputs(big=3, small=4, seed=1), level_pool_inputs(big=2, small=0)):
        with torch.no_grad():
            expected = layer(*inputs)
        torch.testing.assert_close(run_openvino(compiled, *inputs)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~40 s on 2 busy cores: the mask paste loop makes the largest graph
def test_fpn_mask_rcnn_converts_with_its_masks(tmp_path):
    from dcnv2.models import mask_rcnn

    model = _detector("mdconv-c3c5-mdpool", fpn=True, builder=mask_rcnn)
    wrapped = ExportableDetector(model)
    compiled = openvino_compile(export_openvino(wrapped, image_size=(SIZE, SIZE)))
    image = _synthetic_images(1)[0]
    with torch.no_grad():
        expected = wrapped(image)
    actual = run_openvino(compiled, image)
    assert compare_detections(expected, actual).ok
    torch.testing.assert_close(actual[3], expected[3], atol=1e-4, rtol=0)


def test_bad_requests_are_errors_naming_the_argument(tmp_path, capsys):
    from dcnv2.cli import main

    with pytest.raises(ValueError, match=r"must name the IR's .xml file.*'det.onnx'"):
        export_openvino(_detector("regular"), "det.onnx")
    with pytest.raises(ValueError, match="precision must be"):
        openvino_compile("x.xml", precision="int4")
    with pytest.raises(FileNotFoundError, match="OpenVINO IR 'missing.xml' not found"):
        openvino_compile("missing.xml")
    ckpt = tmp_path / "none.pth"  # refused before the checkpoint is read
    assert main(["export", "--checkpoint", str(ckpt), "--format", "openvino", "--out", "d.xml", "--dynamic"]) == 2
    assert "--dynamic is not available with --format openvino" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--format", "openvino", "--out", "d.bin"]) == 2
    assert "--out must name the IR's .xml file" in capsys.readouterr().err


@pytest.mark.slow  # an R-18-FPN detector through OpenVINO's converter (~25 s); the layer-level conversions stay in make test
def test_cli_export_openvino_writes_and_verifies(tmp_path, capsys):
    from dcnv2.cli import main

    out = tmp_path / "ir" / "det.xml"
    assert main(["export", "--checkpoint", str(_checkpoint(tmp_path)), "--format", "openvino", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "with det.bin" in text
    assert "-> same" in text and "labels equal" in text
    constants = {str(op.get_element_type()) for op in ov.Core().read_model(str(out)).get_ops()
                 if op.get_type_name() == "Constant"}
    assert "<Type: 'float16'>" not in constants and "<Type: 'float32'>" in constants  # not compressed to f16
