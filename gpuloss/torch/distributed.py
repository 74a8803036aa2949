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
from ..linear import _rows_per_chunk
from . import _ops
from ._convert import on_torch_stream, to_array, to_tensor

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "shard_bounds"]

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


def _check_agreement(table: np.ndarray, names: Sequence[str], fn: str = "vocab_parallel_cross_entropy") -> None:
    for k, name in enumerate(names):
        col = table[:, k]
        same = (col == col[0]) | (np.isnan(col) & np.isnan(col[0]))
        if not same.all():
            other = int(np.argmin(same))
            raise ValueError(f"{fn}: {name} differs across ranks (rank 0: {col[0]:g}, "
                             f"rank {other}: {col[other]:g}); every rank must pass the same value")


def _target_fingerprint(y: Tensor) -> float:
    """A number equal on ranks that hold the same targets (and almost surely different otherwise).

    Each element is mixed with its position and squared twice modulo a prime before the sum: a hash
    linear in the values (as this was) misses every change whose position-weighted sum is 0, e.g. the
    targets [9, 5, 1, 2] against [0, 6, 2, 3], one pair in 15 of a test's random draws."""
    if y.numel() == 0:
        return 0.0
    p = 2_147_483_647
    pos = torch.arange(1, y.numel() + 1, device=y.device, dtype=torch.int64)
    a = ((y % p) * 1_000_003 + pos * 7_919 + 12_345) % p   # every product below stays under 2**63
    a = (a * a) % p
    a = (a * 48_271 + pos) % p
    a = (a * a) % p
    return float(a.sum().item())   # exact in float64 up to 2**22 elements


_FINGERPRINT_SAMPLE = 1 << 16


