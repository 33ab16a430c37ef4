"""The synthetic classification set: one deformed glyph per image, in torchvision ``ImageFolder`` layout.

The images come from the detection set's generator (:func:`dcnv2.data.synthetic.render_image`), with exactly
one object, the same shape classes, the same scale range, rotation, anisotropic scaling, shear, non-rigid
warp, textured background, clutter lines and occluding strokes. The object is cropped out of the rendered
canvas with a margin around its (visible) box, roughly centred, and resized to ``image_size``: the scale
variation left is the crop's, as in ImageNet, while everything else stays as deformed as in detection.

Classes are balanced (image ``i`` of a split shows class ``i mod K``) and every image is a pure function of
``(seed, split, index)``::

    DIR/train/<class name>/000000.png ...   DIR/val/<class name>/...   DIR/synth_cls.json (what made it)

    from dcnv2.data import synthetic_cls
    synthetic_cls.generate("data/synth-cls", seed=0, num_train=2400, num_val=600, image_size=64)
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from dcnv2.data.synthetic import SynthConfig, render_image

__all__ = ["SPLITS", "render_sample", "generate"]

SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 101, "val": 102}  # streams of their own: not the detection set's images
_MAX_ATTEMPTS = 20


def render_sample(seed: int, split: str, index: int, cfg: SynthConfig, *, image_size: int,
                  margin: Tuple[float, float] = (1.25, 1.75), min_crop: float = 0.25,
                  ) -> Tuple[np.ndarray, int, Dict[str, object]]:
    """One classification image.

    Args:
        seed, split, index: the image's random stream.
        cfg: the generator's configuration; ``cfg.image_size`` is the canvas rendered before cropping,
            its object counts are overridden to exactly one.
        image_size: side of the output image.
        margin: the crop's side is the object's larger box side times a factor drawn from this range ...
        min_crop: ... but at least this fraction of the canvas (tiny objects keep some context).

    Returns:
        ``(pixels uint8 [image_size, image_size, 3], label, info)``, label in ``[0, K)`` indexing
        ``cfg.class_names()``; info has ``objects`` (objects the render produced: always 1), ``box`` (the
        object's box on the canvas, x0 y0 x1 y1), ``crop`` (the crop window) and ``attempt``.
    """
    from PIL import Image

    names = cfg.class_names()
    label = index % len(names)
    one = dataclasses.replace(cfg, classes=(names[label],), min_objects=1, max_objects=1)
    for attempt in range(_MAX_ATTEMPTS):  # an object may be placed nowhere or hidden by strokes: redraw
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index, attempt])
        pixels, objects = render_image(rng, one)
        if len(objects) == 1:
            break
    else:  # pragma: no cover - needs 20 failed draws in a row
        raise RuntimeError(f"synthetic_cls: no visible object after {_MAX_ATTEMPTS} draws for {split} image {index}")
    mask = objects[0][1]
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    canvas = cfg.image_size
    side = max(max(x1 - x0, y1 - y0) * rng.uniform(*margin), min_crop * canvas)
    side = int(min(canvas, math.ceil(side)))
    cx = (x0 + x1) / 2 + rng.uniform(-0.05, 0.05) * side  # roughly centred
    cy = (y0 + y1) / 2 + rng.uniform(-0.05, 0.05) * side
    left = int(np.clip(round(cx - side / 2), 0, canvas - side))
    top = int(np.clip(round(cy - side / 2), 0, canvas - side))
    crop = Image.fromarray(pixels[top:top + side, left:left + side])
    out = np.asarray(crop.resize((image_size, image_size), Image.BILINEAR))
    info = {"objects": len(objects), "box": [int(x0), int(y0), int(x1), int(y1)],
            "crop": [left, top, left + side, top + side], "attempt": attempt}
    return out, label, info


def generate(out_dir: Union[str, Path], *, seed: int = 0, num_train: int = 2400, num_val: int = 600,
             image_size: int = 64, canvas_size: Optional[int] = None, classes: Optional[Sequence[str]] = None,
             overwrite: bool = False, progress: bool = False,
             on_sample: Optional[Callable[[str, int, Dict[str, object]], None]] = None, **config) -> Dict[str, Path]:
    """Writes ``out_dir/{train,val}/<class>/<index>.png`` and ``out_dir/synth_cls.json``.

    Args:
        out_dir: output directory (created).
        seed: the set is a function of the seed and the options.
        num_train, num_val: images per split (balanced over the classes; ``>= 0``).
        image_size: side of the written images.
        canvas_size: side of the rendered scene the object is cropped from (default ``2 * image_size``).
        classes: a subset of :data:`dcnv2.data.synthetic.CLASSES` (default: all twelve).
        overwrite: remove existing ``train``/``val`` folders first (otherwise a non-empty one is an error:
            stale class folders would silently join the set).
        progress: show a progress bar.
        on_sample: called with ``(split, index, info)`` per image (tests check the object count).
        **config: any other :class:`SynthConfig` field (``max_scale``, ``max_warp``, ``clutter_lines``, ...).

    Returns:
        ``{split: split directory}``.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    canvas_size = 2 * image_size if canvas_size is None else canvas_size
    allowed = set(SynthConfig.__dataclass_fields__) - {"min_objects", "max_objects", "image_size", "classes"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise TypeError(f"unknown or fixed synthetic option(s) {unknown} (one object per image); known: {sorted(allowed)}")
    for pair in ("clutter_lines", "occluding_strokes"):
        if pair in config:
            config[pair] = tuple(config[pair])
    cfg = SynthConfig(image_size=canvas_size, min_objects=1, max_objects=1,
                      classes=None if classes is None else tuple(classes), **config)
    cfg.validate()
    names = cfg.class_names()
    out = Path(out_dir)
    for split in SPLITS:
        d = out / split
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise ValueError(f"{d} is not empty: remove it or pass overwrite=True (--overwrite); stale class "
                                 "folders would otherwise join the set")
            shutil.rmtree(d)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_train + num_val, desc="synthetic classification images", unit="img", dynamic_ncols=True)
    from PIL import Image

    written = {}
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            for name in names:  # every class folder exists, so ImageFolder's class indices never shift
                (out / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels, label, info = render_sample(seed, split, index, cfg, image_size=image_size)
                Image.fromarray(pixels).save(out / split / names[label] / f"{index:06d}.png", compress_level=1)
                if on_sample is not None:
                    on_sample(split, index, info)
                if bar is not None:
                    bar.update(1)
            written[split] = out / split
    finally:
        if bar is not None:
            bar.close()
    meta = {"description": "dcnv2 synthetic classification set (one deformed glyph per image)", "seed": seed,
            "image_size": image_size, "canvas_size": canvas_size, "classes": list(names),
            "num_train": num_train, "num_val": num_val, "config": dataclasses.asdict(cfg)}
    (out / "synth_cls.json").write_text(json.dumps(meta, indent=2))
    return written
