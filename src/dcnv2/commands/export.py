"""``dcnv2 export``: a trained detector to ONNX (standard DeformConv, ONNX Runtime), an OpenVINO IR or a
torch.export program."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint's detector to ONNX, OpenVINO or torch.export",
        description="Rebuild the detector from its checkpoint (inference model: no training-only branches) and "
                    "export it. ONNX: one image Tensor[3, H, W] (float, 0..1) in, boxes/scores/labels[/masks] out, "
                    "deformable convs as the standard DeformConv (opset >= 19). openvino: an OpenVINO IR (.xml + "
                    ".bin) through OpenVINO's PyTorch frontend, deformable convs as its DeformableConvolution, at "
                    "the traced size. torch-export: a .pt2 program (torch.export.save). Unless --no-verify, the exported model and PyTorch are run on one "
                    "random image and their detections compared.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint_last.pth or model_final.pth of `dcnv2 train`")
    p.add_argument("--format", required=True, choices=("onnx", "openvino", "torch-export"), help="what to write")
    p.add_argument("--out", required=True, help="output file (.onnx, .xml with its .bin beside it, or .pt2)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="traced input size (default: the model's test size, square)")
    p.add_argument("--dynamic", action="store_true",
                   help="free input height and width (torch-export keeps the resize's aspect guard; not for openvino, "
                        "whose IR takes the traced size)")
    p.add_argument("--opset", type=int, default=19, help="ONNX opset (>= 19, the first with DeformConv)")
    p.add_argument("--no-verify", action="store_true", help="skip running the exported model against PyTorch")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch

    from dcnv2.engine import load_model
    from dcnv2.export.detector import ExportableDetector, default_image_size, example_image
    from dcnv2.export.verify import compare_detections

    if args.format == "onnx":  # fail on a bad opset before loading anything
        from dcnv2.export.onnx_ops import check_opset

        check_opset(args.opset)
        if not args.no_verify:
            from dcnv2.export.onnx import MissingDependencyError, require_onnxruntime

            try:
                require_onnxruntime()
            except MissingDependencyError as exc:
                raise RuntimeError(f"{exc}; or pass --no-verify to export without running the model") from exc
    if args.format == "openvino":  # fail on a bad request before loading anything
        from dcnv2.export.openvino import require_openvino

        if args.dynamic:
            raise ValueError("--dynamic is not available with --format openvino: the traced graph fixes which side "
                             "limits the resize, so the IR takes the traced size only; pass --image-size H W")
        if not args.out.endswith(".xml"):
            raise ValueError(f"--out must name the IR's .xml file with --format openvino (the weights go to a .bin "
                             f"beside it), got {args.out!r}")
        require_openvino()
    model, spec = load_model(args.checkpoint, device="cpu")
    wrapped = ExportableDetector(model)
    size = tuple(args.image_size) if args.image_size else default_image_size(wrapped)
    image = example_image(size)
    if args.format == "onnx":
        from dcnv2.export.onnx import export_onnx, onnx_session, run_onnx

        path = export_onnx(wrapped, args.out, image_size=size, dynamic=args.dynamic, opset=args.opset)
        run_exported = None if args.no_verify else (lambda x: run_onnx(onnx_session(path), x))
    elif args.format == "openvino":
        from dcnv2.export.openvino import export_openvino, openvino_compile, run_openvino

        export_openvino(wrapped, args.out, image_size=size)
        path = Path(args.out)
        run_exported = None if args.no_verify else (lambda x: run_openvino(openvino_compile(path), x))
    else:
        from dcnv2.export.torch_export import export_program, save_program

        program = export_program(wrapped, image_size=size, dynamic=args.dynamic)
        path = save_program(program, args.out)
        run_exported = None if args.no_verify else (lambda x: program.module()(x))
    weights = path.with_suffix(".bin") if args.format == "openvino" else path  # the IR's size is its weights'
    size_text = f"{weights.stat().st_size / 1e6:.1f} MB" + (f" with {weights.name}" if weights != path else "")
    print(f"wrote {path} ({size_text}): {spec.arch} {spec.preset} {spec.backbone}"
          f"{' FPN' if spec.fpn else ''}, input image [3, {'H' if args.dynamic else size[0]}, "
          f"{'W' if args.dynamic else size[1]}], outputs {', '.join(wrapped.names)}")
    if run_exported is not None:
        with torch.no_grad():
            expected = wrapped(image)
        match = compare_detections(expected, run_exported(image))
        print(f"verified on a random {size[0]}x{size[1]} image against PyTorch: {match}")
        if not match.ok:
            return 1
    return 0