def _bits_fingerprint(t: Tensor) -> float:
    """A number equal on ranks that hold the same floats, from the bits of at most 65536 evenly spaced
    elements (integer arithmetic: no dependence on the summation order or thread count)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    if flat.numel() > _FINGERPRINT_SAMPLE:
        step = flat.numel() // _FINGERPRINT_SAMPLE
        flat = flat[::step][:_FINGERPRINT_SAMPLE]
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return _target_fingerprint(flat.contiguous().view(ints).to(torch.int64) % 65_521)   # no int64 overflow below


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
        if ctx.per_row:
            g = grad_loss.to(grad.dtype)
            out = grad * g.reshape(g.shape + (1,))
        else:
            out = _ops._scale_grad(grad, grad_loss, False, False)  # no pass over the shard when g is 1
        return out, None, None, None, None


def _reduction_terms(target_shape, y: Tensor, w_row: Tensor, cw: Optional[Tensor], o: dict, device):
    """The reduction's denominator from targets and weights alone (identical on every rank, no
    communication), its inverse, and the finish kernel's two scalars: the gradient scale (host float on
    the CPU, ``{denominator, scale}`` device array on a GPU) and sum(cw)."""
    red, ignore, classes = o["reduction"], o["ignore_index"], o["classes"]
    mode, number = host.denominator_rule(ReducePlan(v.Reduction(red), tuple(target_shape), 1), None)
    if mode == host.DENOM_CONSTANT:
        denom = torch.tensor(number, dtype=torch.float64, device=device)
    else:
        valid = torch.ones_like(y, dtype=torch.bool) if ignore is None else y != ignore
        w_meas = w_row.to(torch.float64) * valid
        if cw is not None:
            in_range = (y >= 0) & (y < classes)
            w_meas = w_meas * torch.where(in_range, cw.to(torch.float64)[torch.where(in_range, y, 0)], 1.0)
        denom = (w_meas.sum() if mode == host.DENOM_WEIGHT_SUM else (w_meas != 0).sum().to(torch.float64)) * number
    inv = torch.where(denom == 0, torch.zeros_like(denom), 1.0 / torch.where(denom == 0, torch.ones_like(denom), denom))
    scale = torch.ones((), dtype=torch.float64, device=device) if red == "none" else inv
    cw_total = None if cw is None else cw.to(torch.float64).sum().reshape(1)
    if device.type == "cpu":  # the Numba twin takes host numbers (no device to wait for)
        return denom, inv, float(scale), None if cw_total is None else float(cw_total)
    return denom, inv, to_array(torch.stack([denom, scale]).contiguous()), to_array(cw_total)


def _reduce_rows(rows_t: Tensor, target_shape, red: str, denom: Tensor, inv: Tensor, acc) -> Tensor:
    if red == "none":
        return rows_t.reshape(target_shape)
    total = rows_t.to(torch.float64).sum()
    return torch.where(denom == 0, torch.zeros_like(total), total * inv).to(acc)


def _stats_reduced(stats_fn, xs: Tensor, y: Tensor, cw: Optional[Tensor], o: dict, acc):
    """Per-row statistics of the shard's rows ``xs`` [rows, V_r], reduced over the ranks: ``(m [rows],
    packed [rows, width])``.  The two collectives of a call (MAX of m, then SUM of packed)."""
    v_local, start = o["v_local"], o["start"]
    with on_torch_stream(xs):
        m_arr, packed_arr = stats_fn(to_array(xs), to_array(y), to_array(cw), start, ignore_index=o["ignore_index"],
                                     label_smoothing=o["label_smoothing"], softcap=o["softcap"])
    m = to_tensor(m_arr, xs.device)
    packed = to_tensor(packed_arr, xs.device)
    if o["world"] > 1:
        group = o["group"]
        m_local = m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        same = m_local == m
        packed[:, REST] *= torch.where(same, torch.ones_like(m), torch.exp(m_local - m))
        if packed.shape[1] > GAP:
            cw_shard = (torch.tensor(float(v_local), dtype=acc, device=xs.device) if cw is None
                        else cw[start:start + v_local].sum())
            packed[:, GAP] += torch.where(same, torch.zeros_like(m), cw_shard * (m - m_local))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return m, packed


def _finish_rows(finish_fn, xs: Tensor, y: Tensor, w_acc: Tensor, cw: Optional[Tensor], m: Tensor, packed: Tensor,
                 o: dict, scal_arg, cw_total_arg, want_grad: bool, want_z: bool):
    """(loss rows, z rows or None, gradient of the shard's logits or None) from the reduced statistics."""
    with on_torch_stream(xs):
        loss_arr, z_arr, grad_arr = finish_fn(
            to_array(xs), to_array(y), to_array(w_acc), to_array(cw), o["start"], o["classes"], to_array(m),
            to_array(packed), ignore_index=o["ignore_index"], label_smoothing=o["label_smoothing"],
            z_loss=o["z_loss"], softcap=o["softcap"], grad_scale=scal_arg, want_grad=want_grad, want_z=want_z,
            cw_total=cw_total_arg)
    return (to_tensor(loss_arr, xs.device), to_tensor(z_arr, xs.device) if want_z else None,
            to_tensor(grad_arr, xs.device) if want_grad else None)


def _forward(x: Tensor, target: Tensor, w_row: Tensor, class_weight: Optional[Tensor], o: dict):
    stats_fn, finish_fn = _kernels(x.device, o["backend"])
    rows = target.numel()
    xs = x.detach().reshape(rows, o["v_local"])
    if not xs.is_contiguous():
        xs = xs.contiguous()
    y = target.reshape(-1).to(torch.int64).contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cw = None if class_weight is None else class_weight.detach().to(acc).contiguous()
    m, packed = _stats_reduced(stats_fn, xs, y, cw, o, acc)
    denom, inv, scal_arg, cw_total_arg = _reduction_terms(target.shape, y, w_row, cw, o, x.device)
    want_grad, want_z = o["want_grad"], o["return_z_loss"]
    loss_rows, z_rows, grad = _finish_rows(finish_fn, xs, y, w_row.to(acc).contiguous(), cw, m, packed, o, scal_arg,
                                           cw_total_arg, want_grad, want_z)
    red = o["reduction"]
    return (_reduce_rows(loss_rows, target.shape, red, denom, inv, acc),
            _reduce_rows(z_rows, target.shape, red, denom, inv, acc) if want_z else None,
            grad.reshape(x.shape) if want_grad else None)


def _check_options(target: Tensor, ignore_index, label_smoothing, z_loss, softcap, reduction, flags: dict):
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices (probability targets are not supported "
                        f"vocabulary-parallel); got {target.dtype}")
    ignore = v.check_ignore_index(ignore_index)
    eps = v.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_coef = v.check_real("z_loss", z_loss, low=0.0)
    cap = 0.0 if softcap is None else v.check_real("softcap", softcap, low=0.0, low_open=True)
    red = v.check_reduction(reduction).value
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    return ignore, eps, z_coef, cap, red


def _agree(fn: str, shard_name: str, axis: str, v_local: int, target: Tensor, dtype, device, *, group, weight,
           class_weight, ignore, eps, z_coef, cap, red, shard_sizes, validate, extra=()):
    """``(world, rank, sizes, classes, start)``: every rank's shard size, through one all_gather that
    also checks that the ranks agree on the options, the targets and the ``extra`` (name, value) pairs.
    Every check that needs the other ranks comes after that collective, on every rank at once (a rank
    that raised alone would leave the others waiting); then the class weights and the target range."""
    world, rank = _world(group)
    if shard_sizes is not None:
        sizes = list(shard_sizes)
        if len(sizes) != world or not all(isinstance(s, numbers.Integral) and s >= 1 for s in sizes):
            raise ValueError(f"shard_sizes must list the class count of each of the {world} ranks (ints >= 1); "
                             f"got {shard_sizes!r}")
        if not (world > 1 and validate) and int(sizes[rank]) != v_local:
            raise ValueError(f"shard_sizes[{rank}] = {sizes[rank]} but this rank's {shard_name} holds {v_local} "
                             f"classes ({axis})")
    has_cw = class_weight is not None
    if world > 1 and (shard_sizes is None or validate):
        meta = [v_local, target.numel(), eps, z_coef, cap, _REDUCTION_IDS[red],
                math.nan if ignore is None else float(ignore), float(has_cw),
                -1.0 if not has_cw else float(class_weight.numel()), float(weight is not None),
                float(_DTYPES.index(dtype))] + [float(value) for _, value in extra]
        if validate:
            meta.append(_target_fingerprint(target.reshape(-1).to(torch.int64)))
        table = _gather(meta, device, group, world)
        names = ["number of rows (target.numel())", "label_smoothing", "z_loss", "softcap", "reduction",
                 "ignore_index", "class_weight (given or not)", "class_weight length", "weight (given or not)",
                 f"{shard_name} dtype"] + [name for name, _ in extra] + (["target"] if validate else [])
        _check_agreement(table[:, 1:], names, fn)
        gathered = [int(s) for s in table[:, 0]]
        if shard_sizes is not None and gathered != [int(s) for s in shard_sizes]:
            raise ValueError(f"shard_sizes {[int(s) for s in shard_sizes]} disagree with the ranks' {shard_name} "
                             f"class counts {gathered} ({axis.split(' of ')[0]} of each rank's {shard_name})")
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
    return world, rank, sizes, classes, start


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
    ignore, eps, z_coef, cap, red = _check_options(target, ignore_index, label_smoothing, z_loss, softcap, reduction,
                                                   dict(return_z_loss=return_z_loss, validate=validate))
    if logits_shard.ndim == 0:
        raise ValueError("logits_shard must have a class axis (the last); got a 0-d tensor")
    if tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target must have the shape of logits_shard without its last (class) axis, "
                         f"{tuple(logits_shard.shape[:-1])}; got {tuple(target.shape)}")
    if target.device != logits_shard.device:
        raise ValueError(f"target is on {target.device}, logits_shard on {logits_shard.device}")
    v_local = int(logits_shard.shape[-1])
    if v_local == 0:
        raise ValueError("logits_shard must hold at least one class on its last axis")
    world, rank, sizes, classes, start = _agree(
        "vocab_parallel_cross_entropy", "logits_shard", f"last axis of shape {tuple(logits_shard.shape)}", v_local,
        target, logits_shard.dtype, logits_shard.device, group=group, weight=weight, class_weight=class_weight,
        ignore=ignore, eps=eps, z_coef=z_coef, cap=cap, red=red, shard_sizes=shard_sizes, validate=validate)
    acc = torch.float64 if logits_shard.dtype == torch.float64 else torch.float32
    w_row = _row_weights(weight, target, acc)
    want_grad = logits_shard.requires_grad and torch.is_grad_enabled()
    opts = dict(group=group, world=world, v_local=v_local, start=start, classes=classes, label_smoothing=eps,
                z_loss=z_coef, softcap=cap, ignore_index=ignore, reduction=red, return_z_loss=return_z_loss,
                want_grad=want_grad, backend=backend)
    return _VocabParallelCE.apply(logits_shard, target, w_row, class_weight, opts)


