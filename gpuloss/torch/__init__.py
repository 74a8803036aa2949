"""gpuloss from PyTorch: ``torch.nn.functional``'s losses and ``torch.nn``'s loss modules, same
names, signatures and results, computed by gpuloss's fused kernels (docs/torch.md).

Swap ``import torch.nn.functional as F`` for ``import gpuloss.torch as F`` (or
``nn.CrossEntropyLoss`` for ``gpuloss.torch.CrossEntropyLoss``).  Each loss is a
``torch.library`` custom op (``gpuloss::cross_entropy``, ...) whose forward
computes the loss and its gradient in one pass; backward only scales that
gradient, and ``torch.compile(fullgraph=True)`` traces through it.

Importing ``gpuloss`` does not import torch; this subpackage needs it.
"""
from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("gpuloss.torch needs PyTorch: pip install 'gpuloss[torch]'") from exc

from .functional import (binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy, huber_loss,
                         l1_loss, mse_loss, smooth_l1_loss)
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, L1Loss, MSELoss, SmoothL1Loss

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy", "mse_loss", "l1_loss",
           "huber_loss", "smooth_l1_loss", "CrossEntropyLoss", "BCEWithLogitsLoss", "BCELoss", "MSELoss", "L1Loss",
           "HuberLoss", "SmoothL1Loss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
from .distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402,F401
# (docs/distributed.md)
