"""Detectors exported to ONNX (run in ONNX Runtime) and with torch.export, compared with PyTorch on synthetic
validation images; ``dcnv2 export`` from a checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dcnv2.export.detector import ExportableDetector
from dcnv2.export.onnx import export_onnx, onnx_session, run_onnx
from dcnv2.export.torch_export import export_program, load_program, save_program
from dcnv2.export.verify import compare_detections
from dcnv2.models import PRESETS, faster_rcnn, mask_rcnn

pytest.importorskip("onnxruntime")

SIZE = 64
SMALL = dict(backbone="resnet18", num_classes=4, min_size=SIZE, max_size=SIZE, feature_channels=16,
             representation_size=32, mdpool_hidden=16, rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20,
             box_score_thresh=0.0, box_detections_per_img=100)
# every candidate (20 proposals x 3 classes) survives the score threshold and the detection cap: a near-tie
# at a cut could otherwise keep different detections in two runtimes that agree to 1e-7


def _base(name: str) -> str:
    return getattr(PRESETS[name], "base", name) or name


BASE_PRESETS = [n for n in PRESETS if _base(n) == n]
MIMIC_PRESETS = [n for n in PRESETS if _base(n) != n]


def _randomise(model, seed=0):
    """Untrained detectors score every box ~1/C; random offsets and wider logits make a real test."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        for name in ("conv_offset", "offset_fc"):
            sub = getattr(mod, name, None)
            if sub is not None:
                for p in sub.parameters():
                    p.data = torch.randn(p.shape, generator=g) * 0.02
    cls = model.roi_heads.box_predictor.cls_score
    cls.weight.data = torch.randn(cls.weight.shape, generator=g) * 0.5
    return model


def _detector(preset, *, fpn=False, builder=faster_rcnn, seed=0):
    torch.manual_seed(seed)
    anchors = (8, 16, 32, 48, 64) if fpn else (8, 16, 32)
    model = builder(preset=preset, fpn=fpn, anchor_sizes=anchors, roi_canonical_scale=28, **SMALL)
    return _randomise(model.eval(), seed)


def _synthetic_images(n=2, size=SIZE, seed=0):
    from dcnv2.data.synthetic import SynthConfig, render_image

    rng = np.random.default_rng(seed)
    cfg = SynthConfig(image_size=size)
    return [torch.from_numpy(render_image(rng, cfg)[0].copy()).permute(2, 0, 1).float() / 255 for _ in range(n)]


def _deform_conv_layers(model):
    from dcnv2.nn import DeformConv2d, ModulatedDeformConv2d

    return sum(isinstance(m, (DeformConv2d, ModulatedDeformConv2d)) for m in model.modules())


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


@pytest.mark.parametrize("preset", BASE_PRESETS)
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


def _checkpoint(tmp_path, preset="mdconv-c3c5-mdpool"):
    from dcnv2.engine import ModelSpec, build_model, save_checkpoint

    kwargs = {k: v for k, v in SMALL.items() if k not in ("backbone", "num_classes", "min_size", "max_size")}
    spec = ModelSpec(arch="faster_rcnn", preset=preset, backbone="resnet18", fpn=False, num_classes=4,
                     min_size=SIZE, max_size=SIZE, kwargs=dict(kwargs, anchor_sizes=(8, 16, 32)))
    torch.manual_seed(0)
    model = _randomise(build_model(spec).eval())
    return save_checkpoint({"model": model.state_dict(), "model_spec": spec.to_dict()}, tmp_path / "model_final.pth")


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