# ------------------------------------------------------------------------------------------------
# The fused linear head, sharded by vocabulary


class _VocabParallelLinearCE(torch.autograd.Function):
    """Forward runs the chunks (stats, collectives, finish, the three gradient products) and keeps the
    gradients; backward scales them, or for ``reduction="none"`` with a ``grad_output`` other than all
    ones recomputes the weight and bias gradients from the kept statistics (no collective)."""

    @staticmethod
    def forward(ctx, input, weight_shard, bias_shard, target, w_row, class_weight, opts):
        loss, z_term, grads, kept = _linear_forward(input, weight_shard, bias_shard, target, w_row, class_weight,
                                                    opts)
        ctx.opts, ctx.kept_scalars = opts, kept[2]
        ctx.has_grad = grads is not None
        d_x, d_w, d_b = grads if grads is not None else (None, None, None)
        ctx.save_for_backward(d_x, d_w, d_b, input, weight_shard, bias_shard, target, w_row, class_weight,
                              kept[0], kept[1])
        if z_term is not None:
            ctx.mark_non_differentiable(z_term)
            return loss, z_term
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        d_x, d_w, d_b, x, W, b, target, w_row, cw, m, packed = ctx.saved_tensors
        if not ctx.has_grad:
            raise RuntimeError("vocab_parallel_linear_cross_entropy: the gradients were not computed in the forward "
                               "pass (grad mode was off, or neither input, linear_weight_shard nor "
                               "linear_bias_shard required grad)")
        o = ctx.opts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if o["reduction"] == "none" and not bool((grad_loss == 1).all()):
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            g = grad_loss.reshape(-1).to(acc)
            # d loss_n / d input scales per row; d loss_n / d W does not: rerun the chunks' finish with
            # grad_output as per-row weights, from the statistics kept in forward (no collective).
            if need_w or need_b:
                d_w, d_b = _linear_weight_grads(x, W, b, target, w_row * grad_loss.reshape(-1).to(w_row.dtype), cw,
                                                m, packed, o, ctx.kept_scalars, need_w, need_b)
            out_x = None
            if need_x and d_x is not None:
                out_x = (d_x.reshape(-1, d_x.shape[-1]).to(acc) * g.reshape(-1, 1)).reshape(d_x.shape)
                out_x = out_x.to(x.dtype)
            return (out_x, d_w if need_w else None, d_b if need_b else None) + (None,) * 4
        g = grad_loss if grad_loss.ndim == 0 else torch.ones((), dtype=grad_loss.dtype, device=grad_loss.device)

        def scaled(t):
            return None if t is None else (_ops._scale_grad(t, g, False, False) if t.dtype.is_floating_point else t)

        return (scaled(d_x) if need_x else None, scaled(d_w) if need_w else None,
                scaled(d_b) if need_b else None) + (None,) * 4


