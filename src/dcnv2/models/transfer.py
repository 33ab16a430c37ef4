"""Initialising a detector's or segmenter's ResNet trunk from a classification checkpoint, offsets included.

The paper's Table 7: DCN ResNets pre-trained as classifiers are fine-tuned for detection and segmentation
either with their learned offsets and modulation (``offsets="pretrained"``) or with the offset/mask
branches reset to their DCNv2 initialisation (``offsets="zero"``: weights and biases 0, so offsets start at
0 and masks at sigmoid(0) = 0.5). Everything else in the trunk (conv1 .. layer4, BatchNorm statistics)
comes from the checkpoint either way; the classifier's ``fc`` is never loaded.

The trunk is found by its torchvision names on both sides: in the checkpoint, the prefix in front of
``conv1.weight`` / ``bn1.weight`` / ``layer1.0.conv1.weight`` (``backbone.`` in a
:class:`~dcnv2.models.classification.DCNClassifier` checkpoint, ``backbone.body.`` in a detector's, none in
a bare torchvision state dict); in the model, the first submodule with ``conv1``, ``bn1`` and
``layer1`` .. ``layer4`` (``backbone.body`` of the paper's and the FPN detectors, ``backbone`` of
:func:`dcnv2.models.segmenter`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["TransferReport", "TransferError", "load_backbone_checkpoint", "find_trunk", "trunk_state_dict",
           "describe_trunk", "is_dcnv2_checkpoint"]

OFFSETS = ("pretrained", "zero")
_TRUNK_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_STAGE_OF = {"conv1": "stem", "bn1": "stem", "layer1": "c2 (layer1)", "layer2": "c3 (layer2)",
             "layer3": "c4 (layer3)", "layer4": "c5 (layer4)"}
_SHOWN = 4  # modules listed per group in a message


class TransferError(ValueError):
    """The checkpoint's trunk does not fit the model's (strict loading); ``report`` says which keys."""

    def __init__(self, message: str, report: "TransferReport"):
        super().__init__(message)
        self.report = report


@dataclass
class TransferReport:
    """What :func:`load_backbone_checkpoint` did. Keys are torchvision ResNet names (``layer2.0.conv2.weight``);
    the model's full names are ``model_prefix + key``.

    Attributes:
        checkpoint: the file read (or ``"<state dict>"``).
        source: the checkpoint's trunk, described (depth, deformable stages; the classifier's preset when its
            ``model_spec`` says so).
        target: the model's trunk, described the same way.
        model_prefix: where the trunk sits in the model, e.g. ``"backbone.body."``.
        offsets: ``"pretrained"`` or ``"zero"``. strict: whether any mismatch was an error.
        loaded: trunk keys set from the checkpoint.
        loaded_offsets: the offset/mask conv keys among them, as they stand after loading (with
            ``offsets="zero"`` they were re-zeroed and are listed in ``zeroed`` too).
        zeroed: offset/mask branch keys reset to their initialisation (``offsets="zero"``).
        missing: trunk keys the checkpoint lacks (left at their initial values).
        unexpected: checkpoint trunk keys the model has no place for (not loaded).
        mismatched: ``(key, checkpoint shape, model shape)`` of keys in both with different shapes (left at
            their initial values).
        skipped_head: the checkpoint's classifier head keys (``fc.*``), never loaded.
    """

    checkpoint: str
    source: str
    target: str
    model_prefix: str
    offsets: str
    strict: bool
    loaded: List[str] = field(default_factory=list)
    loaded_offsets: List[str] = field(default_factory=list)
    zeroed: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    skipped_head: List[str] = field(default_factory=list)

    @property
    def left_at_init(self) -> List[str]:
        """Trunk keys of the model not set from the checkpoint (missing or of another shape)."""
        return sorted(self.missing + [k for k, _, _ in self.mismatched], key=_key_order)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        """The missing / unexpected / mismatched keys, grouped by stage and kind (empty when complete)."""
        lines = []
        if self.mismatched:
            lines.append(f"  shape mismatch ({len(self.mismatched)} keys, checkpoint vs model):")
            shapes = {k: (a, b) for k, a, b in self.mismatched}
            for group, keys in _groups([k for k, _, _ in self.mismatched]):
                a, b = shapes[keys[0]]
                lines.append(f"    {group}: {_modules(keys)}; e.g. {keys[0]} {list(a)} vs {list(b)}")
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)} keys):")
            lines += [f"    {group}: {_modules(keys)}" for group, keys in _groups(self.missing)]
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint, no place in the model ({len(self.unexpected)} keys):")
            lines += [f"    {group}: {_modules(keys)}" for group, keys in _groups(self.unexpected)]
        return "\n".join(lines)

    def summary(self) -> str:
        """A few lines for the console and the run's log."""
        n_off = len(self.loaded_offsets)
        head = (f"backbone from {self.checkpoint}: {len(self.loaded)} trunk tensors loaded "
                f"({n_off} of offset/mask convs), offsets {self.offsets}")
        if self.offsets == "zero":
            head += f" ({len(self.zeroed)} offset/mask tensors re-zeroed: offsets 0, masks 0.5)"
        if self.skipped_head:
            head += f"; classifier head ({', '.join(self.skipped_head)}) not loaded"
        lines = [head, f"  checkpoint: {self.source}", f"  model:      {self.target} (at {self.model_prefix or '<root>'})"]
        if not self.complete:
            lines.append(f"  strict=False: {len(self.left_at_init)} model tensors left at their initial values, "
                         f"{len(self.unexpected)} checkpoint tensors unused")
            lines.append(self.problems())
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """JSON- and weights_only-safe (shapes as lists)."""
        d = dataclasses.asdict(self)
        d["mismatched"] = [[k, list(a), list(b)] for k, a, b in self.mismatched]
        d["left_at_init"] = self.left_at_init
        return d


