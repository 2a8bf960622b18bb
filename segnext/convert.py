"""Official SegNeXt / mmsegmentation checkpoint names <-> this library's module names.

`official_name` maps one of our state_dict keys to its official name; loading inverts that
table over the model's own keys, so both directions come from one set of rules.
Accepted inputs: official full checkpoints (`backbone.*`, `decode_head.*`, optionally under
"state_dict"), mmsegmentation 1.x names (`mlp.dwconv.*`), and ImageNet encoder-only files
with or without the `backbone.` prefix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# Stage-1 stem: ours has named layers, the official one is a Sequential(conv, BN, GELU, conv, BN).
_STEM = {"conv1": "proj.0", "norm1": "proj.1", "conv2": "proj.3", "norm2": "proj.4"}
_MSCA = "attn.spatial_gating_unit"
_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj_in": "attn.proj_1",
    "attn.proj_out": "attn.proj_2",
    "attn.msca.conv_local": f"{_MSCA}.conv0",
    "attn.msca.strips.0.horizontal": f"{_MSCA}.conv0_1",
    "attn.msca.strips.0.vertical": f"{_MSCA}.conv0_2",
    "attn.msca.strips.1.horizontal": f"{_MSCA}.conv1_1",
    "attn.msca.strips.1.vertical": f"{_MSCA}.conv1_2",
    "attn.msca.strips.2.horizontal": f"{_MSCA}.conv2_1",
    "attn.msca.strips.2.vertical": f"{_MSCA}.conv2_2",
    "attn.msca.mix": f"{_MSCA}.conv3",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1": "layer_scale_1",
    "layer_scale2": "layer_scale_2",
}
_HEAD = {
    "squeeze.conv": "squeeze.conv",
    "squeeze.norm": "squeeze.gn",
    "hamburger.ham_in": "hamburger.ham_in.conv",
    "hamburger.ham_out.conv": "hamburger.ham_out.conv",
    "hamburger.ham_out.norm": "hamburger.ham_out.gn",
    "align.conv": "align.conv",
    "align.norm": "align.gn",
    "classifier.conv_seg": "conv_seg",
}
_STAGE_KEY = re.compile(r"backbone\.stages\.(\d+)\.(embed|norm|blocks\.(\d+))\.(.+)")
_MMSEG1_DWCONV = re.compile(r"(\.mlp\.dwconv)\.(weight|bias)$")
_OFFICIAL_CLASSIFIER = "decode_head.conv_seg."


@dataclass
class LoadReport:
    """What `load_official_weights` did. `missing` are our keys left at init; `unexpected` and
    `ignored` are the file's keys (ignored: the official classifier, for another classifier)."""

    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        for label, keys in (
            ("missing (left at init)", self.missing),
            ("unexpected (not used)", self.unexpected),
            ("ignored", self.ignored),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"{label}: {len(keys)}: {shown}")
        return "\n".join(lines)


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """Rename `module.path.leaf` through a table of module paths (or of whole names)."""
    if name in table:
        return table[name]
    module, _, leaf = name.rpartition(".")
    return f"{table[module]}.{leaf}" if module in table else None


def official_name(key: str) -> str | None:
    """The official checkpoint name of our state_dict `key`, or None if it has none."""
    if key.startswith("decode_head."):
        renamed = _rename(key.removeprefix("decode_head."), _HEAD)
        return None if renamed is None else f"decode_head.{renamed}"
    match = _STAGE_KEY.fullmatch(key)
    if match is None:
        return None
    stage, part, block, rest = int(match[1]) + 1, match[2], match[3], match[4]
    if part == "norm":
        return f"backbone.norm{stage}.{rest}"
    if part == "embed":
        renamed = _rename(rest, _STEM) if stage == 1 else rest
        return None if renamed is None else f"backbone.patch_embed{stage}.{renamed}"
    renamed = _rename(rest, _BLOCK)
    return None if renamed is None else f"backbone.block{stage}.{block}.{renamed}"


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under official names (standard classifier only: the official model has no
    other)."""
    out = {}
    for key, tensor in model.state_dict().items():
        name = official_name(key)
        if name is None:
            raise ValueError(
                f"{key!r} has no official counterpart; only models with the standard "
                f"classifier export to official names (this one: {model.classifier_kind!r})"
            )
        out[name] = tensor
    return out


def _read_state_dict(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of `source` and a name for it in error messages."""
    if isinstance(source, str | os.PathLike):
        obj = torch.load(source, map_location="cpu", weights_only=True)
        where = os.fspath(source)
    else:
        obj, where = source, "the given state dict"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{where}: not a SegNeXt/MSCAN weight file (expected a dict of tensors, possibly "
            f"under 'state_dict'); this project's own checkpoints load with "
            f"pipelines.checkpoint_io.load_checkpoint"
        )
    return dict(obj), where


def _normalise_key(key: str, encoder_only: bool, strip_module: bool) -> str:
    """Official full-model name for a key from any accepted layout."""
    if strip_module:
        key = key.removeprefix("module.")
    if encoder_only:
        key = f"backbone.{key}"
    return _MMSEG1_DWCONV.sub(r"\1.dwconv.\2", key)


def load_official_weights(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]
) -> LoadReport:
    """Load an official SegNeXt / mmsegmentation / ImageNet-MSCAN checkpoint into `model`.

    Shapes must match (a ValueError names the key and both shapes). A model with a
    non-standard classifier skips the official `conv_seg` (listed in `report.ignored`).
    """
    state, where = _read_state_dict(source)
    strip_module = bool(state) and all(k.startswith("module.") for k in state)
    bare = [k.removeprefix("module.") if strip_module else k for k in state]
    encoder_only = not any(k.startswith(("backbone.", "decode_head.")) for k in bare)
    own = model.state_dict()
    to_ours = {name: k for k in own if (name := official_name(k)) is not None}
    skip_classifier = getattr(model, "classifier_kind", "standard") != "standard"

    converted, report = {}, LoadReport()
    for file_key, tensor in state.items():
        name = _normalise_key(file_key, encoder_only, strip_module)
        if skip_classifier and name.startswith(_OFFICIAL_CLASSIFIER):
            report.ignored.append(file_key)
            continue
        ours = to_ours.get(name)
        if ours is None:
            report.unexpected.append(file_key)
            continue
        if tensor.shape != own[ours].shape:
            raise ValueError(
                f"{where}: shape mismatch for {file_key!r} (our {ours!r}): checkpoint "
                f"{tuple(tensor.shape)}, model {tuple(own[ours].shape)}; is the variant or "
                f"num_classes right?"
            )
        converted[ours] = tensor
    if not converted:
        raise ValueError(
            f"{where}: no key matches an official SegNeXt/MSCAN name; first keys: {list(state)[:5]}"
        )
    model.load_state_dict(converted, strict=False)
    report.loaded = len(converted)
    report.missing = [k for k in own if k not in converted]
    return report