def _linear_setup(x: Tensor, W: Tensor, b: Optional[Tensor], o: dict):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    H = x.shape[-1]
    x2 = x.detach().reshape(-1, H)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    Wc = W.detach().to(acc).contiguous()   # 16-bit: one float32 copy of the shard, not one per chunk
    bc = None if b is None else b.detach().to(acc)
    return acc, x2, Wc, bc


def _chunk_logits(x2, Wc, bc, s, e, buf, acc):
    xc = x2[s:e].to(acc)
    lg = buf[:e - s]
    torch.matmul(xc, Wc.T, out=lg)
    if bc is not None:
        lg += bc
    return xc, lg


def _linear_forward(x: Tensor, W: Tensor, b: Optional[Tensor], target: Tensor, w_row: Tensor,
                    class_weight: Optional[Tensor], o: dict):
    stats_fn, finish_fn = _kernels(x.device, o["backend"])
    acc, x2, Wc, bc = _linear_setup(x, W, b, o)
    N, H = x2.shape
    v_local, dev = o["v_local"], x.device
    y = target.reshape(-1).to(torch.int64).contiguous()
    cw = None if class_weight is None else class_weight.detach().to(acc).contiguous()
    w_acc = w_row.to(acc).contiguous()
    denom, inv, scal_arg, cw_total_arg = _reduction_terms(target.shape, y, w_row, cw, o, dev)
    want_x, want_w, want_b, want_z = o["want_input_grad"], o["want_weight_grad"], o["want_bias_grad"], \
        o["return_z_loss"]
    want_grad = want_x or want_w or want_b
    loss_rows = torch.empty(N, dtype=acc, device=dev)
    z_rows = torch.empty(N, dtype=acc, device=dev) if want_z else None
    m_all = torch.empty(N, dtype=acc, device=dev)
    packed_all = torch.empty((N, 3 if o["label_smoothing"] else 2), dtype=acc, device=dev)
    d_x = torch.empty((N, H), dtype=acc, device=dev) if want_x else None
    d_w = torch.zeros((v_local, H), dtype=acc, device=dev) if want_w else None
    d_b = torch.zeros(v_local, dtype=acc, device=dev) if want_b else None
    rows = max(1, min(o["chunk_rows"], N))
    buf = torch.empty((rows, v_local), dtype=acc, device=dev)   # one chunk's logits, reused
    pending = []
    for s in range(0, N, rows):
        e = min(s + rows, N)
        xc, lg = _chunk_logits(x2, Wc, bc, s, e, buf, acc)
        m, packed = _stats_reduced(stats_fn, lg, y[s:e], cw, o, acc)
        m_all[s:e], packed_all[s:e] = m, packed
        loss_c, z_c, g = _finish_rows(finish_fn, lg, y[s:e], w_acc[s:e], cw, m, packed, o, scal_arg, cw_total_arg,
                                      want_grad, want_z)
        loss_rows[s:e] = loss_c
        if want_z:
            z_rows[s:e] = z_c
        if not want_grad:
            continue
        if want_x:
            # This rank's part of d input, sum_r dlogits_r @ W_r over the ranks: Megatron-LM's column-parallel
            # linear layer all-reduces its input's gradient the same way (Shoeybi et al. 2019, §3).  One
            # asynchronous all-reduce per chunk: it travels while the next chunk computes.
            torch.matmul(g, Wc, out=d_x[s:e])
            if o["world"] > 1:
                pending.append(dist.all_reduce(d_x[s:e], op=dist.ReduceOp.SUM, group=o["group"], async_op=True))
        if want_w:
            d_w.addmm_(g.T, xc)
        if want_b:
            d_b += g.sum(dim=0)
        del g
    for work in pending:
        work.wait()
    red = o["reduction"]
    loss = _reduce_rows(loss_rows, target.shape, red, denom, inv, acc)
    z_term = _reduce_rows(z_rows, target.shape, red, denom, inv, acc) if want_z else None
    grads = None
    if want_grad:
        grads = (None if d_x is None else d_x.reshape(x.shape).to(x.dtype),
                 None if d_w is None else d_w.to(W.dtype),
                 None if d_b is None else d_b.to(b.dtype))
    return loss, z_term, grads, (m_all, packed_all, (scal_arg, cw_total_arg))


