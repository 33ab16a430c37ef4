"""Every command and code block of README.md runs, at a tiny size, or is listed here with why it cannot run.

The shell blocks (```sh / ```bash) are split into command lines (comments dropped, ``\\`` continuations joined).
Each line must match an entry of RUN_TINY (run in-process through ``dcnv2.cli.main`` in a temporary folder, with the
extra arguments that make it tiny: argparse keeps the last value of a repeated option) or of CANNOT_RUN (the
reason). A README command that matches neither fails the test: add it to one of them. The Python blocks compile,
and run with the TINY_PYTHON substitutions (smaller backbones and images; each must still match the README).
"""
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# command prefix -> arguments appended to make it tiny
RUN_TINY = {
    "dcnv2 data synth": ["--num-train", "4", "--num-val", "2", "--image-size", "64", "--no-preview", "--no-progress"],
    "dcnv2 train": ["--max-iters", "1", "--batch-size", "2", "--min-size", "64", "--max-size", "64", "--workers", "0",
                    "--no-progress", "--no-tensorboard", "--mimic-rois", "2", "--mimic-patch-size", "32",
                    "--model-arg", "rpn_post_nms_top_n_train=100", "--model-arg", "box_batch_size_per_image=32",
                    "--model-arg", "feature_channels=16", "--model-arg", "representation_size=32",
                    "--model-arg", "mdpool_hidden=16"],
    "dcnv2 eval": ["--no-progress"],
    "dcnv2 analyze figure": ["--no-saliency", "--threads", "1"],
    # the comparison with PyTorch (9 s here) is what tests/test_export_detectors.py checks
    "dcnv2 export": ["--image-size", "64", "64", "--no-verify"],
}
# command prefix -> why this test does not run it
CANNOT_RUN = {
    "make demo": "takes minutes (about 8 on 2 cores); tests/test_experiments_demo.py runs the demo at a tiny size",
    "make test": "is the test suite that runs this test",
    "make docs": "tests/test_docs.py runs the same build (mkdocs build --strict)",
    "pip install": "installs into the environment; these tests run in one where the package is installed",
    "dcnv2 convert": "needs a peer's zoo checkpoint, which cannot be downloaded here; tests/test_zoo.py converts "
                     "fixtures with the peers' exact key names and shapes",
}
# README Python block (by a line it contains) -> [(text in the block, tiny replacement)]
TINY_PYTHON = {
    "ModulatedDeformConv2d(64, 128": [("56, 56", "12, 12")],
    'preset="dcnv2", backbone="resnet50"': [
        ('backbone="resnet50", num_classes=81)',
         'backbone="resnet18", num_classes=81, min_size=64, max_size=64, '
         'mimic={"patch_size": 32, "rois_per_image": 2}, rpn_post_nms_top_n_train=100)'),
        ("torch.rand(3, 480, 640)", "torch.rand(3, 64, 80)"),
    ],
    "analysis.ImageNode": [("min_size=128, max_size=128", "min_size=64, max_size=64"), ("x=64, y=64", "x=32, y=32"),
                           ("rgb=prepared.rgb)", "rgb=prepared.rgb, refine=False)")],
}


def _blocks(*languages):
    text = README.read_text()
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in languages]


def _commands():
    lines = []
    for block in _blocks("sh", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def _match(words, table):
    keys = [k for k in table if words[:len(k.split())] == k.split()]
    return max(keys, key=len) if keys else None


def test_readme_has_commands_and_code():
    assert len(_commands()) >= 5 and len(_blocks("python")) >= 3


def test_every_command_runs_or_says_why_not():
    unlisted = [" ".join(w) for w in _commands() if not (_match(w, RUN_TINY) or _match(w, CANNOT_RUN))]
    assert unlisted == [], "README commands neither run by this test nor listed in CANNOT_RUN with a reason"
    for reason in CANNOT_RUN.values():
        assert len(reason) > 20


def test_commands_at_tiny_size(tmp_path, monkeypatch):
    import torch

    from dcnv2.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    ran = []
    try:
        for words in _commands():
            key = _match(words, RUN_TINY)
            if key is None:
                continue
            assert words[0] == "dcnv2", words
            argv = words[1:] + RUN_TINY[key]
            assert main(argv) == 0, " ".join(argv)
            ran.append(key)
    finally:
        torch.set_num_threads(threads)
    assert set(ran) == set(RUN_TINY), f"RUN_TINY entries no README command uses: {set(RUN_TINY) - set(ran)}"
    assert (tmp_path / "fig.png").is_file() and (tmp_path / "det.onnx").is_file()


def test_python_blocks_compile():
    for i, block in enumerate(_blocks("python")):
        compile(block, f"README.md python block {i}", "exec")


@pytest.mark.parametrize("marker", sorted(TINY_PYTHON))
def test_python_block_runs_tiny(marker):
    blocks = [b for b in _blocks("python") if marker in b]
    assert len(blocks) == 1, f"no single README python block contains {marker!r}"
    code = blocks[0]
    for old, new in TINY_PYTHON[marker]:
        assert old in code, f"README block changed: {old!r} is gone; update TINY_PYTHON"
        code = code.replace(old, new)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)


def test_every_python_block_is_run():
    assert all(any(m in b for m in TINY_PYTHON) for b in _blocks("python"))


def test_readme_links_resolve():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), target
    assert "<!-- table3-pretrained -->" in (ROOT / "docs" / "tables.md").read_text()
