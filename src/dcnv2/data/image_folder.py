"""ImageFolder classification sets (``DATA/<split>/<class>/*.png``): a check that names every broken file,
and the image loader that training and evaluation use.

* :func:`check_image_folder` - what ``dcnv2 data check`` and ``dcnv2 train-cls`` run before anything trains:
  every split exists and holds images, the class folders agree between splits, every file is an image
  whose header opens (``decode=True``: whose pixels decode) in a mode that converts to RGB, and no file is
  there twice (within a split, or across splits: a validation image seen in training). Every problem is
  reported with its path, not just the first.
* :func:`load_rgb` - the ImageFolder loader: any mode PIL opens (grayscale, palette, RGBA, CMYK, 16-bit and
  32-bit grayscale scaled to 8 bits) as RGB; a file that does not decode raises :class:`ImageFileError`
  naming it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

__all__ = ["ImageFileError", "ImageFolderReport", "check_image_folder", "load_rgb", "IMAGE_EXTENSIONS",
           "looks_like_image_folder"]

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder reads
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL modes whose conversion to RGB keeps the picture (16/32-bit integer and float grayscale are rescaled)
RGB_CONVERTIBLE = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageFileError(OSError):
    """An image file that cannot be used; the message starts with its path."""


def _to_rgb(image):
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data (or integers beyond 8 bits) rescaled to 0..255; float images in [0, 1] scaled up
        top = 65535.0 if (mode.startswith("I;16") or values.max(initial=0) > 255) else (
            1.0 if mode == "F" and values.max(initial=0) <= 1.0 else 255.0)
        values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
        eight = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb(path: Union[str, Path]):
    """Opens an image file as an RGB ``PIL.Image``; raises :class:`ImageFileError` naming ``path`` when it
    does not decode (truncated, corrupt, not an image) or its mode has no RGB form."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in RGB_CONVERTIBLE:
                raise ValueError(f"mode {image.mode!r} has no RGB conversion")
            return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageFileError(f"{path}: cannot be decoded as an image ({exc}); replace or remove it "
                             f"(`dcnv2 data check --decode` lists every such file)") from None


@dataclass
class ImageFolderReport:
    """What :func:`check_image_folder` found: ``counts[split][class]`` images, ``problems`` (each starting
    with a path; any problem fails the check) and ``warnings`` (worth knowing, not fatal)."""

    root: Path
    splits: List[str]
    classes: Dict[str, List[str]] = field(default_factory=dict)
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = []
        for split in self.splits:
            counts = self.counts.get(split, {})
            lines += [f"{self.root / split}: {sum(counts.values())} images in {len(counts)} classes", "",
                      "| class | images |", "|---|---:|"]
            lines += [f"| {name} | {n} |" for name, n in counts.items()]
            lines.append("")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def looks_like_image_folder(root: Union[str, Path]) -> bool:
    """``root`` has no COCO annotations and some sub-folder of it holds class folders."""
    root = Path(root)
    if (root / "annotations").is_dir() or not root.is_dir():
        return False
    return any(d.is_dir() and any(c.is_dir() for c in d.iterdir()) for d in root.iterdir())


def _check_header(path: Path, decode: bool) -> Optional[str]:
    from PIL import Image

    if decode:
        try:
            load_rgb(path)
        except ImageFileError as exc:
            return str(exc)
        return None
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{path}: not a readable image ({exc})"
    if not (width >= 1 and height >= 1):
        return f"{path}: the image is {width}x{height} pixels"
    if mode not in RGB_CONVERTIBLE:
        return f"{path}: mode {mode!r} has no RGB conversion"
    return None


def check_image_folder(root: Union[str, Path], splits: Optional[Sequence[str]] = None, *,
                       decode: bool = False, progress: bool = False) -> ImageFolderReport:
    """Checks an ImageFolder classification set; see the module docstring for what is checked.

    Args:
        root: ``DATA`` of ``DATA/<split>/<class>/<image>``.
        splits: the splits to check (default: every sub-folder of ``root`` that holds class folders).
        decode: decode every image (default: headers only, which reads a few bytes of each file).
    """
    root = Path(root)
    layout = f"expected {root}/<split>/<class name>/*.png (`dcnv2 data synth-cls --out {root}` writes one)"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: {layout}")
    if splits is None:
        splits = sorted(d.name for d in root.iterdir() if d.is_dir() and any(c.is_dir() for c in d.iterdir()))
        if not splits:
            raise FileNotFoundError(f"{root} holds no split folder with class folders: {layout}")
    report = ImageFolderReport(root=root, splits=list(splits))
    seen: Dict[str, Path] = {}  # content hash -> first file with it
    files = []
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            report.problems.append(f"{folder}: split folder not found ({layout})")
            continue
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        report.classes[split] = classes
        report.counts[split] = {}
        if not classes:
            report.problems.append(f"{folder}: no class folders ({layout})")
        for entry in sorted(folder.iterdir()):
            if entry.is_file():
                report.problems.append(f"{entry}: a file outside the class folders (ImageFolder ignores it)")
        for name in classes:
            n = 0
            for entry in sorted((folder / name).iterdir()):
                if entry.is_dir():
                    report.problems.append(f"{entry}: a folder inside a class folder (ImageFolder ignores it)")
                elif entry.name.startswith("."):
                    report.warnings.append(f"{entry}: hidden file, ignored")
                elif entry.suffix.lower() not in IMAGE_EXTENSIONS:
                    report.problems.append(f"{entry}: not an image file (extension {entry.suffix or 'none'!r}; "
                                           f"ImageFolder reads {', '.join(IMAGE_EXTENSIONS)})")
                else:
                    files.append(entry)
                    n += 1
            report.counts[split][name] = n
            if n == 0:
                report.warnings.append(f"{folder / name}: empty class folder (the class keeps its index)")
        if classes and sum(report.counts[split].values()) == 0:
            report.problems.append(f"{folder}: the split holds no images")
    reference = next(iter(report.classes.items()), None)
    for split, classes in report.classes.items():
        if reference is not None and classes != reference[1]:
            missing = sorted(set(reference[1]) - set(classes))
            extra = sorted(set(classes) - set(reference[1]))
            report.problems.append(f"{root / split}: class folders differ from {reference[0]}'s (missing {missing}, "
                                   f"extra {extra}): the label indices would not match")
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="checking images", unit="img", dynamic_ncols=True)
    for path in iterator:
        problem = _check_header(path, decode)
        if problem:
            report.problems.append(problem)
        try:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
        except OSError as exc:
            report.problems.append(f"{path}: cannot be read ({exc})")
            continue
        if digest in seen:
            first = seen[digest]
            where = "across splits" if first.parent.parent != path.parent.parent else "in the same split"
            report.problems.append(f"{path}: the same file as {first} ({where})")
        else:
            seen[digest] = path
    return report