def _linear_weight_grads(x, W, b, target, w_row, class_weight, m_all, packed_all, o, scalars, need_w, need_b):
    """d W_r and d b_r of sum_n w_n loss_n (reduction "none"), chunk by chunk from the kept statistics."""
    _, finish_fn = _kernels(x.device, o["backend"])
    acc, x2, Wc, bc = _linear_setup(x, W, b, o)
    N, H = x2.shape
    v_local, dev = o["v_local"], x.device
    y = target.reshape(-1).to(torch.int64).contiguous()
    cw = None if class_weight is None else class_weight.detach().to(acc).contiguous()
    w_acc = w_row.to(acc).contiguous()
    d_w = torch.zeros((v_local, H), dtype=acc, device=dev) if need_w else None
    d_b = torch.zeros(v_local, dtype=acc, device=dev) if need_b and b is not None else None
    rows = max(1, min(o["chunk_rows"], N))
    buf = torch.empty((rows, v_local), dtype=acc, device=dev)
    for s in range(0, N, rows):
        e = min(s + rows, N)
        xc, lg = _chunk_logits(x2, Wc, bc, s, e, buf, acc)
        _, _, g = _finish_rows(finish_fn, lg, y[s:e], w_acc[s:e], cw, m_all[s:e], packed_all[s:e], o, 1.0,
                               scalars[1], True, False)
        if d_w is not None:
            d_w.addmm_(g.T, xc)
        if d_b is not None:
            d_b += g.sum(dim=0)
    return (None if d_w is None else d_w.to(W.dtype)), (None if d_b is None else d_b.to(b.dtype))


