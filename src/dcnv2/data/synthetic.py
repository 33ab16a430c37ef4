"""A synthetic COCO-format data set of strongly deformed objects (detection + instance segmentation).

Twelve shape classes are drawn with a 10× range of scales, any rotation, anisotropic scaling, shear and a
smooth non-rigid (sine) warp, over a textured background with clutter lines, overlapping one another and
partly hidden by occluding strokes. It is what the demo, the tests and the ablation train on: geometric
variation is exactly what deformable convolution and deformable RoI pooling are meant to absorb.

Each image is rendered from its own random stream ``(seed, split, index)``, so the set is identical for a
seed whatever order or process renders it. Masks are the visible pixels of each object (2×2 supersampled
coverage ≥ 0.5), stored as compressed RLE; boxes are the masks' tight boxes, as in COCO.

    from dcnv2.data import synthetic
    synthetic.generate("data/synth", seed=0, num_train=1600, num_val=400, image_size=128)
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["CLASSES", "SynthConfig", "generate", "render_image"]

# ---------------------------------------------------------------------------------------------------------
# shapes in canonical coordinates (u, v) in [-1, 1]²; each returns a boolean array "inside"


def _polygon(vertices: Sequence[Tuple[float, float]]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    vx = np.array([p[0] for p in vertices])
    vy = np.array([p[1] for p in vertices])

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = np.zeros(u.shape, dtype=bool)
        j = len(vx) - 1
        for i in range(len(vx)):  # crossing number: flip on every edge a horizontal ray from (u, v) crosses
            crosses = (vy[i] > v) != (vy[j] > v)
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = vx[i] + (v - vy[i]) * (vx[j] - vx[i]) / (vy[j] - vy[i])
            result ^= crosses & (u < x_at)
            j = i
        return result

    return inside


def _regular(n: int, radius: float, inner: Optional[float] = None, phase: float = math.pi / 2):
    points = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        points.append((radius * math.cos(a), radius * math.sin(a)))
        if inner is not None:
            b = a + math.pi / n
            points.append((inner * math.cos(b), inner * math.sin(b)))
    return points


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.2 * u, -1.2 * v + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0


SHAPES: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v < 0.95 ** 2,
    "ring": lambda u, v: (u * u + v * v < 0.95 ** 2) & (u * u + v * v > 0.55 ** 2),
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.8,
    "triangle": _polygon(_regular(3, 1.0)),
    "star": _polygon(_regular(5, 1.0, inner=0.42)),
    "cross": lambda u, v: ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95)),
    "crescent": lambda u, v: (u * u + v * v < 0.95 ** 2) & ((u - 0.45) ** 2 + v * v > 0.75 ** 2),
    "heart": _heart,
    "arrow": _polygon([(-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.22),
                       (-0.95, 0.22)]),
    "L-shape": _polygon([(-0.75, -0.9), (-0.25, -0.9), (-0.25, 0.4), (0.75, 0.4), (0.75, 0.9), (-0.75, 0.9)]),
    "hexagon": _polygon(_regular(6, 0.95, phase=0.0)),
    "T-shape": lambda u, v: ((np.abs(u) < 0.9) & (v > -0.9) & (v < -0.45)) | ((np.abs(u) < 0.24) & (np.abs(v) < 0.9)),
}
CLASSES: Tuple[str, ...] = tuple(SHAPES)


@dataclass
class SynthConfig:
    """What varies and by how much. Sizes are fractions of the image side."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.08       # object extent (before warping) as a fraction of the image side ...
    max_scale: float = 0.8        # ... log-uniform between the two: a 10× range
    max_aspect: float = 1.6       # anisotropic scaling, log-uniform in [1/max_aspect, max_aspect]
    max_shear: float = 0.4
    max_warp: float = 0.15        # amplitude of the sine warp, in canonical units
    max_occluded: float = 0.5     # an object may lose at most this fraction of its area to later ones
    clutter_lines: Tuple[int, int] = (2, 6)
    occluding_strokes: Tuple[int, int] = (0, 2)
    classes: Optional[Tuple[str, ...]] = None  # a subset of CLASSES (in this order); None: all of them

    def class_names(self) -> Tuple[str, ...]:
        """The classes this set draws from; category ``i + 1`` is ``class_names()[i]``."""
        return CLASSES if self.classes is None else tuple(self.classes)

    def validate(self) -> None:
        if not (isinstance(self.image_size, int) and self.image_size >= 16):
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if not (0 <= self.min_objects <= self.max_objects):
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not (0 < self.min_scale <= self.max_scale <= 1.5):
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1.5, got {self.min_scale}, {self.max_scale}")
        if not (self.max_aspect >= 1 and self.max_shear >= 0 and self.max_warp >= 0):
            raise ValueError("max_aspect must be >= 1, max_shear and max_warp >= 0")
        if not (0 < self.max_occluded <= 1):
            raise ValueError(f"max_occluded must be in (0, 1], got {self.max_occluded}")
        for name, (lo, hi) in (("clutter_lines", self.clutter_lines), ("occluding_strokes", self.occluding_strokes)):
            if not (0 <= lo <= hi):
                raise ValueError(f"{name} must be a (min, max) pair with 0 <= min <= max, got {(lo, hi)}")
        if self.classes is not None:
            names = tuple(self.classes)
            unknown = [c for c in names if c not in SHAPES]
            if unknown or not names or len(set(names)) != len(names):
                raise ValueError(f"classes must be distinct names from {list(CLASSES)}, got {list(names)}")


