"""Argument types of the `segnext` subcommands that check a value's range as argparse parses it,
so that a value that cannot work stops the command at once with the option named (exit 2)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number >= 1 (batch sizes, thread counts, window sizes)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (shares, agreement thresholds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


def onnx_opset(text: str) -> int:
    """An opset the installed torch.onnx exporter can write (torch is imported only here, when
    the option is given, so `--help` stays fast)."""
    from torch.onnx import _constants

    low = _constants.ONNX_MIN_OPSET
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    value = _whole_number(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}, the opsets this "
                                         "torch exports (17 is the tested default)")
    return value


REGISTRY_NAME_RULE = "no '/', ':' or '%'; MLflow's models:/NAME/VERSION URIs would break"


def decision_rule(text: str) -> str:
    """An integrated head's prediction rule (torch is imported only here, when the option is
    given, so `--help` stays fast)."""
    from segnext.classifier import DECISIONS

    if text not in DECISIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(DECISIONS)}")
    return text


def is_registry_name(name: str) -> bool:
    """Whether MLflow's model registry can hold `name` and its models:/NAME/VERSION URIs parse:
    the one rule behind `registry.name` and `segnext register --name`."""
    return name.strip() != "" and not any(c in name for c in "/:%")


def registry_name(text: str) -> str:
    """A registered model name (checked before the checkpoint is read or anything logged)."""
    if not is_registry_name(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model registry name "
                                         f"({REGISTRY_NAME_RULE})")
    return text


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
