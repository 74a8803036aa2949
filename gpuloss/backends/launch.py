"""Launch code shared by the ``cuda`` and ``emulated`` backends (docs/design.md §2, docs/design.md §1).

One class, :class:`LaunchBackend`, turns a plan and its arrays into kernel
launches of ``kernels/*.cu``: grid sizing, argument packing (NumPy scalar
types only: ``np.int64`` for sizes, the compute dtype for floats), dtype
dispatch, scratch buffers and the device-side denominators. It is
parameterised by two things only:

* ``xp``: the array module, ``cupy`` (cuda) or ``numpy`` (emulated);
* ``loader``: a zero-argument callable returning a module whose
  ``get_function(name)`` gives kernels callable like ``cupy.RawKernel``:
  ``kernel(grid, block, args)``.

The flow of a reduced loss, with no host synchronisation anywhere (except the
one ``validate=True`` costs for class-index targets)::

    reduce_weights_<a>  -> partials        (only for mean / sum_by_nonzero_weights)
    reduce_denominator_f64 -> scal = {denominator, 1/denominator or 0}
    <loss kernel>       reads scal[1] to scale the gradient; writes L or partials
    reduce_sum_<a>      -> partials        (losses computed per row)
    reduce_finish_<a>   -> the 0-d result

Every block size and grid size below is a function of the shapes only, never
of the device or of timing, so a result depends on its inputs alone (docs/api.md §3.3).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .._plan import (ELEMENTWISE_KIND, CosinePlan, CrossEntropyPlan, DtypePlan, ElementwisePlan, ReducePlan,
                     WeightedReducePlan)
from .._validate import Reduction
from . import host

_SUFFIX = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}

# Grid-strided kernels: at least this many elements per thread before another
# block is added (16: a block amortises its final reduction over 4096
# elements; on the emulator each extra block costs ~30 ms of thread
# hand-overs), at most this many blocks (1024 x 256 threads fill an H100's
# 132 SMs at full occupancy; more blocks would only add partials).
ITEMS_PER_THREAD = 16
MAX_THREADS = 256
MAX_BLOCKS = 1024
# Cross entropy: rows of at most this many classes go to the rows-per-warp
# kernel (a lane then holds up to 32 of them), longer rows get a block each.
WARP_MAX_CLASSES = 1024
# With the class axis not last, rows of at most this many classes get one
# thread each (coalesced loads across measurements; a thread then sums no more
# classes than a lane of the warp kernel does), longer ones the kernels above.
SOLO_MAX_CLASSES = 32
# At most 512 threads a row: the 16/32-bit row kernel takes ~40 registers at
# sm_90, so three 512-thread blocks share an SM (75% occupancy) where a
# 1024-thread block fits once (50%). float64 rows (~94 registers) stay at 512
# too: 1024 x 94 would exceed an SM's 64K registers and the launch would fail.
ROW_BLOCK_MIN, ROW_BLOCK_MAX, ROW_BLOCK_MAX_F64 = 128, 512, 512
MAX_ROW_BLOCKS = 65535


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def grid_1d(n: int, items_per_thread: int = ITEMS_PER_THREAD) -> tuple[int, int]:
    """(blocks, threads) for a grid-strided pass over n items: a whole number of
    warps, small launches for small n (the emulator runs one OS thread per CUDA
    thread), at most MAX_BLOCKS x MAX_THREADS."""
    threads = min(MAX_THREADS, max(32, _round_up(-(-n // items_per_thread), 32)))
    blocks = min(MAX_BLOCKS, max(1, -(-n // (threads * items_per_thread))))
    return blocks, threads


def one_block(n: int) -> int:
    """Threads of the single-block passes over n partials."""
    return min(MAX_THREADS, max(32, _round_up(n, 32)))


def xent_launch(rows: int, classes: int, inner: int, acc_itemsize: int = 4) -> tuple[str, int, int, int]:
    """(variant, blocks, threads, group) of the cross-entropy kernel for this shape.

    ``strided``: class axis not last and at most SOLO_MAX_CLASSES classes, one
    thread per measurement. ``warp``: ``group`` lanes per row (a power of two:
    ~8 classes per lane, at most 32). ``block``: one row per block of a
    power-of-two number of threads (~64 classes per thread: enough independent
    loads in flight to cover latency). The split of a row over threads depends
    on C only, not on where the class axis is, so every layout sums the same way
    (a class axis not last once summed 262144 classes in one float32 thread).
    """
    if inner != 1 and classes <= SOLO_MAX_CLASSES:
        blocks, threads = grid_1d(rows, 1)
        return "strided", blocks, threads, 1
    if classes <= WARP_MAX_CLASSES:
        group = min(32, _next_pow2(-(-classes // 8)))
        return ("warp", *_rows_per_warp_grid(rows, group), group)
    cap = ROW_BLOCK_MAX_F64 if acc_itemsize == 8 else ROW_BLOCK_MAX
    threads = min(cap, max(ROW_BLOCK_MIN, _next_pow2(-(-classes // 64))))
    return "block", min(MAX_ROW_BLOCKS, max(1, rows)), threads, 0


def _rows_per_warp_grid(rows: int, group: int) -> tuple[int, int]:
    """(blocks, threads) giving every row `group` lanes of some warp (grid-strided past 65535 blocks)."""
    warps = max(1, -(-rows // (32 // group)))
    threads = min(MAX_THREADS, 32 * warps)
    return min(MAX_ROW_BLOCKS, max(1, -(-warps // (threads // 32)))), threads


def cosine_launch(rows: int, length: int, inner: int) -> tuple[int, int, int]:
    """(blocks, threads, group) of cosine_fwd_bwd: with the axis last, a group of lanes
    per row (~8 elements a lane, at most 32 lanes); else one thread per measurement."""
    group = 1 if inner != 1 else min(32, _next_pow2(-(-length // 8)))
    return (*_rows_per_warp_grid(rows, group), group)


def dtype_suffix(dtype) -> str:
    dtype = np.dtype(dtype)
    try:
        return _SUFFIX[dtype.name]
    except KeyError:
        raise TypeError(f"no kernels for dtype {dtype}; expected one of {tuple(_SUFFIX)}") from None


class LaunchBackend:
    """The backend interface of ``cpu.CpuBackend``, running ``kernels/*.cu``.

    Parameters
    ----------
    name : str
        ``"cuda"`` or ``"emulated"``.
    xp : module
        ``cupy`` or ``numpy``: where arrays are allocated.
    loader : callable
        Returns the kernel module (called once, on first use, so that importing
        a backend never compiles anything).
    """

    def __init__(self, name: str, xp, loader: Callable[[], object]):
        self.name = name
        self.xp = xp
        self._loader = loader
        self._module = None
        self._kernels: dict[str, object] = {}
        self._dummies: dict[str, object] = {}
        self._limits: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<LaunchBackend {self.name} ({self.xp.__name__})>"

    # -- plumbing ---------------------------------------------------------------------------
    def kernel(self, name: str):
        k = self._kernels.get(name)
        if k is None:
            if self._module is None:
                self._module = self._loader()
            k = self._kernels[name] = self._module.get_function(name)
        return k

    def _launch(self, name: str, blocks: int, threads: int, args: tuple) -> None:
        k = self.kernel(name)
        # Safety net: a compiler that gave a kernel more registers than the block sizes
        # above allow would make the launch fail; CuPy reports the kernel's limit. Every
        # kernel is grid-strided and takes any whole number of warps, so fewer threads
        # stay correct (and the result a function of the shape and the build only).
        limit = self._limits.get(name)
        if limit is None:
            limit = self._limits[name] = getattr(k, "max_threads_per_block", 1024)
        if isinstance(limit, int) and 32 <= limit < threads:
            threads = limit // 32 * 32
        k((int(blocks),), (int(threads),), args)

    def _dummy(self, dtype):
        """A one-element array standing in for a pointer the kernel is told not to touch."""
        dtype = np.dtype(dtype)
        d = self._dummies.get(dtype.str + dtype.name)
        if d is None:
            d = self._dummies[dtype.str + dtype.name] = self.xp.zeros(1, dtype)
        return d

    def _contiguous(self, a, dtype=None):
        a = self.xp.ascontiguousarray(a)
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = a.astype(dtype)
        return a

    def _second_operand(self, target, dt: DtypePlan):
        """(array, kernel suffix) for a target read next to an input of dtype dt.input:
        kept as it is when the dtypes agree, else cast to the compute dtype (as the
        cpu backend does), which for 16-bit inputs selects the ``<t>_f32`` entry."""
        sfx = dtype_suffix(dt.input)
        if target.dtype == dt.input:
            return self._contiguous(target), sfx
        t = self._contiguous(target, dt.compute)
        return t, (sfx + "_f32" if dt.compute != dt.input else sfx)

    # -- denominators and reductions --------------------------------------------------------
    def _scal(self, reduce: ReducePlan, w_values, *, y=None, class_weight=None, ignore_index: int | None = None,
              classes: int = 0):
        """Device array {denominator, 1/denominator (0 for 0)} of docs/api.md §2.3, float64[2],
        by host.denominator_rule (the one table of divisors).

        With ``y`` (class-index cross entropy) the weights are weight[n] * cw[y[n]],
        0 where ignored; otherwise the (values, block) layout's values.
        """
        xp = self.xp
        scal = xp.empty(2, np.float64)
        mode, number = host.denominator_rule(reduce, None if y is not None else w_values.size)
        partials, nparts = self._dummy(np.float64), 0
        if mode != host.DENOM_CONSTANT:
            acc = w_values.dtype
            if y is not None:
                n, w_block, use_targets = y.size, reduce.weight_block, 2 if class_weight is not None else 1
            else:
                n, w_block, use_targets = w_values.size, 1, 0
            blocks, threads = grid_1d(n)
            partials, nparts = xp.empty(2 * blocks, np.float64), blocks
            self._launch(f"reduce_weights_{dtype_suffix(acc)}", blocks, threads, (
                w_values, np.int64(w_values.size), np.int64(w_block),
                y if y is not None else self._dummy(np.int64),
                class_weight if class_weight is not None else self._dummy(acc),
                np.int64(classes), np.int32(ignore_index is not None),
                np.int64(0 if ignore_index is None else ignore_index), np.int32(use_targets), np.int64(n), partials))
        constant, mult = (number, 1.0) if mode == host.DENOM_CONSTANT else (1.0, number)
        self._launch("reduce_denominator_f64", 1, one_block(nparts), (
            partials, np.int64(nparts), np.int32(mode), np.float64(constant), np.float64(mult), scal))
        return scal

    def _finish(self, partials, nparts: int, scal, dt: DtypePlan):
        out = self.xp.empty(1, dt.compute)
        self._launch(f"reduce_finish_{dtype_suffix(dt.compute)}", 1, one_block(nparts),
                     (partials, np.int64(nparts), scal, out))
        return out.reshape(())

    def _finish_rows(self, reduce: ReducePlan, loss_rows, scal, dt: DtypePlan):
        """Per-row weighted losses -> the result: reshaped for "none", else a
        deterministic two-pass float64 sum times 1/denominator."""
        if reduce.reduction == Reduction.NONE:
            return loss_rows.reshape(reduce.loss_shape)
        blocks, threads = grid_1d(loss_rows.size)
        partials = self.xp.empty(blocks, np.float64)
        self._launch(f"reduce_sum_{dtype_suffix(dt.compute)}", blocks, threads,
                     (loss_rows, np.int64(loss_rows.size), partials))
        return self._finish(partials, blocks, scal, dt)

    def _weights(self, w_values, dt: DtypePlan):
        return self._contiguous(w_values.reshape(-1), dt.compute)

    # -- the backend interface --------------------------------------------------------------
    def cross_entropy(self, plan: CrossEntropyPlan, logits, target, w_values, class_weight):
        xp = self.xp
        dt = plan.dtypes
        rows, classes = plan.rows, plan.classes
        x = self._contiguous(logits)
        w = self._weights(w_values, dt)
        cw = None if class_weight is None else self._contiguous(class_weight, dt.compute)
        if plan.index_target:
            y = host.class_indices(target)
            t, sfx = self._dummy(dt.input), dtype_suffix(dt.input)
            scal = self._scal(plan.reduce, w, y=y, class_weight=cw, ignore_index=plan.ignore_index,
                              classes=classes)
        else:
            y = self._dummy(np.int64)
            t, sfx = self._second_operand(target, dt)
            scal = self._scal(plan.reduce, w)
        loss_rows = xp.empty(rows, dt.compute)
        z_rows = xp.empty(rows, dt.compute) if plan.return_z_loss else self._dummy(dt.compute)
        grad = xp.empty(logits.shape, dt.input) if plan.return_grad else self._dummy(dt.input)
        self._launch_xent(plan, sfx, x, y, t, w, cw, scal, loss_rows, z_rows, grad)
        loss = self._finish_rows(plan.reduce, loss_rows, scal, dt)
        z_term = self._finish_rows(plan.reduce, z_rows, scal, dt) if plan.return_z_loss else None
        return loss, z_term, (grad if plan.return_grad else None)

    def _launch_xent(self, plan: CrossEntropyPlan, sfx: str, x, y, t, w, cw, scal, loss_rows, z_rows, grad):
        """The one packing of kernels/xent.cu's XENT_PARAMS, launched as the variant for the plan's
        shape (bench/gpu_suite.py reuses it for bfloat16 held in uint16 storage)."""
        A = plan.dtypes.compute.type
        has_ignore = plan.ignore_index is not None
        args = (x, np.int64(plan.rows), np.int64(plan.classes), np.int64(plan.inner), y, t,
                np.int32(plan.index_target), w, np.int64(w.size), np.int64(plan.reduce.weight_block),
                cw if cw is not None else self._dummy(plan.dtypes.compute), np.int32(cw is not None),
                np.int32(has_ignore), np.int64(plan.ignore_index if has_ignore else 0), A(plan.label_smoothing),
                A(plan.z_loss), A(plan.softcap), scal, loss_rows, z_rows, np.int32(plan.return_z_loss), grad,
                np.int32(plan.return_grad))
        variant, blocks, threads, group = xent_launch(plan.rows, plan.classes, plan.inner,
                                                      plan.dtypes.compute.itemsize)
        if variant == "warp":
            self._launch(f"xent_warp_fwd_bwd_{sfx}", blocks, threads, args + (np.int32(group),))
        elif variant == "block":
            self._launch(f"xent_fwd_bwd_{sfx}", blocks, threads, args)
        else:
            self._launch(f"xent_strided_fwd_bwd_{sfx}", blocks, threads, args)

    def elementwise(self, plan: ElementwisePlan, pred, target, w_values, pos_weight):
        dt = plan.dtypes
        x = self._contiguous(pred).reshape(-1)
        t, sfx = self._second_operand(target, dt)
        pw = self._dummy(dt.compute) if pos_weight is None else self._contiguous(pos_weight.reshape(-1), dt.compute)
        return self._run_elementwise(plan.loss, plan.reduce, dt, x, t.reshape(-1), sfx, w_values, pw,
                                     plan.pos_weight_period, plan.param, plan.return_grad, pred.shape)

    def weighted_reduce(self, plan: WeightedReducePlan, values, w_values):
        dt = plan.dtypes
        x = self._contiguous(values).reshape(-1)
        loss, _ = self._run_elementwise("identity", plan.reduce, dt, x, x, dtype_suffix(dt.input), w_values,
                                        self._dummy(dt.compute), 0, 0.0, False, values.shape)
        return loss

    def _run_elementwise(self, kind, reduce, dt, x, t, sfx, w_values, pw, pw_period, param, return_grad, shape):
        xp = self.xp
        n = x.size
        w = self._weights(w_values, dt)
        scal = self._scal(reduce, w)
        want_loss = reduce.reduction == Reduction.NONE
        loss_out = xp.empty(n, dt.compute) if want_loss else self._dummy(dt.compute)
        grad = xp.empty(n, dt.input) if return_grad else self._dummy(dt.input)
        blocks, threads = grid_1d(n)
        partials = self._dummy(np.float64) if want_loss else xp.empty(blocks, np.float64)
        self._launch(f"elementwise_fwd_bwd_{sfx}", blocks, threads, (
            x, t, np.int64(n), np.int32(ELEMENTWISE_KIND[kind]), dt.compute.type(param), w, np.int64(w.size),
            np.int64(reduce.weight_block), pw, np.int64(pw_period), scal, loss_out, np.int32(want_loss), grad,
            np.int32(return_grad), partials, np.int32(not want_loss)))
        loss = loss_out.reshape(reduce.loss_shape) if want_loss else self._finish(partials, blocks, scal, dt)
        return loss, (grad.reshape(shape) if return_grad else None)

    def cosine_distance(self, plan: CosinePlan, pred, target, w_values):
        xp = self.xp
        dt = plan.dtypes
        p = self._contiguous(pred)
        t, sfx = self._second_operand(target, dt)
        w = self._weights(w_values, dt)
        scal = self._scal(plan.reduce, w)
        rows = plan.rows
        loss_rows = xp.empty(rows, dt.compute)
        grad = xp.empty(pred.shape, dt.input) if plan.return_grad else self._dummy(dt.input)
        blocks, threads, group = cosine_launch(rows, plan.length, plan.inner)
        self._launch(f"cosine_fwd_bwd_{sfx}", blocks, threads, (
            p, t, np.int64(rows), np.int64(plan.length), np.int64(plan.inner), w, np.int64(w.size),
            np.int64(plan.reduce.weight_block), scal, loss_rows, grad, np.int32(plan.return_grad),
            np.int32(group)))
        loss = self._finish_rows(plan.reduce, loss_rows, scal, dt)
        return loss, (grad if plan.return_grad else None)