# ---------------------------------------------------------------------------------------------------------
# rendering


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Two-colour gradient in a random direction plus a low-frequency blotch field and pixel noise."""
    c0, c1 = rng.uniform(0.1, 0.9, (2, 3))
    a = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip((x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a) + 0.5, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    coarse = rng.normal(0, 0.06, (5, 5, 3))
    idx = np.linspace(0, 4, size)
    i0 = np.floor(idx).astype(int).clip(0, 3)
    f = (idx - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]          # (size, 5, 3)
    field = rows[:, i0] * (1 - f[None, :, :]) + rows[:, i0 + 1] * f[None, :, :]     # (size, size, 3)
    return img + field


def _segment_mask(rng: np.random.Generator, size: int, width: Tuple[float, float]) -> np.ndarray:
    p0, p1 = rng.uniform(-0.1 * size, 1.1 * size, (2, 2))
    w = rng.uniform(*width)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.hypot(x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]))
    return dist < w / 2


def _object(rng: np.random.Generator, cfg: SynthConfig, label: int):
    """A random pose for one object: returns (coverage function on pixel-centre grids, window half-extent)."""
    size = cfg.image_size
    extent = size * math.exp(rng.uniform(math.log(cfg.min_scale), math.log(cfg.max_scale)))
    aspect = math.exp(rng.uniform(-math.log(cfg.max_aspect), math.log(cfg.max_aspect)))
    theta = rng.uniform(0, 2 * math.pi)
    shear = rng.uniform(-cfg.max_shear, cfg.max_shear)
    half = extent / 2
    scale = np.diag([half * math.sqrt(aspect), half / math.sqrt(aspect)])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    m = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ scale
    m_inv = np.linalg.inv(m)
    amp = rng.uniform(0, cfg.max_warp, 2)
    freq = rng.uniform(1.5, 3.5, 2)
    phase = rng.uniform(0, 2 * math.pi, 2)
    shape = SHAPES[cfg.class_names()[label]]
    corners = m @ np.array([[-1.25, -1.25, 1.25, 1.25], [-1.25, 1.25, -1.25, 1.25]])
    reach = np.abs(corners).max(axis=1)  # window half-size in x and y
    stripes = rng.uniform(5, 12) if rng.random() < 0.4 else None

    def canonical(x: np.ndarray, y: np.ndarray, centre: np.ndarray):
        u = m_inv[0, 0] * (x - centre[0]) + m_inv[0, 1] * (y - centre[1])
        v = m_inv[1, 0] * (x - centre[0]) + m_inv[1, 1] * (y - centre[1])
        return u + amp[0] * np.sin(freq[0] * v + phase[0]), v + amp[1] * np.sin(freq[1] * u + phase[1])

    def coverage(x: np.ndarray, y: np.ndarray, centre: np.ndarray):
        """2×2 supersampled coverage in [0, 1] and the stripe pattern at pixel centres (x, y)."""
        cov = np.zeros(x.shape)
        for dx in (-0.25, 0.25):
            for dy in (-0.25, 0.25):
                cov += shape(*canonical(x + dx, y + dy, centre))
        pattern = None
        if stripes is not None:
            u, _ = canonical(x, y, centre)
            pattern = np.sin(stripes * u) > 0
        return cov / 4, pattern

    return coverage, reach


def render_image(rng: np.random.Generator, cfg: SynthConfig) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image: uint8 (H, W, 3) and a list of (class index, visible boolean mask (H, W))."""
    size = cfg.image_size
    img = _background(rng, size)
    for _ in range(rng.integers(cfg.clutter_lines[0], cfg.clutter_lines[1] + 1)):
        img[_segment_mask(rng, size, (0.8, 2.0))] = rng.uniform(0, 1, 3)
    masks: List[np.ndarray] = []
    labels: List[int] = []
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        label = int(rng.integers(len(cfg.class_names())))
        coverage, reach = _object(rng, cfg, label)
        for _attempt in range(10):  # place it where it hides no earlier object too much
            lo = np.minimum(0.6 * reach, size / 2)
            centre = rng.uniform(lo, size - lo)
            x0, y0 = np.maximum(np.floor(centre - reach).astype(int), 0)
            x1, y1 = np.minimum(np.ceil(centre + reach).astype(int) + 1, size)
            if x1 <= x0 or y1 <= y0:
                continue
            cov_win, pattern = coverage(xs[y0:y1, x0:x1], ys[y0:y1, x0:x1], centre)
            cov = np.zeros((size, size))
            cov[y0:y1, x0:x1] = cov_win
            mask = cov >= 0.5
            if mask.sum() < 12:
                continue
            if all((prev & mask).sum() <= cfg.max_occluded * prev.sum() for prev in masks):
                break
        else:
            continue
        window = img[y0:y1, x0:x1]
        local = _luminance(window.reshape(-1, 3).clip(0, 1)).mean()
        for _ in range(20):  # a colour that stands out from the background around it
            colour = rng.uniform(0, 1, 3)
            if abs(_luminance(colour) - local) >= 0.25:
                break
        fill = np.broadcast_to(colour, window.shape).copy()
        if pattern is not None:
            fill[pattern] = np.clip(colour * 0.55 + 0.2, 0, 1)
        a = cov_win[..., None]
        img[y0:y1, x0:x1] = window * (1 - a) + fill * a
        masks = [prev & ~mask for prev in masks]
        masks.append(mask)
        labels.append(label)
    for _ in range(rng.integers(cfg.occluding_strokes[0], cfg.occluding_strokes[1] + 1)):
        stroke = _segment_mask(rng, size, (1.0, 3.0))
        img[stroke] = rng.uniform(0, 1, 3)
        masks = [m & ~stroke for m in masks]
    img = img + rng.normal(0, 0.02, img.shape)
    objects = [(lab, m) for lab, m in zip(labels, masks) if m.sum() >= 8]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), objects


