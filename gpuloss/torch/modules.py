"""``torch.nn`` loss modules on gpuloss kernels.

Each class subclasses its torch namesake, so the constructor, its arguments,
buffers (``weight``, ``pos_weight``), ``state_dict`` and ``repr`` are torch's
own; only ``forward`` calls the fused function of gpuloss.torch.functional.
"""
from __future__ import annotations

import torch.nn as nn

from . import functional as G

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "BCELoss", "MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss"]


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` plus the keyword-only extras of ``gpuloss.torch.cross_entropy``:
    ``z_loss``, ``softcap``, ``return_z_loss`` and ``inplace_backward`` (which destroys the logits)."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None, return_z_loss: bool = False, inplace_backward: bool = False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return G.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                               softcap=self.softcap, return_z_loss=self.return_z_loss,
                               inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        extras = [f"{k}={getattr(self, k)!r}" for k, default in
                  (("z_loss", 0.0), ("softcap", None), ("return_z_loss", False), ("inplace_backward", False))
                  if getattr(self, k) != default]
        return ", ".join(extras)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    __doc__ = nn.BCEWithLogitsLoss.__doc__

    def forward(self, input, target):
        return G.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class BCELoss(nn.BCELoss):
    __doc__ = nn.BCELoss.__doc__

    def forward(self, input, target):
        return G.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class MSELoss(nn.MSELoss):
    __doc__ = nn.MSELoss.__doc__

    def forward(self, input, target):
        return G.mse_loss(input, target, reduction=self.reduction)


class L1Loss(nn.L1Loss):
    __doc__ = nn.L1Loss.__doc__

    def forward(self, input, target):
        return G.l1_loss(input, target, reduction=self.reduction)


class HuberLoss(nn.HuberLoss):
    __doc__ = nn.HuberLoss.__doc__

    def forward(self, input, target):
        return G.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class SmoothL1Loss(nn.SmoothL1Loss):
    __doc__ = nn.SmoothL1Loss.__doc__

    def forward(self, input, target):
        return G.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)
