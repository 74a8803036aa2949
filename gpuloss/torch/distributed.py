"""Vocabulary-parallel softmax cross entropy over ``torch.distributed`` (docs/distributed.md).

:func:`vocab_parallel_cross_entropy` is Megatron-LM's vocabulary-parallel
cross entropy (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion
Parameter Language Models Using Model Parallelism", arXiv 1909.08053, §3):
each rank of ``group`` holds a contiguous slice of the class axis (the last
axis) of the logits, and per row only the max (all-reduce MAX) and two or
three sums (one all-reduce SUM: the sum of exponentials, the target logit and,
with label smoothing, the class-weighted gap to the max) cross the network,
never the logits.  Our kernels make one pass over the shard before the
collectives (``kernels/vocab_parallel.cu`` ``vp_stats``, or the Numba twin in
``gpuloss/backends/cpu_vocab.py``) and one after (``vp_finish``: every row's
loss, identical on every rank, and the gradient of this rank's classes).

The transport is ``torch.distributed`` on the given process group (gloo on
CPUs, NCCL on GPUs); nothing else is exchanged, and on a GPU nothing waits for
the device but the collectives themselves (the reduction's denominator and
sum(cw) stay device tensors).  Without an initialised process group (and
``group=None``) the call is a world of one: the unsharded loss.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as v
from .._plan import ReducePlan
from ..backends import host
from ..backends.cpu_vocab import GAP, REST
from ._convert import on_torch_stream, to_array, to_tensor

__all__ = ["vocab_parallel_cross_entropy", "shard_bounds"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCTION_IDS = {r.value: k for k, r in enumerate(v.Reduction)}


def shard_bounds(vocab: int, world: int) -> list[int]:
    """The usual contiguous split of ``vocab`` classes over ``world`` ranks: rank r holds
    ``[bounds[r], bounds[r + 1])``, the first ``vocab % world`` ranks one class more."""
    base, extra = divmod(int(vocab), int(world))
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def _world(group):
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _kernels(device: torch.device, backend: Optional[str]):
    """(stats, finish) functions of the backend that runs on ``device``."""
    from ..backends import forced_backend_name, get_backend
    if device.type == "cuda":
        name = "cuda"
        if backend not in (None, "auto", "cuda"):
            raise ValueError(f"backend={backend!r} cannot run on CUDA tensors; use 'cuda' or None")
    else:
        name = backend if backend not in (None, "auto") else (forced_backend_name() or "cpu")
        if name == "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors; logits_shard is on the CPU")
        if name not in ("cpu", "emulated"):
            raise ValueError(f"backend must be 'cpu', 'emulated', 'cuda' or None; got {backend!r}")
    if name == "cpu":
        from ..backends import cpu_vocab
        return cpu_vocab.vocab_stats, cpu_vocab.vocab_finish
    from ..backends import launch_vocab
    be = get_backend(name)
    return (lambda *a, **k: launch_vocab.vocab_stats(be, *a, **k),
            lambda *a, **k: launch_vocab.vocab_finish(be, *a, **k))


def _row_weights(weight, target: Tensor, dtype) -> Tensor:
    """Per-measurement weights [R] from a number, a tensor of target's shape, a leading prefix of it
    (``[N]`` against ``[N, T]``) or a same-rank broadcast, as gpuloss's weight layouts."""
    shape = tuple(target.shape)
    if weight is None:
        return torch.ones(target.numel(), dtype=dtype, device=target.device)
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        return torch.full((target.numel(),), float(weight), dtype=dtype, device=target.device)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a number, a tensor or None; got {type(weight).__name__}")
    if weight.device != target.device:
        raise ValueError(f"weight is on {weight.device}, target on {target.device}: put them on one device")
    w = weight
    if w.ndim < len(shape) and tuple(w.shape) == shape[:w.ndim]:
        w = w.reshape(tuple(w.shape) + (1,) * (len(shape) - w.ndim))
    try:
        w = torch.broadcast_to(w, shape)
    except RuntimeError:
        raise ValueError(f"weight of shape {tuple(weight.shape)} fits neither the loss shape {shape} nor a "
                         f"leading part of it") from None
    return w.reshape(-1).to(dtype)


