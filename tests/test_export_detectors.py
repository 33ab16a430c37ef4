"""Detectors exported to ONNX (run in ONNX Runtime) and with torch.export, compared with PyTorch on synthetic
validation images; ``dcnv2 export`` from a checkpoint."""
from __future__ import annotations

import pytest
import torch

from export_support import (BASE_PRESETS, MIMIC_PRESETS, SIZE, LevelPool, _base, _checkpoint, _deform_conv_layers,
                            _detector, _synthetic_images, level_pool_inputs)
from dcnv2.export.detector import ExportableDetector
from dcnv2.export.onnx import export_onnx, onnx_session, run_onnx
from dcnv2.export.torch_export import export_program, load_program, save_program
from dcnv2.export.verify import compare_detections
from dcnv2.models import mask_rcnn

pytest.importorskip("onnxruntime")


def _check_onnx(model, images, **export_kw):
    wrapped = ExportableDetector(model)
    blob = export_onnx(wrapped, **export_kw)
    onnx = pytest.importorskip("onnx")
    ops = [n.op_type for n in onnx.load_from_string(blob).graph.node]
    assert ops.count("DeformConv") == _deform_conv_layers(model)
    session = onnx_session(blob)
    for image in images:
        with torch.no_grad():
            expected = wrapped(image)
        actual = run_onnx(session, image)
        match = compare_detections(expected, actual)
        assert match.expected > 0 and match.ok, match
        if len(expected) > 3:  # Mask R-CNN's pasted masks
            torch.testing.assert_close(actual[3], expected[3], atol=1e-4, rtol=0)
    return blob


# these four cover every exported layer kind (conv, DCNv1 and DCNv2 convs; RoIAlign, RoIPool, dpool and mdpool);
# the presets that only move deformable convs to other stages run in `make test-slow` (about 3 s each)
EVERY_LAYER_KIND = ["regular", "regular-roipool", "dconv-c3c5-dpool", "mdconv-c3c5-mdpool"]


@pytest.mark.parametrize("preset", [p if p in EVERY_LAYER_KIND else pytest.param(p, marks=pytest.mark.slow)
                                    for p in BASE_PRESETS])
def test_every_preset_exports_to_onnx_and_runs_the_same(preset):
    """The paper's (dilated conv5) Faster R-CNN of each preset: same detections in ONNX Runtime."""
    _check_onnx(_detector(preset), _synthetic_images(2), image_size=(SIZE, SIZE))


@pytest.mark.parametrize("preset", MIMIC_PRESETS)
def test_mimicking_presets_export_their_base_preset_model(preset):
    """The training-only mimicking branch is not exported: the inference model is the base preset's."""
    model = _detector(preset)
    assert getattr(model, "mimic", None) is not None
    wrapped = ExportableDetector(model)
    assert getattr(wrapped.detector, "mimic", None) is None and model.mimic is not None  # a copy is stripped
    base = ExportableDetector(_detector(_base(preset)))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(wrapped) == shapes(base)


def test_mimicking_preset_onnx_runs_the_same():
    if not MIMIC_PRESETS:
        pytest.skip("no feature-mimicking presets")
    preset = "dcnv2" if "dcnv2" in MIMIC_PRESETS else MIMIC_PRESETS[0]
    blob = _check_onnx(_detector(preset), _synthetic_images(1), image_size=(SIZE, SIZE))
    onnx = pytest.importorskip("onnx")
    names = [i.name for i in onnx.load_from_string(blob).graph.initializer]
    assert not any("mimic" in n for n in names)


@pytest.mark.slow  # ~20 s on 2 busy cores: the mask paste loop makes the largest graph
def test_fpn_mask_rcnn_onnx_dynamic_size():
    """ResNet-FPN Mask R-CNN with DCNv2 convs and mdpool on both heads; traced at one size, run at others."""
    model = _detector("mdconv-c3c5-mdpool", fpn=True, builder=mask_rcnn)
    images = _synthetic_images(1) + [torch.rand(3, SIZE, 48), torch.rand(3, 56, SIZE)]
    _check_onnx(model, images, image_size=(SIZE, SIZE), dynamic=True)


@pytest.mark.parametrize("kind", ["align", "mdpool"])
def test_fpn_roi_pooling_traced_on_one_level_pools_every_level(kind):
    """Traced with every RoI on the first FPN level, run with RoIs on both: none may be lost (a trace of the eager
    per-level loop keeps only the levels the traced RoIs used)."""
    layer = LevelPool(kind).eval()
    traced_inputs = level_pool_inputs(big=0, small=5)
    blob = export_onnx(layer, example_inputs=traced_inputs, input_names=["p2", "p3", "boxes"],
                       dynamic_axes={"boxes": {0: "n"}, "output_0": {0: "n"}})
    session = onnx_session(blob)
    for inputs in (traced_inputs, level_pool_inputs(big=3, small=4, seed=1), level_pool_inputs(big=2, small=0)):
        with torch.no_grad():
            expected = layer(*inputs)
        torch.testing.assert_close(run_onnx(session, *inputs)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.export of a whole detector (~10 s); the ONNX export of every layer kind stays in make test
def test_torch_export_detector_runs_the_same(tmp_path):
    """DCNv2 convs and mdpool; exported with free (square) sizes, saved, loaded, run at two sizes."""
    model = _detector("mdconv-c3c5-mdpool")
    wrapped = ExportableDetector(model)
    program = export_program(wrapped, image_size=(SIZE, SIZE), dynamic=True)
    code = str(program.graph_module.code)
    assert "dcnv2.deform_conv2d" in code and "dcnv2.deform_roi_pool" in code
    loaded = load_program(save_program(program, tmp_path / "det.pt2"))
    for image in _synthetic_images(1, seed=1) + _synthetic_images(1, size=48, seed=2):
        with torch.no_grad():
            expected = wrapped(image)
        match = compare_detections(expected, loaded.module()(image))
        assert match.expected > 0 and match.ok, match


def test_torch_export_refuses_mask_rcnn():
    with pytest.raises(ValueError, match="Mask R-CNN.*paste_masks_in_image.*ONNX"):
        export_program(_detector("regular", fpn=True, builder=mask_rcnn))


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"),
                                        pytest.param("torch-export", "pt2", marks=pytest.mark.slow)])
def test_cli_export_writes_and_verifies(tmp_path, capsys, fmt, suffix):
    from dcnv2.cli import main

    ckpt = _checkpoint(tmp_path)
    out = tmp_path / f"det.{suffix}"
    assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"wrote {out}" in text
    assert "-> same" in text and "labels equal" in text


def test_cli_export_old_opset_is_an_error(tmp_path, capsys):
    from dcnv2.cli import main

    ckpt = _checkpoint(tmp_path)
    rc = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x.onnx"),
               "--opset", "17"])
    assert rc == 2
    assert "opset 17 is too old" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
