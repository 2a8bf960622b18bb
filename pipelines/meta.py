"""`ModelMeta`: what a checkpoint, a registered model and an exported file say about their model.

Everything needed to rebuild the network and run it on new images without the training config:
variant, classes and palette, classifier and its options, normalisation, the training crop, and
(from checkpoints written since it was added) the eval settings. Written as a plain dict
(`to_dict`, the JSON/checkpoint form, keys unchanged since `segnext-checkpoint/1`) and read back
only through `ModelMeta.from_dict`, which checks every key and type: a renamed or mistyped key
is an error naming the file, never a silent default. Older checkpoints, which lack the optional
keys, load with the defaults their readers used.

Standard library only: the torch-free ONNX runtime (`pipelines.inference.onnx_runtime`) imports it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

FORMAT = "segnext-checkpoint/1"  # the meta dict's "format", shared with the checkpoint file
EVAL_MODES = ("whole", "slide")


class MetaError(ValueError):
    """A meta dict that is not one `ModelMeta.to_dict` wrote: missing, unknown or mistyped keys."""


class FrozenMap(Mapping[str, Any]):
    """A read-only, hashable, picklable str-keyed mapping (nested lists become tuples)."""

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._items = {key: _freeze(value) for key, value in (values or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self._items

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._items = state

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists again (JSON and `torch.load(weights_only=True)` safe)."""
        return {key: _thaw(value) for key, value in self._items.items()}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, FrozenMap):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# ------------------------------------------------------------------------------- field checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seq(key: str, value: Any, length: int | None, what: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise MetaError(f"key {key!r} must be a list of {what}, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise MetaError(f"key {key!r} must hold {length} {what}, got {len(value)}: {list(value)!r}")
    return tuple(value)


def _ints(key: str, value: Any, length: int, *, positive: bool = True) -> tuple[int, ...]:
    items = _seq(key, value, length, "integers")
    if not all(_is_int(v) and (v > 0 or not positive) for v in items):
        kind = "positive integers" if positive else "integers"
        raise MetaError(f"key {key!r} must hold {kind}, got {list(items)!r}")
    return items


def _floats(key: str, value: Any, *, positive: bool = False) -> tuple[float, ...]:
    items = _seq(key, value, 3, "numbers (one per RGB channel)")
    if not all(_is_number(v) and (v > 0 or not positive) for v in items):
        kind = "positive numbers" if positive else "numbers"
        raise MetaError(f"key {key!r} must hold {kind}, got {list(items)!r}")
    return tuple(float(v) for v in items)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MetaError(f"key {key!r} must be a non-empty string, got {value!r}")
    return value


def _options(key: str, value: Any) -> FrozenMap:
    """classifier_kwargs / nmf: None (what some old writers stored) reads as no options."""
    if value is None:
        return FrozenMap()
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise MetaError(f"key {key!r} must be a mapping of option names to values, got {value!r}")
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


def _optional_pair(key: str, value: Any) -> tuple[int, int] | None:
    return None if value is None else _ints(key, value, 2)  # type: ignore[return-value]


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


FIX = (
    "pass a checkpoint, model or export written by this project (`segnext train`, "
    "`segnext register`, `segnext export`), or correct that key"
)