def _key_order(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _group_of(key: str) -> str:
    root = key.split(".", 1)[0]
    stage = _STAGE_OF.get(root, root)
    kind = "offset/mask convs" if ".conv_offset." in key else "weights and BatchNorm"
    return f"{stage}, {kind}"


def _groups(keys: List[str]) -> List[Tuple[str, List[str]]]:
    out: Dict[str, List[str]] = {}
    for k in sorted(keys, key=_key_order):
        out.setdefault(_group_of(k), []).append(k)
    return list(out.items())


def _modules(keys: List[str]) -> str:
    """``layer2.0.conv2.conv_offset.{weight,bias}, ... (+N more)``: keys collapsed to their modules."""
    mods: Dict[str, List[str]] = {}
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        mods.setdefault(mod, []).append(leaf)
    shown = [f"{m}.{{{','.join(v)}}}" if len(v) > 1 else f"{m}.{v[0]}" for m, v in list(mods.items())[:_SHOWN]]
    more = f" (+{len(mods) - _SHOWN} more modules)" if len(mods) > _SHOWN else ""
    return f"{len(keys)} keys: " + ", ".join(shown) + more


# ---------------------------------------------------------------------------------------------------------
# finding the trunk on both sides

def is_dcnv2_checkpoint(path: Union[str, os.PathLike]) -> bool:
    """True for a file written by the dcnv2 engine (a dict with ``model`` and ``model_spec``), e.g. a
    classifier's ``model_final.pth``; False for a bare state dict or anything unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "not ours"; the loader reports it properly
        return False
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and "model_spec" in state


def find_trunk(model: nn.Module) -> Tuple[str, nn.Module]:
    """``(prefix, module)`` of the first submodule holding ``conv1``, ``bn1`` and ``layer1`` .. ``layer4``."""
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, a, None), nn.Module) for a in _TRUNK_ROOTS):
            return (name + "." if name else ""), module
    raise ValueError(f"{type(model).__name__} has no ResNet trunk (a submodule with conv1, bn1, layer1..layer4) "
                     "to load a backbone checkpoint into")


def _source_prefix(sd: Mapping[str, Tensor]) -> Optional[str]:
    found = []
    for k in sd:
        if k.endswith("conv1.weight"):
            p = k[: -len("conv1.weight")]
            if f"{p}bn1.weight" in sd and f"{p}layer1.0.conv1.weight" in sd:
                found.append(p)
    return min(found, key=len) if found else None


def trunk_state_dict(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], str]:
    """Splits a (classifier / detector / torchvision) state dict into its ResNet trunk with torchvision names,
    the classifier head keys (``fc.*``) and the prefix found. Raises ValueError without a trunk."""
    prefix = _source_prefix(state_dict)
    if prefix is None:
        some = list(state_dict)[:5]
        raise ValueError(f"the checkpoint holds no ResNet trunk: expected keys like [PREFIX]conv1.weight, "
                         f"[PREFIX]bn1.weight, [PREFIX]layer1.0.conv1.weight; its first keys are {some}")
    trunk, head = {}, []
    for k, v in state_dict.items():
        if not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        root = name.split(".", 1)[0]
        if root in _TRUNK_ROOTS:
            trunk[name] = v
        elif root == "fc":
            head.append(name)
    return trunk, head, prefix


def _offset_taps(sd: Mapping[str, Tensor], key: str) -> str:
    w = sd[key]
    taps = w.shape[-1] * w.shape[-2] if w.dim() == 4 else 0
    per = w.shape[0] // taps if taps and w.shape[0] % taps == 0 else 0
    return {2: "DCNv1", 3: "DCNv2"}.get(per, f"{w.shape[0]} offset channels")


def describe_trunk(sd: Mapping[str, Tensor]) -> str:
    """``"resnet (3, 4, 6, 3) bottleneck blocks, deformable: c3 DCNv2, c4 DCNv2, c5 DCNv2"`` from trunk keys."""
    blocks = []
    for s in (1, 2, 3, 4):
        idx = {int(m.group(1)) for k in sd for m in [re.match(rf"layer{s}\.(\d+)\.", k)] if m}
        blocks.append(len(idx))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    width = tuple(sd["layer1.0.conv1.weight"].shape[:1]) if "layer1.0.conv1.weight" in sd else ()
    deform = []
    for s in (1, 2, 3, 4):
        keys = sorted(k for k in sd if k.startswith(f"layer{s}.") and k.endswith(".conv_offset.weight"))
        if keys:
            kinds = sorted({_offset_taps(sd, k) for k in keys})
            deform.append(f"c{s + 1} {'/'.join(kinds)}")
    w = f", width {width[0]}" if width else ""
    return (f"ResNet {tuple(blocks)} {kind} blocks{w}, deformable: "
            + (", ".join(deform) if deform else "none"))


def _read(checkpoint) -> Tuple[Dict[str, Tensor], str, Optional[Dict[str, Any]]]:
    if isinstance(checkpoint, Mapping):
        state, name = checkpoint, "<state dict>"
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {str(path)!r} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign / truncated files
            raise ValueError(f"backbone checkpoint {str(path)!r} could not be read: {exc}") from exc
        name = str(path)
    spec = None
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        spec = state.get("model_spec") if isinstance(state.get("model_spec"), Mapping) else None
        state = state["model"]
    elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone checkpoint {name} holds no state dict (name -> Tensor)")
    sd = dict(state)
    if sd and all(k.startswith("module.") for k in sd):  # DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, name, dict(spec) if spec else None


def _describe_model(model: nn.Module, trunk_sd: Mapping[str, Tensor]) -> str:
    preset = getattr(model, "preset", None)
    preset = getattr(preset, "name", preset)
    name = getattr(model, "backbone_name", None)
    tag = ", ".join(str(x) for x in (name, f"preset {preset}" if preset else None) if x)
    return describe_trunk(trunk_sd) + (f" [{tag}]" if tag else "")


def _ignorable(key: str) -> bool:
    # FrozenBatchNorm2d (detectors with pretrained weights) keeps no step counter; BatchNorm2d does
    return key.endswith("num_batches_tracked")


def load_backbone_checkpoint(model: nn.Module, path: Union[str, os.PathLike, Mapping[str, Tensor]], *,
                             offsets: str = "pretrained", strict: bool = True) -> TransferReport:
    """Initialises ``model``'s ResNet trunk (``conv1`` .. ``layer4``, offset/mask convs included) from a
    classification checkpoint, in place.

    Args:
        model: a detector (:func:`dcnv2.models.faster_rcnn` / :func:`~dcnv2.models.mask_rcnn`, paper or FPN),
            a segmenter (:func:`dcnv2.models.segmenter`), a classifier or a bare ResNet.
        path: a classifier's ``model_final.pth`` / ``checkpoint_last.pth`` (``{"model": state dict,
            "model_spec": ...}``), any dcnv2 checkpoint with a ResNet trunk, or a state dict (file or mapping).
        offsets: ``"pretrained"`` keeps the checkpoint's offset/mask convs; ``"zero"`` loads everything else
            and resets exactly the trunk's offset/mask branches (weights and biases 0: offsets 0, masks 0.5).
        strict: any missing, unexpected or shape-mismatched trunk key raises :class:`TransferError` (nothing
            is loaded); with False the matching keys load and the report lists what stayed at its initial value.

    Returns:
        A :class:`TransferReport`.

    Raises:
        TransferError: (strict) the trunks differ: a stage deformable in one and not the other, DCNv1 vs
            DCNv2, another depth or width; the message lists the keys grouped by stage and kind.
        ValueError / TypeError / FileNotFoundError: bad arguments, an unreadable file, no trunk on a side.
    """
    if offsets not in OFFSETS:
        raise ValueError(f"offsets must be one of {OFFSETS}, got {offsets!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd, name, spec = _read(path)
    src, head, _ = trunk_state_dict(sd)
    prefix, trunk = find_trunk(model)
    dst = {k: v for k, v in trunk.state_dict().items() if k.split(".", 1)[0] in _TRUNK_ROOTS}

    source = describe_trunk(src)
    if spec:
        source += f" [{spec.get('arch', '?')} {spec.get('backbone', '?')}, preset {spec.get('preset', '?')}]"
    report = TransferReport(checkpoint=name, source=source, target=_describe_model(model, dst),
                            model_prefix=prefix, offsets=offsets, strict=strict, skipped_head=sorted(head))
    loadable = {}
    for k, v in dst.items():
        if k not in src:
            if not _ignorable(k):
                report.missing.append(k)
        elif tuple(src[k].shape) != tuple(v.shape):
            report.mismatched.append((k, tuple(src[k].shape), tuple(v.shape)))
        else:
            loadable[k] = src[k]
    report.unexpected = [k for k in src if k not in dst and not _ignorable(k)]
    for lst in (report.missing, report.unexpected):
        lst.sort(key=_key_order)
    report.mismatched.sort(key=lambda t: _key_order(t[0]))

    if strict and not report.complete:
        raise TransferError(
            f"the backbone checkpoint {name} does not fit the model's ResNet trunk:\n"
            f"  checkpoint: {report.source}\n  model:      {report.target}\n{report.problems()}\n"
            "A stage deformable in one and not the other, DCNv1 vs DCNv2 layers, or another depth/width: build "
            "the model with the classifier's preset and backbone, or load what matches with strict=False "
            "(`--strict false`).", report)

    with torch.no_grad():
        for k, v in loadable.items():
            t = dst[k]
            t.copy_(v.to(dtype=t.dtype, device=t.device))
    report.loaded = sorted((k for k in loadable if not _ignorable(k)), key=_key_order)
    report.loaded_offsets = [k for k in report.loaded if ".conv_offset." in k]
    if offsets == "zero":
        report.zeroed = _zero_offsets(trunk)
    return report


def _zero_offsets(trunk: nn.Module) -> List[str]:
    """Resets every offset/mask branch of ``trunk`` to the DCNv2 initialisation; returns the keys touched."""
    keys = []
    with torch.no_grad():
        for mod_name, module in trunk.named_modules():
            branch = getattr(module, "offset_branch", None)
            if not callable(branch):
                continue
            b = branch()
            b_name = next((n for n, m in module.named_children() if m is b), None)
            for p_name, p in b.named_parameters():
                p.zero_()
                keys.append(".".join(x for x in (mod_name, b_name, p_name) if x))
    return sorted(keys, key=_key_order)
