"""ImageFolder classification data: `dcnv2 data check` names every broken file, the loader reads every mode
as RGB, train-cls refuses a broken set before training and stops on a file that breaks during training with
its name, keeping the checkpoint that --resume continues from. CLI cases check the exit status, the file or
argument named and that there is no traceback; they run in this process (tests/cli_run.py), except the
training-then-resume runs, which run in subprocesses as a user's would."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import run_cli
from dcnv2.data import synthetic_cls
from dcnv2.data.image_folder import check_image_folder, load_rgb

CLASSES = ["circle", "square", "triangle"]


def dcnv2(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcnv2.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "data"
    synthetic_cls.generate(out, seed=0, num_train=12, num_val=6, image_size=32, classes=CLASSES)
    return out


def copy_of(clean_set: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(clean_set, target)
    return target


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives: only decoding finds it


def test_clean_set_passes(clean_set):
    report = check_image_folder(clean_set, decode=True)
    assert report.ok, report.problems
    assert report.splits == ["train", "val"] and sum(report.counts["train"].values()) == 12


def test_every_problem_is_reported_by_path(clean_set, tmp_path):
    data = copy_of(clean_set, tmp_path)
    first = sorted((data / "train" / "circle").iterdir())[0]
    truncate(first)
    (data / "train" / "square" / "notes.txt").write_text("not an image")
    fake = data / "train" / "square" / "fake.png"
    fake.write_text("this is text, not a PNG")
    leaked = sorted((data / "train" / "triangle").iterdir())[0]
    shutil.copy(leaked, data / "val" / "triangle" / "leak.png")
    (data / "val" / "star").mkdir()
    header_only = check_image_folder(data)
    text = "\n".join(header_only.problems)
    assert str(first) not in text  # a truncated file keeps its header: only --decode finds it
    assert f"{data / 'train' / 'square' / 'notes.txt'}: not an image file" in text
    assert f"{fake}: not a readable image" in text
    assert f"{data / 'val' / 'triangle' / 'leak.png'}: the same file as {leaked} (across splits)" in text
    assert "class folders differ from train's (missing [], extra ['star'])" in text
    decoded = check_image_folder(data, decode=True)
    assert any(p.startswith(f"{first}: cannot be decoded") for p in decoded.problems)


def test_empty_split_and_missing_split(clean_set, tmp_path):
    data = copy_of(clean_set, tmp_path)
    for image in (data / "val").rglob("*.png"):
        image.unlink()
    report = check_image_folder(data, ["train", "val", "test"])
    text = "\n".join(report.problems)
    assert f"{data / 'val'}: the split holds no images" in text
    assert f"{data / 'test'}: split folder not found" in text


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(np.full((9, 7), 65535, dtype=np.uint16))
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (7, 9)
    if mode == "I;16":  # 16-bit white stays white, not clipped garbage
        assert np.asarray(loaded).min() == 255


def test_data_check_cli_lists_problems(clean_set, tmp_path):
    data = copy_of(clean_set, tmp_path)
    truncate(sorted((data / "val" / "circle").iterdir())[0])
    (data / "train" / "circle" / "readme.md").write_text("x")
    ok = run_cli("data", "check", str(clean_set))
    assert ok.returncode == 0 and "no problems found" in ok.stdout and "| circle |" in ok.stdout
    bad = run_cli("data", "check", str(data), "--decode")
    assert bad.returncode == 1, bad.stderr
    assert "2 problem(s)" in bad.stdout and "readme.md: not an image file" in bad.stdout
    assert "cannot be decoded" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


TRAIN = ["--preset", "dcnv2", "--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--lr", "0.01",
         "--log-every", "1", "--checkpoint-every", "2", "--no-progress", "--no-eval"]


def test_train_cls_refuses_a_broken_set_before_training(clean_set, tmp_path):
    data = copy_of(clean_set, tmp_path)
    fake = data / "train" / "square" / "broken.png"
    fake.write_bytes(b"\x89PNG not really")
    proc = run_cli("train-cls", "--data", str(data), "--out", str(tmp_path / "run"), "--max-iters", "2",
                 "--workers", "0", *TRAIN)
    assert proc.returncode == 2 and f"{fake}: not a readable image" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoint_last.pth").exists()


# workers=1 (the error raised in a DataLoader worker process) is the slow variant: three CLI runs in subprocesses
@pytest.mark.slow  # a classifier trained until a file breaks, then resumed (~25 s per variant)
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_file_corrupted_during_training_stops_the_run_and_resume_continues(clean_set, tmp_path, workers):
    data = copy_of(clean_set, tmp_path)
    run = tmp_path / "run"
    first = dcnv2("train-cls", "--data", str(data), "--out", str(run), "--max-iters", "2", "--workers", workers,
                  *TRAIN)
    assert first.returncode == 0, first.stderr
    # the file breaks on disk after the check passed (header-only checks cannot see a truncation)
    victim = sorted((data / "train" / "triangle").iterdir())[0]
    truncate(victim)
    # 12 images in batches of 4: iterations 3-6 read every image at least once, the broken one included
    broken = dcnv2("train-cls", "--data", str(data), "--out", str(run), "--max-iters", "6", "--resume",
                   "--workers", workers, *TRAIN)
    assert broken.returncode == 2, broken.stdout + broken.stderr
    assert f"{victim}: cannot be decoded" in broken.stderr and "Traceback" not in broken.stderr
    assert f"the last checkpoint is {run / 'checkpoint_last.pth'}" in broken.stderr
    assert (run / "checkpoint_last.pth").is_file()
    victim.unlink()
    resumed = dcnv2("train-cls", "--data", str(data), "--out", str(run), "--max-iters", "6", "--resume",
                    "--workers", workers, *TRAIN)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 6 iterations" in resumed.stdout