def _build(cls: type, raw: Any, *, where: str, skip: tuple[str, ...] = ()) -> Any:
    """`cls(**raw)` with unknown and missing keys named; `where` prefixes the key names
    ("" for the meta itself, "eval." for its eval section)."""
    if not isinstance(raw, Mapping):
        place = f"key {where.rstrip('.')!r} " if where else ""
        raise MetaError(f"{place}must be a mapping, got {type(raw).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(str(key) for key in raw if key not in names and key not in skip)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {where + close[0]!r}?)" if close else ""
            hints.append(repr(f"{where}{key}") + hint)
        raise MetaError(f"has unknown key(s) {', '.join(hints)}")
    required = [f.name for f in fields(cls) if f.default is f.default_factory is MISSING]
    missing = [f"{where}{key}" for key in required if key not in raw]
    if missing:
        raise MetaError(f"lacks required key(s) {', '.join(map(repr, missing))}")
    return cls(**{key: value for key, value in raw.items() if key not in skip})


# ---------------------------------------------------------------------------------- the types


@dataclass(frozen=True)
class EvalMeta:
    """The training run's eval settings, which `segnext eval`/serving start from."""

    mode: str = "whole"  # training validation's mode; serving slides when "slide", else auto
    crop: tuple[int, int] | None = None  # slide window (h, w); None: the training crop
    stride: tuple[int, int] | None = None  # slide stride (h, w); None: 2/3 of the window
    batch_size: int = 4  # images of one size per forward pass
    scale: tuple[int, int] | None = None  # test resize (long, short): the training data.scale

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise MetaError(f"key 'eval.mode' must be one of {EVAL_MODES}, got {self.mode!r}")
        for name in ("crop", "stride", "scale"):
            _set(self, name, _optional_pair(f"eval.{name}", getattr(self, name)))
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise MetaError(f"key 'eval.batch_size' must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def from_flat_config(cls, config: Mapping[str, Any]) -> EvalMeta:
        """From a flat training config (`pipelines.config.to_flat_dict`, as checkpoints store
        it): the one path both new metas and checkpoints written before `eval` take."""
        return cls(
            mode=config.get("eval.mode") or "whole",
            crop=config.get("eval.crop"),
            stride=config.get("eval.stride"),
            batch_size=int(config.get("eval.batch_size") or 4),
            scale=config.get("data.scale"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "crop": None if self.crop is None else list(self.crop),
            "stride": None if self.stride is None else list(self.stride),
            "batch_size": self.batch_size,
            "scale": None if self.scale is None else list(self.scale),
        }


@dataclass(frozen=True)
class ModelMeta:
    """What rebuilds the model and runs it (module docstring). Construct with keywords; every
    field is checked and sequences become tuples, so a ModelMeta is immutable and hashable."""

    variant: str
    num_classes: int
    classifier: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: tuple[int, int]  # the training crop (h, w)
    # Optional keys; the defaults are what readers assumed before these were checked.
    ignore_index: int = 255
    classifier_kwargs: FrozenMap = field(default_factory=FrozenMap)
    nmf: FrozenMap = field(default_factory=FrozenMap)
    eval: EvalMeta | None = None  # None: checkpoints before it; serving reads their config

    def __post_init__(self) -> None:
        _text("variant", self.variant)
        _text("classifier", self.classifier)
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise MetaError(f"key 'num_classes' must be a positive integer, got {self.num_classes!r}")
        names = _seq("class_names", self.class_names, self.num_classes, "class names")
        if not all(isinstance(name, str) for name in names):
            raise MetaError(f"key 'class_names' must hold strings, got {list(names)!r}")
        _set(self, "class_names", names)
        palette = _seq("palette", self.palette, self.num_classes, "RGB colours")
        colors = tuple(_ints("palette", color, 3, positive=False) for color in palette)
        if not all(0 <= v <= 255 for color in colors for v in color):
            raise MetaError(f"key 'palette' must hold RGB values 0..255, got {palette!r}")
        _set(self, "palette", colors)
        _set(self, "mean", _floats("mean", self.mean))
        _set(self, "std", _floats("std", self.std, positive=True))
        _set(self, "crop_size", _ints("crop_size", self.crop_size, 2))
        if not _is_int(self.ignore_index):
            raise MetaError(f"key 'ignore_index' must be an integer, got {self.ignore_index!r}")
        _set(self, "classifier_kwargs", _options("classifier_kwargs", self.classifier_kwargs))
        _set(self, "nmf", _options("nmf", self.nmf))
        if isinstance(self.eval, Mapping):
            _set(self, "eval", _build(EvalMeta, self.eval, where="eval."))
        elif self.eval is not None and not isinstance(self.eval, EvalMeta):
            raise MetaError(f"key 'eval' must be a mapping or null, got {self.eval!r}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | ModelMeta, *, source: str = "model meta") -> ModelMeta:
        """Read a `to_dict` form (or pass a ModelMeta through). `source` names the file or
        model URI in every error. Raises MetaError for a wrong format, a missing required key,
        an unknown key or a wrong type."""
        if isinstance(raw, ModelMeta):
            return raw
        if isinstance(raw, Mapping) and raw.get("format", FORMAT) != FORMAT:
            raise MetaError(
                f"{source}: model meta format {raw.get('format')!r}, this code reads {FORMAT!r}; "
                "pass a checkpoint or model written by this project's `segnext train`"
            )
        try:
            return _build(cls, raw, where="", skip=("format",))
        except MetaError as error:
            raise MetaError(f"{source}: model meta {error}; {FIX}") from None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint/JSON form: plain dicts, lists and scalars, with "format"."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "variant": self.variant,
            "num_classes": self.num_classes,
            "classifier": self.classifier,
            "classifier_kwargs": self.classifier_kwargs.to_dict(),
            "nmf": self.nmf.to_dict(),
            "class_names": list(self.class_names),
            "palette": [list(color) for color in self.palette],
            "ignore_index": self.ignore_index,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_size": list(self.crop_size),
        }
        if self.eval is not None:
            out["eval"] = self.eval.to_dict()
        return out

    def describe(self) -> dict[str, Any]:
        """The facts every exported flavour carries at top level (the pyfunc's MLflow
        metadata, the ONNX file's metadata): one place, so they cannot drift apart."""
        return {
            "class_names": list(self.class_names),
            "palette": [list(color) for color in self.palette],
            "ignore_index": self.ignore_index,
            "num_classes": self.num_classes,
            "variant": self.variant,
            "classifier": self.classifier,
        }


def payload_meta(payload: Mapping[str, Any], source: str = "checkpoint payload") -> ModelMeta:
    """The `ModelMeta` of a checkpoint payload: loaded ones already hold it, in-memory ones (a
    training worker's, a test's) may hold its dict form, which is checked here."""
    return ModelMeta.from_dict(payload["meta"], source=source)
