"""ModelMeta: the typed meta of checkpoints, registered models and ONNX exports."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

import segnext
from pipelines.checkpoint_io import (
    CheckpointError,
    build_meta,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from pipelines.inference.onnx_runtime import OnnxModelError, model_meta
from pipelines.inference.segmenter import settings_from_checkpoint
from pipelines.meta import FORMAT, EvalMeta, MetaError, ModelMeta

CLASSES = ["road", "car", "sky"]
PALETTE = [[128, 64, 128], [0, 0, 142], [70, 130, 180]]

# Exactly what `build_meta` wrote before ModelMeta existed (segnext-checkpoint/1, no "eval").
OLD_META = {
    "format": FORMAT,
    "variant": "tiny",
    "num_classes": 3,
    "classifier": "integrated",
    "classifier_kwargs": {"top_k": 2},
    "nmf": {"eval_steps": 5},
    "class_names": CLASSES,
    "palette": PALETTE,
    "ignore_index": 250,
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "crop_size": [64, 96],
}


def _meta(**changes) -> ModelMeta:
    fields = dict(
        variant="tiny", num_classes=3, classifier="integrated", classifier_kwargs={"top_k": 2},
        nmf={"eval_steps": 5}, class_names=CLASSES, palette=PALETTE, ignore_index=250,
        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], crop_size=[64, 96],
    )
    return build_meta(**{**fields, **changes})


def test_round_trip_keeps_the_old_keys_and_is_immutable():
    meta = _meta(eval=EvalMeta(mode="slide", crop=[96, 96], stride=[64, 64], batch_size=2))
    raw = meta.to_dict()
    assert {k: v for k, v in raw.items() if k != "eval"} == OLD_META  # files stay compatible
    assert raw["eval"] == {"mode": "slide", "crop": [96, 96], "stride": [64, 64],
                           "batch_size": 2, "scale": None}
    assert ModelMeta.from_dict(json.loads(json.dumps(raw)), source="x") == meta
    assert pickle.loads(pickle.dumps(meta)) == meta  # Ray hands it to workers
    assert hash(meta) == hash(ModelMeta.from_dict(raw))
    assert meta.class_names == tuple(CLASSES) and meta.palette[1] == (0, 0, 142)
    assert meta.eval.crop == (96, 96) and meta.crop_size == (64, 96)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.num_classes = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        meta.nmf["eval_steps"] = 1  # type: ignore[index]
    assert ModelMeta.from_dict(meta) is meta  # a ModelMeta passes through (worker args)


def test_an_old_meta_without_the_optional_keys_loads_with_the_old_defaults():
    old = {k: v for k, v in OLD_META.items() if k not in ("ignore_index", "classifier_kwargs")}
    meta = ModelMeta.from_dict({**old, "nmf": None}, source="old.pt")
    assert meta.ignore_index == 255 and dict(meta.classifier_kwargs) == {} and dict(meta.nmf) == {}
    assert meta.eval is None
    assert ModelMeta.from_dict(OLD_META).to_dict() == OLD_META


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mean": "123"}, "key 'mean' must be a list of numbers"),
        ({"num_classes": "3"}, "key 'num_classes' must be a positive integer"),
        ({"class_names": ["a", "b"]}, "key 'class_names' must hold 3 class names, got 2"),
        ({"palette": [[0, 0, 0], [0, 0, 300], [1, 1, 1]]}, "RGB values 0..255"),
        ({"crop_size": [64, True]}, "key 'crop_size' must hold positive integers"),
        ({"classes": CLASSES}, "unknown key(s) 'classes' (did you mean 'num_classes'?)"),
        ({"eval": {"mode": "slide", "strid": [8, 8]}}, "'eval.strid' (did you mean 'eval.stride'?)"),
        ({"eval": {"mode": "sliding"}}, "key 'eval.mode' must be one of"),
        ({"format": "segnext-checkpoint/0"}, "format 'segnext-checkpoint/0'"),
        ({"crop_size": None}, "key 'crop_size' must be a list of integers, got NoneType"),
    ],
)
def test_wrong_types_and_renamed_keys_are_named_with_the_source(change, message):
    with pytest.raises(MetaError) as error:
        ModelMeta.from_dict({**OLD_META, **change}, source="models:/segnext/3")
    text = str(error.value)
    assert text.startswith("models:/segnext/3: model meta") and message in text
    assert "pass a checkpoint" in text  # and says what to do


def test_a_missing_required_key_is_named():
    raw = {k: v for k, v in OLD_META.items() if k not in ("std", "variant")}
    with pytest.raises(MetaError, match=r"^f\.pt: model meta lacks required key\(s\) 'variant', 'std'"):
        ModelMeta.from_dict(raw, source="f.pt")


def test_checkpoints_store_the_dict_and_load_the_dataclass(tmp_path: Path):
    model = segnext.create_model("tiny", 3, classifier="integrated", classifier_kwargs={"top_k": 2})
    meta = _meta()
    file = save_checkpoint(tmp_path / "new", {"model": model.state_dict(), "iteration": 1,
                                              "meta": meta})
    on_disk = torch.load(file, weights_only=True)["meta"]
    assert type(on_disk) is dict and on_disk == OLD_META
    loaded = load_checkpoint(file)
    assert loaded["meta"] == meta
    rebuilt = model_from_checkpoint(loaded)
    assert rebuilt.decode_head.classifier.top_k == 2

    # A checkpoint written before ModelMeta: the meta dict saved as is, eval in the config.
    config = {"eval.mode": "slide", "eval.crop": [96, 128], "data.scale": [2048, 512]}
    old = {k: v for k, v in OLD_META.items() if k != "ignore_index"}
    torch.save({"model": model.state_dict(), "iteration": 7, "config": config, "meta": old},
               tmp_path / "old.pt")
    payload = load_checkpoint(tmp_path / "old.pt")
    assert isinstance(payload["meta"], ModelMeta) and payload["meta"].ignore_index == 255
    settings = settings_from_checkpoint(payload)
    assert (settings.mode, settings.crop_size, settings.scale) == ("slide", (96, 128), (2048, 512))


def test_a_broken_meta_in_a_file_names_the_file(tmp_path: Path):
    torch.save({"model": {}, "iteration": 0, "meta": {**OLD_META, "std": [1, 0, 1]}},
               tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: model meta key 'std' must hold positive"):
        load_checkpoint(tmp_path / "bad.pt")


def test_eval_settings_in_the_meta_win_over_the_config():
    meta = _meta(eval=EvalMeta.from_flat_config({"eval.mode": "slide", "eval.stride": [10, 20],
                                                 "eval.batch_size": 3}))
    config = {"eval.mode": "whole", "eval.stride": [5, 5], "eval.batch_size": 1}
    settings = settings_from_checkpoint({"meta": meta, "config": config})
    assert (settings.mode, settings.stride, settings.batch_size) == ("slide", (10, 20), 3)
    # and the dict form a training worker holds reads the same
    assert settings_from_checkpoint({"meta": meta.to_dict(), "config": config}) == settings
    # no eval anywhere: what serving always did (auto mode, 2/3 stride, 4 images)
    bare = settings_from_checkpoint({"meta": OLD_META})
    assert (bare.mode, bare.stride, bare.batch_size) == ("auto", (42, 64), 4)


def test_onnx_metadata_new_and_before_the_meta_key():
    meta = _meta()
    settings = {"mean": list(meta.mean), "std": list(meta.std), "crop_size": [64, 96]}
    assert model_meta(Path("m.onnx"), {"meta": meta.to_dict(), "settings": settings}) == meta
    legacy = {**meta.describe(), "settings": settings}  # what exports wrote before
    old = model_meta(Path("old.onnx"), legacy)
    assert (old.class_names, old.palette, old.ignore_index) == (
        meta.class_names, meta.palette, 250)
    with pytest.raises(OnnxModelError, match=r"^m\.onnx: model meta lacks required key\(s\) 'palette'"):
        model_meta(Path("m.onnx"), {**{k: v for k, v in legacy.items() if k != "palette"}})