def _chunk_rows_of(chunk_rows, chunk_bytes, v_max: int, hidden: int, dtype) -> int:
    """Rows per chunk, the same on every rank: the collectives of each chunk must pair up, so the budget
    is measured against the widest shard."""
    if chunk_rows is not None and chunk_bytes is not None:
        raise ValueError("pass chunk_rows or chunk_bytes, not both")
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an int >= 1 or None; got {chunk_rows!r}")
        return int(chunk_rows)
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(dtype, np.float16)
    return _rows_per_chunk(chunk_bytes, v_max, hidden, np_dtype)


def vocab_parallel_linear_cross_entropy(input: Tensor, linear_weight_shard: Tensor, target: Tensor, *,
                                        linear_bias_shard: Optional[Tensor] = None, group=None, weight=None,
                                        class_weight: Optional[Tensor] = None, ignore_index: Optional[int] = -100,
                                        label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                                        softcap: Optional[float] = None, return_z_loss: bool = False,
                                        chunk_rows: Optional[int] = None, chunk_bytes: Optional[int] = None,
                                        shard_sizes: Optional[Sequence[int]] = None, validate: bool = True,
                                        backend: Optional[str] = None):
    """The fused linear head with its vocabulary split over the ranks of ``group``:
    ``softmax_cross_entropy(input @ W.T + b, target)`` where rank r holds the rows
    ``[start_r, start_r + V_r)`` of ``W`` [V, H] (``linear_weight_shard`` [V_r, H], the ranks in
    order, contiguous) and of ``b`` (``linear_bias_shard`` [V_r]).

    ``input`` [..., H], ``target`` (class indices into the whole vocabulary, shape
    ``input.shape[:-1]``), ``weight`` (per row) and ``class_weight`` (the whole ``[V]`` vector) are
    the same on every rank.  Options, defaults and results are those of
    :func:`vocab_parallel_cross_entropy` (gpuloss's semantics: six reductions, ``ignore_index=-100``,
    an empty mean is 0).  Rows run in chunks (``chunk_rows``, or a ``chunk_bytes`` budget measured
    against the widest shard, :data:`gpuloss.linear.DEFAULT_CHUNK_BYTES` by default): per chunk
    ``logits = input_c @ W_r.T + b_r``, the per-row statistics, their two all-reduces, the loss rows
    and the gradient of the chunk's logits; the ``[N, V]`` logits are never whole on any rank.

    Backward: the gradients of ``linear_weight_shard`` and ``linear_bias_shard`` are this rank's
    alone; the gradient of ``input`` is the sum over the ranks of ``dlogits_r @ W_r``, all-reduced
    in the forward pass (one asynchronous all-reduce per chunk of ``4 H`` bytes per row in float32),
    so every rank gets the whole gradient of ``input`` and backward needs no collective.
    """
    for name, t in (("input", input), ("linear_weight_shard", linear_weight_shard), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if input.dtype not in _DTYPES:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16; got {input.dtype}")
    ignore, eps, z_coef, cap, red = _check_options(target, ignore_index, label_smoothing, z_loss, softcap, reduction,
                                                   dict(return_z_loss=return_z_loss, validate=validate))
    if input.ndim == 0:
        raise ValueError("input must have a feature axis: shape [..., H]; got a 0-d tensor")
    H = int(input.shape[-1])
    W, b = linear_weight_shard, linear_bias_shard
    if W.ndim != 2 or W.shape[1] != H:
        raise ValueError(f"linear_weight_shard must have shape (V_r, H) with H = input.shape[-1] = {H}; got "
                         f"{tuple(W.shape)}")
    v_local = int(W.shape[0])
    if v_local == 0:
        raise ValueError("linear_weight_shard must hold at least one class (row)")
    if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (v_local,)):
        raise ValueError(f"linear_bias_shard must be a tensor of shape ({v_local},) (V_r = "
                         f"linear_weight_shard.shape[0]); got {getattr(b, 'shape', type(b).__name__)}")
    for name, t in (("linear_weight_shard", W), ("linear_bias_shard", b)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} must have the dtype of input ({input.dtype}); got {t.dtype}")
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device}, input on {input.device}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have the shape of input without its last (feature) axis, "
                         f"{tuple(input.shape[:-1])}; got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device}, input on {input.device}")
    grad_on = torch.is_grad_enabled()
    want_x = grad_on and input.requires_grad
    want_w = grad_on and W.requires_grad
    want_b = grad_on and b is not None and b.requires_grad
    if chunk_rows is not None and chunk_bytes is not None:
        raise ValueError("pass chunk_rows or chunk_bytes, not both")
    extra = [("hidden size (input.shape[-1])", H), ("linear_bias_shard (given or not)", b is not None),
             ("input requires grad (with grad mode on)", want_x),
             ("chunk_rows", -1 if chunk_rows is None else chunk_rows),
             ("chunk_bytes", -1 if chunk_bytes is None else chunk_bytes)]
    if validate:
        extra.append(("input", _bits_fingerprint(input)))
    world, rank, sizes, classes, start = _agree(
        "vocab_parallel_linear_cross_entropy", "linear_weight_shard", f"first axis of shape {tuple(W.shape)}",
        v_local, target, input.dtype, input.device, group=group, weight=weight, class_weight=class_weight,
        ignore=ignore, eps=eps, z_coef=z_coef, cap=cap, red=red, shard_sizes=shard_sizes, validate=validate,
        extra=extra)
    rows = _chunk_rows_of(chunk_rows, chunk_bytes, max(sizes), H, input.dtype)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    w_row = _row_weights(weight, target, acc)
    opts = dict(group=group, world=world, v_local=v_local, start=start, classes=classes, label_smoothing=eps,
                z_loss=z_coef, softcap=cap, ignore_index=ignore, reduction=red, return_z_loss=return_z_loss,
                want_input_grad=want_x, want_weight_grad=want_w, want_bias_grad=want_b, chunk_rows=rows,
                backend=backend)
    return _VocabParallelLinearCE.apply(input, W, b, target, w_row, class_weight, opts)