def _gather(values: Sequence[float], device, group, world: int) -> np.ndarray:
    """Every rank's float64 vector, [world, len(values)], through one all_gather."""
    mine = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu().numpy()


def _check_agreement(table: np.ndarray, names: Sequence[str]) -> None:
    for k, name in enumerate(names):
        col = table[:, k]
        same = (col == col[0]) | (np.isnan(col) & np.isnan(col[0]))
        if not same.all():
            other = int(np.argmin(same))
            raise ValueError(f"vocab_parallel_cross_entropy: {name} differs across ranks (rank 0: {col[0]:g}, "
                             f"rank {other}: {col[other]:g}); every rank must pass the same value")


def _target_fingerprint(y: Tensor) -> float:
    """A number equal on ranks that hold the same targets (and almost surely different otherwise)."""
    if y.numel() == 0:
        return 0.0
    pos = torch.arange(1, y.numel() + 1, device=y.device, dtype=torch.int64)
    return float(((y * 1_000_003 + 7) * pos % 2_147_483_647).sum().item())


class _VocabParallelCE(torch.autograd.Function):
    """Forward runs both kernels and keeps the shard's gradient; backward only scales it."""

    @staticmethod
    def forward(ctx, logits_shard, target, w_row, class_weight, opts):
        loss, z_term, grad = _forward(logits_shard, target, w_row, class_weight, opts)
        ctx.per_row = opts["reduction"] == "none"
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.has_grad = grad is not None
        if z_term is not None:
            ctx.mark_non_differentiable(z_term)
            return loss, z_term
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if not ctx.has_grad:
            raise RuntimeError("vocab_parallel_cross_entropy: the gradient was not computed in the forward "
                               "pass (logits_shard did not require grad, or grad mode was off)")
        g = grad_loss.to(grad.dtype)
        if ctx.per_row:
            out = grad * g.reshape(g.shape + (1,))
        else:
            out = grad * g
        return out, None, None, None, None


def _forward(x: Tensor, target: Tensor, w_row: Tensor, class_weight: Optional[Tensor], o: dict):
    stats_fn, finish_fn = _kernels(x.device, o["backend"])
    v_local, start, classes = o["v_local"], o["start"], o["classes"]
    rows = target.numel()
    xs = x.detach().reshape(rows, v_local)
    if not xs.is_contiguous():
        xs = xs.contiguous()
    y = target.reshape(-1).to(torch.int64).contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cw = None if class_weight is None else class_weight.detach().to(acc).contiguous()
    group, world = o["group"], o["world"]
    eps, z_loss, softcap, ignore = o["label_smoothing"], o["z_loss"], o["softcap"], o["ignore_index"]
    with on_torch_stream(x):
        m_arr, packed_arr = stats_fn(to_array(xs), to_array(y), to_array(cw), start, ignore_index=ignore,
                                     label_smoothing=eps, softcap=softcap)
    m = to_tensor(m_arr, x.device)
    packed = to_tensor(packed_arr, x.device)
    if world > 1:
        m_local = m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        same = m_local == m
        packed[:, REST] *= torch.where(same, torch.ones_like(m), torch.exp(m_local - m))
        if packed.shape[1] > GAP:
            cw_shard = (torch.tensor(float(v_local), dtype=acc, device=x.device) if cw is None
                        else cw[start:start + v_local].sum())
            packed[:, GAP] += torch.where(same, torch.zeros_like(m), cw_shard * (m - m_local))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    # The reduction's denominator from targets and weights alone: identical on every rank, no communication.
    red = o["reduction"]
    mode, number = host.denominator_rule(ReducePlan(v.Reduction(red), tuple(target.shape), 1), None)
    if mode == host.DENOM_CONSTANT:
        denom = torch.tensor(number, dtype=torch.float64, device=x.device)
    else:
        valid = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != ignore
        w_meas = w_row.to(torch.float64) * valid
        if cw is not None:
            in_range = (y >= 0) & (y < classes)
            w_meas = w_meas * torch.where(in_range, cw.to(torch.float64)[torch.where(in_range, y, 0)], 1.0)
        denom = (w_meas.sum() if mode == host.DENOM_WEIGHT_SUM else (w_meas != 0).sum().to(torch.float64)) * number
    inv = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / torch.where(denom == 0, torch.ones_like(denom), denom))
    scale = torch.ones((), dtype=torch.float64, device=x.device) if red == "none" else inv
    scal = torch.stack([denom, scale]).contiguous()
    cw_total = None if cw is None else cw.to(torch.float64).sum().reshape(1)
    want_grad, want_z = o["want_grad"], o["return_z_loss"]
    with on_torch_stream(x):
        if x.device.type == "cpu":  # the Numba twin takes host numbers (no device to wait for)
            scal_arg, cw_total_arg = float(scale), None if cw_total is None else float(cw_total)
        else:
            scal_arg, cw_total_arg = to_array(scal), to_array(cw_total)
        loss_arr, z_arr, grad_arr = finish_fn(
            to_array(xs), to_array(y), to_array(w_row.to(acc).contiguous()), to_array(cw), start, classes,
            to_array(m), to_array(packed), ignore_index=ignore, label_smoothing=eps, z_loss=z_loss, softcap=softcap,
            grad_scale=scal_arg, want_grad=want_grad, want_z=want_z, cw_total=cw_total_arg)
    loss_rows = to_tensor(loss_arr, x.device)
    z_rows = to_tensor(z_arr, x.device) if want_z else None
    grad = to_tensor(grad_arr, x.device).reshape(x.shape) if want_grad else None

    def reduce(rows_t):
        if red == "none":
            return rows_t.reshape(target.shape)
        total = rows_t.to(torch.float64).sum()
        return torch.where(denom == 0, torch.zeros_like(total), total * inv).to(acc)

    return reduce(loss_rows), (reduce(z_rows) if want_z else None), grad


