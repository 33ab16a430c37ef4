"""The documentation site builds with warnings as errors (``make docs``: mkdocs.yml, docs/, the API pages).

``make test`` installs the ``docs`` extra, so CI really builds the site; elsewhere the test skips, saying why.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing(name):
    try:
        return importlib.util.find_spec(name) is None
    except ImportError:  # the parent package of a dotted name is absent
        return True


MISSING = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if _missing(name)]


@pytest.mark.skipif(bool(MISSING), reason=f"docs tools not installed ({', '.join(MISSING)}): pip install -e '.[docs]'")
@pytest.mark.slow  # the whole mkdocs site with its API pages (~12 s)
def test_docs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    for page in ("ops", "detectors", "mimicking", "training", "classification", "analysis", "deployment",
                 "zoo", "gpu", "benchmarks", "demo", "tables"):
        assert (site / page / "index.html").is_file(), page
    # the API pages are rendered from the docstrings, not left as ':::' directives
    for module, member in (("ops", "dcnv2.ops.deform_conv2d"), ("nn", "dcnv2.nn.ModulatedDeformConv2d"),
                           ("models", "dcnv2.models.detection.faster_rcnn"), ("engine", "dcnv2.engine.train.train"),
                           ("analysis", "dcnv2.analysis.saliency_region"), ("export", "dcnv2.export.export_onnx"),
                           ("zoo", "dcnv2.zoo.convert_checkpoint"),
                           ("experiments", "dcnv2.experiments.ablation.run_pretrained_ablation")):
        html = (site / "api" / module / "index.html").read_text()
        assert f'id="{member}"' in html, (module, member)
        assert ":::" not in html, module


def test_every_page_is_in_the_nav():
    """A page left out of mkdocs.yml's nav is a warning in --strict; this says which one without building."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p for p in pages if p not in nav] == []


def test_python_blocks_of_the_pages_compile():
    import re

    blocks = 0
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for i, match in enumerate(re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(), re.S | re.M)):
            if match.group(1) == "python":
                compile(match.group(2), f"{page.relative_to(ROOT)} block {i}", "exec")
                blocks += 1
    assert blocks >= 5