# ---------------------------------------------------------------------------------------------------------
# writing the COCO files

_SPLIT_CODES = {"train": 1, "val": 2}


def _render_split(out: Path, split: str, count: int, seed: int, cfg: SynthConfig, first_ann_id: int,
                  progress: Optional[Callable[[int], None]]) -> Dict:
    from PIL import Image
    from pycocotools import mask as mask_utils

    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        pixels, objects = render_image(rng, cfg)
        image_id = index + 1
        name = f"{index:06d}.png"
        Image.fromarray(pixels).save(image_dir / name, compress_level=1)
        images.append({"id": image_id, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for label, m in objects:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": label + 1, "bbox": [x, y, w, h],
                "area": float(mask_utils.area(rle)), "iscrowd": 0,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            })
            ann_id += 1
        if progress is not None:
            progress(1)
    return {
        "info": {"description": "dcnv2 synthetic deformed objects", "split": split, "seed": seed,
                 "config": asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(cfg.class_names())],
    }


def _write_json_atomic(path: Path, payload: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(out_dir: Union[str, Path], *, seed: int = 0, num_train: int = 1600, num_val: int = 400,
             image_size: int = 128, progress: bool = False, **config) -> Dict[str, Path]:
    """Writes ``out_dir/{train,val}/*.png`` and ``out_dir/annotations/instances_{train,val}.json``.

    Args:
        out_dir: output directory (created).
        seed: the whole set is a function of the seed and the configuration.
        num_train, num_val: images per split (``>= 0``).
        image_size: side of the square images in pixels.
        progress: show a progress bar.
        **config: any other :class:`SynthConfig` field (``min_objects``, ``max_scale``, ...).

    Returns:
        ``{split: annotation file}``.
    """
    if not (isinstance(num_train, int) and isinstance(num_val, int) and num_train >= 0 and num_val >= 0):
        raise ValueError(f"num_train and num_val must be ints >= 0, got {num_train!r} and {num_val!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    unknown = sorted(set(config) - set(SynthConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown synthetic data option(s) {unknown}; known: {sorted(SynthConfig.__dataclass_fields__)}")
    if config.get("classes") is not None:
        config["classes"] = tuple(config["classes"])
    for pair in ("clutter_lines", "occluding_strokes"):
        if pair in config:
            config[pair] = tuple(config[pair])
    cfg = SynthConfig(image_size=image_size, **config)
    cfg.validate()
    out = Path(out_dir)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_train + num_val, desc="synthetic images", unit="img", dynamic_ncols=True)
    written = {}
    try:
        next_ann = 1
        for split, count in (("train", num_train), ("val", num_val)):
            payload = _render_split(out, split, count, seed, cfg, next_ann, bar.update if bar else None)
            next_ann += len(payload["annotations"])
            written[split] = out / "annotations" / f"instances_{split}.json"
            _write_json_atomic(written[split], payload)
    finally:
        if bar is not None:
            bar.close()
    return written
