"""Optimizer and learning-rate schedule of the SegNeXt recipe.

AdamW with three parameter groups: encoder weights (decayed), encoder norm parameters (block
BNs, patch-embedding BNs, stage LayerNorms: no decay) and the whole decoder (lr x
`decoder_lr_mult`). The schedule is the official mmcv one: poly decay over all iterations,
multiplied during warm-up by a ramp that starts at `warmup_ratio`.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.config import OptimConfig, ScheduleConfig

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split `model` (a SegNeXt with `.backbone` and `.decode_head`) into the recipe's groups."""
    norm_params = {
        id(p)
        for module in model.backbone.modules()
        if isinstance(module, NORM_TYPES)
        for p in module.parameters(recurse=False)
    }
    encoder_decay, encoder_no_decay = [], []
    for p in model.backbone.parameters():
        if p.requires_grad:
            (encoder_no_decay if id(p) in norm_params else encoder_decay).append(p)
    decoder = [p for p in model.decode_head.parameters() if p.requires_grad]
    grouped = len(encoder_decay) + len(encoder_no_decay) + len(decoder)
    total = sum(1 for p in model.parameters() if p.requires_grad)
    if grouped != total:
        raise ValueError(
            f"{total - grouped} trainable parameters are outside model.backbone and "
            "model.decode_head; param_groups would not optimise them"
        )
    groups = [
        {"name": "encoder", "params": encoder_decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "encoder_norm", "params": encoder_no_decay, "lr": cfg.lr, "weight_decay": 0.0},
        {
            "name": "decoder",
            "params": decoder,
            "lr": cfg.lr * cfg.decoder_lr_mult,
            "weight_decay": cfg.weight_decay,
        },
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(iteration: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimizer step `iteration` (0-based)."""
    progress = min(iteration, cfg.iterations) / cfg.iterations
    factor = (1.0 - progress) ** cfg.power
    if iteration < cfg.warmup_iters:
        ramp = 1.0 - (1.0 - iteration / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        factor *= ramp
    return factor


class RecipeSchedule(torch.optim.lr_scheduler.LambdaLR):
    """`LambdaLR` over `lr_factor`; stepped once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> None:
        self.schedule = cfg
        super().__init__(optimizer, lr_lambda=self._factor)

    def _factor(self, iteration: int) -> float:
        return lr_factor(iteration, self.schedule)

    def state_dict(self) -> dict:
        """Plain data only (the bound lambda is rebuilt from the config), so weights_only loads it."""
        return {k: v for k, v in super().state_dict().items() if k not in ("lr_lambdas", "schedule")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "lr_lambdas"})
