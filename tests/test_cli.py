"""The ``dcnv2`` command line: every registered command's --help, argument errors, train/eval/predict runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dcnv2.cli import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_engine_commands_are_registered():
    assert {"train", "eval", "predict", "demo"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dcnv2 {command}")
    assert "--help" in out


def test_top_level_help_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "dcnv2.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "eval", "predict", "demo"):
        assert name in proc.stdout


@pytest.mark.parametrize("argv", [
    ["train", "--data", "d"],                      # --out missing
    ["train", "--out", "o"],                       # --data missing
    ["train", "--data", "d", "--out", "o", "--model-arg", "novalue"],
    ["eval", "--data", "d"],                       # --checkpoint missing
    ["predict", "--checkpoint", "c"],              # no image
    ["eval", "--checkpoint", "c", "--data", "d", "--iou-types", "keypoints"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(tmp_path)]) == 2
    assert "none.pth" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pth"), str(tmp_path / "x.png")]) == 2
    assert "none.pth" in capsys.readouterr().err


def test_train_arguments_reach_the_config():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "dconv-c3c5", "--lr-steps", "8",
                                      "--max-iters", "5", "--amp", "--clip-grad-norm", "1.5", "--resume",
                                      "--model-arg", "rpn_post_nms_top_n_train=300", "--train-sizes", "600", "800"])
    assert args.preset == "dconv-c3c5" and args.lr_steps == [8.0] and args.max_iters == 5 and args.amp
    assert args.clip_grad_norm == 1.5 and args.resume is True and args.train_sizes == [600, 800]
    assert args.model_arg == [("rpn_post_nms_top_n_train", 300)]
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--resume", "run/ck.pth"])
    assert args.resume == "run/ck.pth"