def vocab_parallel_cross_entropy(logits_shard: Tensor, target: Tensor, *, group=None, weight=None,
                                 class_weight: Optional[Tensor] = None, ignore_index: Optional[int] = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                                 softcap: Optional[float] = None, return_z_loss: bool = False,
                                 shard_sizes: Optional[Sequence[int]] = None, validate: bool = True,
                                 backend: Optional[str] = None):
    """Softmax cross entropy of logits whose class axis (the last) is split over the ranks of ``group``.

    Rank r passes ``logits_shard`` = the classes ``[start_r, start_r + V_r)`` of every row
    (``[..., V_r]``, the ranks in order, contiguous), and the same ``target`` (class indices
    into the whole vocabulary, shape ``logits_shard.shape[:-1]``), ``weight`` and
    ``class_weight`` (the whole ``[C]`` vector) on every rank.  Returns the loss of
    :func:`gpuloss.softmax_cross_entropy` on the unsharded logits (same options, same
    reductions, same defaults: ``reduction="mean"``, ``ignore_index=-100``, an empty mean is
    0), identical on every rank, in float32 (float64 for float64 logits); backward gives each
    rank the gradient of its own slice.  ``return_z_loss=True`` returns ``(loss, z_term)``.

    ``shard_sizes``: every rank's ``V_r``; when None they are all-gathered once per call
    (one small collective, a host synchronisation on GPUs).  ``validate`` also checks that
    every rank passes the same options and targets (in that same collective) and that
    targets are in ``[0, C)`` or ``ignore_index``.
    """
    if not isinstance(logits_shard, Tensor):
        raise TypeError(f"logits_shard must be a torch.Tensor; got {type(logits_shard).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if logits_shard.dtype not in _DTYPES:
        raise TypeError(f"logits_shard must be float32, float64, float16 or bfloat16; got {logits_shard.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (probability targets are not supported "
                        f"vocabulary-parallel); got {target.dtype}")
    if logits_shard.ndim == 0:
        raise ValueError("logits_shard must have a class axis (the last); got a 0-d tensor")
    if tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target must have the shape of logits_shard without its last (class) axis, "
                         f"{tuple(logits_shard.shape[:-1])}; got {tuple(target.shape)}")
    if target.device != logits_shard.device:
        raise ValueError(f"target is on {target.device}, logits_shard on {logits_shard.device}")
    ignore = v.check_ignore_index(ignore_index)
    eps = v.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_coef = v.check_real("z_loss", z_loss, low=0.0)
    cap = 0.0 if softcap is None else v.check_real("softcap", softcap, low=0.0, low_open=True)
    red = v.check_reduction(reduction).value
    for name, flag in (("return_z_loss", return_z_loss), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    world, rank = _world(group)
    v_local = int(logits_shard.shape[-1])
    if v_local == 0:
        raise ValueError("logits_shard must hold at least one class on its last axis")
    if shard_sizes is not None:
        sizes = list(shard_sizes)
        if len(sizes) != world or not all(isinstance(s, numbers.Integral) and s >= 1 for s in sizes):
            raise ValueError(f"shard_sizes must list the class count of each of the {world} ranks (ints >= 1); "
                             f"got {shard_sizes!r}")
        gathering = world > 1 and validate
        # With validation the check comes after the all_gather below, on every rank at once: a rank that
        # raised here alone would leave the others waiting in the collective.
        if not gathering and int(sizes[rank]) != v_local:
            raise ValueError(f"shard_sizes[{rank}] = {sizes[rank]} but this rank's logits_shard holds {v_local} "
                             f"classes (last axis of shape {tuple(logits_shard.shape)})")
    has_cw = class_weight is not None
    if world > 1 and (shard_sizes is None or validate):
        meta = [v_local, target.numel(), eps, z_coef, cap, _REDUCTION_IDS[red],
                math.nan if ignore is None else float(ignore), float(has_cw),
                -1.0 if not has_cw else float(class_weight.numel()), float(weight is not None),
                float(_DTYPES.index(logits_shard.dtype))]
        if validate:
            meta.append(_target_fingerprint(target.reshape(-1).to(torch.int64)))
        table = _gather(meta, logits_shard.device, group, world)
        names = ["number of rows (target.numel())", "label_smoothing", "z_loss", "softcap", "reduction",
                 "ignore_index", "class_weight (given or not)", "class_weight length", "weight (given or not)",
                 "logits_shard dtype"] + (["target"] if validate else [])
        _check_agreement(table[:, 1:], names)
        gathered = [int(s) for s in table[:, 0]]
        if shard_sizes is not None and gathered != [int(s) for s in shard_sizes]:
            raise ValueError(f"shard_sizes {[int(s) for s in shard_sizes]} disagree with the ranks' logits_shard "
                             f"class counts {gathered} (last axis of each rank's logits_shard)")
        sizes = gathered
    elif shard_sizes is None:
        sizes = [v_local]
    classes = int(sum(sizes))
    start = int(sum(sizes[:rank]))
    if has_cw:
        if not isinstance(class_weight, Tensor):
            raise TypeError(f"class_weight must be a tensor of the whole vocabulary's {classes} weights")
        if tuple(class_weight.shape) != (classes,):
            raise ValueError(f"class_weight must have shape ({classes},) (the whole vocabulary, on every rank: the "
                             f"shards hold {sizes} classes); got {tuple(class_weight.shape)}")
    if validate and target.numel():
        y = target.reshape(-1)
        bad = ((y < 0) | (y >= classes)) if ignore is None else ((y != ignore) & ((y < 0) | (y >= classes)))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"target holds {int(y[k])} at flat position {k}: outside the vocabulary [0, {classes}) "
                             f"(the shards hold {sizes} classes) and not ignore_index={ignore}")
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    w_row = _row_weights(weight, target, acc)
    want_grad = logits_shard.requires_grad and torch.is_grad_enabled()
    opts = dict(group=group, world=world, v_local=v_local, start=start, classes=classes, label_smoothing=eps,
                z_loss=z_coef, softcap=cap, ignore_index=ignore, reduction=red, return_z_loss=return_z_loss,
                want_grad=want_grad, backend=backend)
    return _VocabParallelCE.apply(logits_shard, target, w_row, class_weight, opts)
