"""Official / mmsegmentation checkpoint conversion in both directions."""

from __future__ import annotations

import re

import pytest
import torch

from segnext import create_model, load_official_weights, to_official_state_dict


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_model("tiny", 5)
    with torch.no_grad():  # non-trivial biases and running stats (all zero or one at init)
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("bias", "running_mean")):
                tensor.normal_(0.0, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def official(source: torch.nn.Module) -> dict[str, torch.Tensor]:
    return to_official_state_dict(source)


def _same_eval_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_official_names_follow_the_reference(official: dict[str, torch.Tensor]) -> None:
    assert len(official) == 550
    shapes = {
        "backbone.patch_embed1.proj.0.weight": (16, 3, 3, 3),
        "backbone.patch_embed1.proj.4.running_mean": (32,),
        "backbone.patch_embed2.proj.weight": (64, 32, 3, 3),
        "backbone.patch_embed2.norm.num_batches_tracked": (),
        "backbone.block3.0.layer_scale_1": (160,),
        "backbone.block3.0.attn.spatial_gating_unit.conv0.weight": (160, 1, 5, 5),
        "backbone.block3.0.attn.spatial_gating_unit.conv2_2.weight": (160, 1, 21, 1),
        "backbone.block3.0.attn.spatial_gating_unit.conv1_1.weight": (160, 1, 1, 11),
        "backbone.block4.1.mlp.dwconv.dwconv.weight": (1024, 1, 3, 3),
        "backbone.norm4.weight": (256,),
        "decode_head.squeeze.conv.weight": (256, 480, 1, 1),
        "decode_head.hamburger.ham_in.conv.bias": (256,),
        "decode_head.hamburger.ham_out.gn.weight": (256,),
        "decode_head.align.gn.bias": (256,),
        "decode_head.conv_seg.weight": (5, 256, 1, 1),
    }
    assert {k: tuple(official[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("backbone.patch_embed1.norm") for k in official)
    pattern = re.compile(r"(backbone\.(patch_embed|block|norm)\d|decode_head\.)")
    assert all(pattern.match(k) for k in official)


def test_round_trip_through_a_file(source, official, tmp_path) -> None:
    path = tmp_path / "segnext_tiny.pth"
    torch.save({"meta": {"note": "mmseg"}, "state_dict": official}, path)
    fresh = create_model("tiny", 5)
    report = load_official_weights(fresh, path)
    assert (report.loaded, report.missing, report.unexpected, report.ignored) == (550, [], [], [])
    assert _same_eval_output(source, fresh)
    assert "loaded 550 tensors" in str(report)


def test_mmseg_1x_names_load(source, official) -> None:
    renamed = {k.replace("mlp.dwconv.dwconv.", "mlp.dwconv."): v for k, v in official.items()}
    assert sum(".mlp.dwconv.weight" in k for k in renamed) == 13
    fresh = create_model("tiny", 5)
    report = load_official_weights(fresh, renamed)
    assert report.missing == [] and report.unexpected == []
    assert _same_eval_output(source, fresh)


@pytest.mark.parametrize("prefix", ["backbone.", ""])
def test_encoder_only_files_load_and_report_the_head(source, official, prefix) -> None:
    encoder = {
        prefix + k.removeprefix("backbone."): v for k, v in official.items() if "backbone." in k
    }
    encoder[prefix + "head.weight"] = torch.zeros(1000, 256)  # ImageNet classifier
    fresh = create_model("tiny", 5)
    head_before = {k: v.clone() for k, v in fresh.decode_head.state_dict().items()}
    report = load_official_weights(fresh, encoder)
    assert report.loaded == 537
    assert report.missing == [f"decode_head.{k}" for k in head_before]
    assert report.unexpected == [prefix + "head.weight"]
    for k, v in fresh.backbone.state_dict().items():
        assert torch.equal(v, source.backbone.state_dict()[k])
    for k, v in fresh.decode_head.state_dict().items():
        assert torch.equal(v, head_before[k])


def test_shape_mismatch_names_key_and_shapes(official) -> None:
    with pytest.raises(ValueError, match=r"decode_head\.conv_seg\.weight.*\(5, 256, 1, 1\).*\(19,"):
        load_official_weights(create_model("tiny", 19), official)


def test_unrelated_files_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="no key matches"):
        load_official_weights(create_model("tiny", 5), {"weight": torch.zeros(1)})
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="list.pt: not a SegNeXt/MSCAN weight file"):
        load_official_weights(create_model("tiny", 5), path)


def test_other_classifiers_skip_conv_seg(official) -> None:
    model = create_model("tiny", 5, classifier="integrated")
    report = load_official_weights(model, official)
    assert report.ignored == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]
    assert report.unexpected == []
    assert report.missing and all(k.startswith("decode_head.classifier.") for k in report.missing)
    with pytest.raises(ValueError, match="no official counterpart"):
        to_official_state_dict(model)
