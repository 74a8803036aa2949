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

The launches of one loss call, with no host synchronisation anywhere (except
the one ``validate=True`` costs for class-index targets) and no CuPy helper
kernel in between (docs/design.md §4)::

    reduce_weights_<a>  -> scal = {denominator, 1/denominator or 0}
                           (only mean / sum_by_nonzero_weights; every other
                           divisor is a number of the shape, passed by value)
    <loss kernel>       reads the divisor to scale the gradient; writes the
                        per-row losses ("none"), or per-block partials whose
                        last block writes the 0-d result

Both reduce in one launch with the "last block done" finish
(gl::last_block_done in kernels/common.cuh): its ticket counters live in
a small buffer per (device, stream) that this class allocates once, zeroed
once by ``xp.zeros``, and that every launch leaves at 0.

Every block size and grid size below is a function of the shapes only, never
of the device or of timing, so a result depends on its inputs alone (docs/api.md §3.3).
"""
from __future__ import annotations

import threading
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
# At most 512 threads a row: the 16/32-bit row kernel is held to 64 registers
# (__launch_bounds__(512, 2) in xent.cu), so two 512-thread blocks share an SM.
# float64 rows (~94 registers) stay at 512 too: 1024 x 94 would exceed an SM's
# 64K registers and the launch would fail.
ROW_BLOCK_MIN, ROW_BLOCK_MAX, ROW_BLOCK_MAX_F64 = 128, 512, 512
MAX_ROW_BLOCKS = 65535
# Few rows, many classes: with fewer rows than SPLIT_MAX_ROWS (about two waves of
# blocks on a 132-SM H100/H200; a fixed number, so the split, and with it every
# result bit, depends on the shape only, never on the device) and rows of more
# than WARP_MAX_CLASSES classes, each row is cut into slices of at least
# SPLIT_MIN_SLICE classes (a multiple of SPLIT_ALIGN: every slice starts at the
# row's 16-byte alignment), one block each, up to SPLIT_MAX_ROWS blocks in all.
SPLIT_MAX_ROWS, SPLIT_MIN_SLICE, SPLIT_ALIGN = 264, 4096, 64
# One row per block: a contiguous row of at most this many bytes (plus up to 16
# for its alignment) is kept in dynamic shared memory between the passes, so
# the logits are read from DRAM once. 48 KiB is the most a launch may ask for
# without opting in per kernel (cudaFuncAttributeMaxDynamicSharedMemorySize).
ROW_CACHE_BYTES = 48 * 1024 - 16
# Ticket counters of the "last block done" finishes, per stream: one for the
# denominator launch, one for the loss launch.
TICKET_DENOM, TICKET_LOSS, TICKET_SLOTS = 0, 1, 2
# cudaStreamPerThread: one handle that means a different stream in each host thread.
_PER_THREAD_STREAM = 2


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


def xent_launch(rows: int, classes: int, inner: int, acc_itemsize: int = 4) -> tuple[str, int, int, int]:
    """(variant, blocks, threads, group) of the cross-entropy kernel for this shape.

    ``strided``: class axis not last and at most SOLO_MAX_CLASSES classes, one
    thread per measurement. ``warp``: ``group`` lanes per row (a power of two:
    ~8 classes per lane, at most 32). ``block``: one row per block of a
    power-of-two number of threads (~64 classes per thread: enough independent
    loads in flight to cover latency). The split of a row over threads depends
    on C only, not on where the class axis is, so every layout sums the same way
    (a class axis not last once summed 262144 classes in one float32 thread).
    ``split``: fewer than SPLIT_MAX_ROWS rows of more than WARP_MAX_CLASSES
    classes, each row over ``group`` blocks of ``threads`` (see xent_split).
    """
    if inner != 1 and classes <= SOLO_MAX_CLASSES:
        blocks, threads = grid_1d(rows, 1)
        return "strided", blocks, threads, 1
    if classes <= WARP_MAX_CLASSES:
        group = min(32, _next_pow2(-(-classes // 8)))
        return ("warp", *_rows_per_warp_grid(rows, group), group)
    cap = ROW_BLOCK_MAX_F64 if acc_itemsize == 8 else ROW_BLOCK_MAX
    splits, slice_len = xent_split(rows, classes)
    if splits > 1:
        threads = min(cap, max(ROW_BLOCK_MIN, _next_pow2(-(-slice_len // 64))))
        return "split", rows * splits, threads, splits
    threads = min(cap, max(ROW_BLOCK_MIN, _next_pow2(-(-classes // 64))))
    return "block", min(MAX_ROW_BLOCKS, max(1, rows)), threads, 0


def xent_split(rows: int, classes: int) -> tuple[int, int]:
    """(splits, slice): row n of the "split" variant is cut into `splits` slices of `slice`
    classes (the last one shorter), one block each; (1, classes) when the rows are not split."""
    if not 0 < rows < SPLIT_MAX_ROWS or classes <= WARP_MAX_CLASSES:
        return 1, classes
    splits = min(-(-SPLIT_MAX_ROWS // rows), -(-classes // SPLIT_MIN_SLICE))
    if splits < 2:
        return 1, classes
    slice_len = _round_up(-(-classes // splits), SPLIT_ALIGN)
    return -(-classes // slice_len), slice_len


def row_cache_bytes(classes: int, inner: int, itemsize: int) -> int:
    """Dynamic shared memory of the one-row-per-block kernel: the row and up to 16 bytes to
    keep its 16-byte alignment, for contiguous rows (inner == 1) that fit; else 0."""
    if inner != 1 or classes * itemsize > ROW_CACHE_BYTES:
        return 0
    return classes * itemsize + 16


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
        self._tickets: dict[tuple, object] = {}

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

    def _launch(self, name: str, blocks: int, threads: int, args: tuple, shared_mem: int = 0) -> None:
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
        if shared_mem:
            k((int(blocks),), (int(threads),), args, shared_mem=int(shared_mem))
        else:
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

    def _ticket(self, slot: int):
        """The one-element uint32 ticket counter ``slot`` of the current (device, stream).

        The counters of a stream are allocated and zeroed (``xp.zeros``) once, on the
        first call on that stream, and every kernel leaves its counter at 0 (the last
        block resets it), so no call launches a memset and a CUDA graph replays as
        captured. Launches on one stream run one after another, so they may share a
        counter; launches on two streams may run at once, so each stream has its own
        (a graph captured on a stream uses that stream's counters: replay it on the
        stream it was captured on, or ordered with the other calls made there). The
        emulator runs one launch at a time: one set serves every call.
        """
        cuda = getattr(self.xp, "cuda", None)
        if cuda is None:
            key: tuple = ()
        else:
            stream = cuda.get_current_stream().ptr
            key = (cuda.runtime.getDevice(), stream)
            if stream == _PER_THREAD_STREAM:
                key += (threading.get_ident(),)
        t = self._tickets.get(key)
        if t is None:
            t = self._tickets[key] = self.xp.zeros(TICKET_SLOTS, np.uint32)
        return t[slot:slot + 1]

    # -- denominators and the per-call workspace --------------------------------------------
    def _denominator(self, reduce: ReducePlan, w, *, per_measurement: bool, n: int):
        """(mode, number, blocks, threads) of the divisor by host.denominator_rule (the one table
        of divisors): blocks == 0 when it is a constant of the shape (no launch)."""
        mode, number = host.denominator_rule(reduce, None if per_measurement else w.size)
        if mode == host.DENOM_CONSTANT:
            return mode, number, 0, 0
        return (mode, number, *grid_1d(n))

    def _workspace(self, dt: DtypePlan, loss_blocks: int, denom_blocks: int):
        """One float64 allocation per call: ``out`` (the reduced {loss, z term} in the compute
        dtype), ``scal`` ({denominator, 1/denominator}), then the loss launch's and the
        denominator launch's partials (2 per block each). The 0-d results are views of it, so
        everything a captured CUDA graph writes stays alive as long as its results do."""
        xp = self.xp
        ws = xp.empty(4 + 2 * loss_blocks + 2 * denom_blocks, np.float64)
        out = ws[:2].view(dt.compute)
        scal = ws[2:4]
        part = ws[4:4 + 2 * loss_blocks] if loss_blocks else self._dummy(np.float64)
        dpart = ws[4 + 2 * loss_blocks:] if denom_blocks else self._dummy(np.float64)
        return out, scal, part, dpart

    def _launch_denominator(self, den, w, dpart, scal, *, y=None, y_bytes: int = 8, cw=None,
                            ignore_index: int | None = None, classes: int = 0, w_block: int = 1) -> tuple:
        """Launch reduce_weights when the divisor needs the weights; returns the loss kernel's
        divisor arguments ``(scal, constant, on_device)`` (gll::Denom).

        With ``y`` (class-index cross entropy) the weights are weight[n] * cw[y[n]], 0 where
        ignored; otherwise the (values, block) layout's values."""
        mode, number, blocks, threads = den
        if mode == host.DENOM_CONSTANT:
            return scal, np.float64(number), np.int32(0)
        acc = w.dtype
        if y is not None:
            n, use_targets = y.size, 2 if cw is not None else 1
        else:
            n, w_block, use_targets = w.size, 1, 0
        self._launch(f"reduce_weights_{dtype_suffix(acc)}", blocks, threads, (
            w, np.int64(w.size), np.int64(w_block), y if y is not None else self._dummy(np.int64), np.int32(y_bytes),
            cw if cw is not None else self._dummy(acc), np.int64(classes), np.int32(ignore_index is not None),
            np.int64(0 if ignore_index is None else ignore_index), np.int32(use_targets), np.int64(n),
            np.int32(mode), np.float64(number), dpart, self._ticket(TICKET_DENOM), scal))
        return scal, np.float64(0.0), np.int32(1)

    def _weights(self, w_values, dt: DtypePlan):
        return self._contiguous(w_values.reshape(-1), dt.compute)

    def _class_targets(self, target):
        """(array, bytes per element) of class-index targets as the kernels read them.

        int32 and int64 are read as they are stored (a reshape of a contiguous array
        launches nothing); any other integer dtype, or a non-contiguous view, is first
        converted to int64 by host.class_indices: an input conversion, on CuPy one
        kernel before the counted launches (docs/design.md §4)."""
        if target.flags.c_contiguous and np.dtype(target.dtype) in (np.dtype(np.int32), np.dtype(np.int64)):
            y = target.reshape(-1)
            return y, y.dtype.itemsize
        return host.class_indices(target), 8

    # -- the backend interface --------------------------------------------------------------
    def cross_entropy(self, plan: CrossEntropyPlan, logits, target, w_values, class_weight):
        dt = plan.dtypes
        x = self._contiguous(logits)
        w = self._weights(w_values, dt)
        cw = None if class_weight is None else self._contiguous(class_weight, dt.compute)
        if plan.index_target:
            y, y_bytes = self._class_targets(target)
            t, sfx = self._dummy(dt.input), dtype_suffix(dt.input)
        else:
            y, y_bytes = self._dummy(np.int64), 8
            t, sfx = self._second_operand(target, dt)
        loss, z_term, grad = self._xent(plan, sfx, x, y, y_bytes, t, w, cw)
        return loss, (z_term if plan.return_z_loss else None), (grad if plan.return_grad else None)

    def _xent(self, plan: CrossEntropyPlan, sfx: str, x, y, y_bytes: int, t, w, cw):
        """Cross entropy in at most two launches: reduce_weights (mean / sum_by_nonzero_weights
        only), then the kernels/xent.cu variant for the plan's shape, whose last block reduces.
        The one packing of XENT_PARAMS (bench/gpu_suite.py reuses it for bfloat16 held in
        uint16 storage). Returns (loss, z term, grad); the last two may be unused dummies."""
        dt = plan.dtypes
        reduce = plan.reduce
        reduced = reduce.reduction != Reduction.NONE
        rows = plan.rows
        variant, blocks, threads, group = xent_launch(rows, plan.classes, plan.inner, dt.compute.itemsize)
        if variant == "split":
            return self._xent_split(plan, sfx, x, y, y_bytes, t, w, cw, blocks, threads, group)
        den = self._denominator(reduce, w, per_measurement=plan.index_target, n=rows)
        out, scal, part, dpart = self._workspace(dt, blocks if reduced else 0, den[2])
        if plan.index_target:
            denom = self._launch_denominator(den, w, dpart, scal, y=y, y_bytes=y_bytes, cw=cw,
                                             ignore_index=plan.ignore_index, classes=plan.classes,
                                             w_block=reduce.weight_block)
        else:
            denom = self._launch_denominator(den, w, dpart, scal)
        cache = row_cache_bytes(plan.classes, plan.inner, x.dtype.itemsize) if variant == "block" else 0
        loss_rows, z_rows, grad, args = self._xent_args(plan, x, y, y_bytes, t, w, cw, denom, part, out, cache)
        if variant == "warp":
            self._launch(f"xent_warp_fwd_bwd_{sfx}", blocks, threads, args + (np.int32(group),))
        elif variant == "block" and cache:
            self._launch(f"xent_cached_fwd_bwd_{sfx}", blocks, threads, args, shared_mem=cache)
        elif variant == "block":
            self._launch(f"xent_fwd_bwd_{sfx}", blocks, threads, args)
        else:
            self._launch(f"xent_strided_fwd_bwd_{sfx}", blocks, threads, args)
        return self._xent_results(plan, out, loss_rows, z_rows, grad)

    def _xent_args(self, plan: CrossEntropyPlan, x, y, y_bytes: int, t, w, cw, denom: tuple, part, out,
                   cache: int = 0):
        """(loss_rows, z_rows, grad, XENT_PARAMS): the one packing of kernels/xent.cu's arguments;
        ``cache``: the bytes of dynamic shared memory the launch gives each row (0: none)."""
        xp = self.xp
        dt = plan.dtypes
        A = dt.compute.type
        rows = plan.rows
        reduced = plan.reduce.reduction != Reduction.NONE
        has_ignore = plan.ignore_index is not None
        dummy = self._dummy(dt.compute)
        loss_rows = dummy if reduced else xp.empty(rows, dt.compute)
        z_rows = xp.empty(rows, dt.compute) if plan.return_z_loss and not reduced else dummy
        grad = xp.empty(x.shape, x.dtype) if plan.return_grad else self._dummy(x.dtype)
        args = (x, np.int64(rows), np.int64(plan.classes), np.int64(plan.inner), y, np.int32(y_bytes), t,
                np.int32(plan.index_target), w, np.int64(w.size), np.int64(plan.reduce.weight_block),
                cw if cw is not None else dummy, np.int32(cw is not None),
                np.int32(has_ignore), np.int64(plan.ignore_index if has_ignore else 0), A(plan.label_smoothing),
                A(plan.z_loss), A(plan.softcap), *denom, loss_rows, z_rows, np.int32(plan.return_z_loss),
                np.int32(not reduced), grad, np.int32(plan.return_grad), np.int32(reduced), part,
                self._ticket(TICKET_LOSS), out, np.int32(cache > 0))
        return loss_rows, z_rows, grad, args

    def _xent_results(self, plan: CrossEntropyPlan, out, loss_rows, z_rows, grad):
        reduce = plan.reduce
        if reduce.reduction != Reduction.NONE:
            return out[0:1].reshape(()), (out[1:2].reshape(()) if plan.return_z_loss else None), grad
        z_term = z_rows.reshape(reduce.loss_shape) if plan.return_z_loss else None
        return loss_rows.reshape(reduce.loss_shape), z_term, grad

    def _xent_split(self, plan: CrossEntropyPlan, sfx: str, x, y, y_bytes: int, t, w, cw, blocks: int,
                    threads: int, splits: int):
        """Few rows, many classes (xent_split in kernels/xent.cu): xent_split_stats writes each
        slice's softmax state (and the divisor, when it depends on the weights: no reduce_weights
        launch), xent_split_fwd_bwd combines them, writes the gradient and reduces. Two launches."""
        dt = plan.dtypes
        mode, number = host.denominator_rule(plan.reduce, None if plan.index_target else w.size)
        _, slice_len = xent_split(plan.rows, plan.classes)
        # float64 workspace: out, scal, 2 partials per block, then 4 stats per block in the compute dtype
        ws = self.xp.empty(4 + 2 * blocks + 4 * blocks, np.float64)
        out, scal, part = ws[:2].view(dt.compute), ws[2:4], ws[4:4 + 2 * blocks]
        stats = ws[4 + 2 * blocks:].view(dt.compute)
        if mode == host.DENOM_CONSTANT:
            denom = (scal, np.float64(number), np.int32(0))
        else:
            denom = (scal, np.float64(0.0), np.int32(1))
        loss_rows, z_rows, grad, args = self._xent_args(plan, x, y, y_bytes, t, w, cw, denom, part, out)
        args += (np.int64(splits), np.int64(slice_len), stats, np.int32(mode), np.float64(number))
        self._launch(f"xent_split_stats_{sfx}", blocks, threads, args)
        self._launch(f"xent_split_fwd_bwd_{sfx}", blocks, threads, args)
        return self._xent_results(plan, out, loss_rows, z_rows, grad)

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
        """One launch (two for mean / sum_by_nonzero_weights: the divisor first)."""
        xp = self.xp
        n = x.size
        w = self._weights(w_values, dt)
        want_loss = reduce.reduction == Reduction.NONE
        blocks, threads = grid_1d(n)
        den = self._denominator(reduce, w, per_measurement=False, n=w.size)
        out, scal, part, dpart = self._workspace(dt, 0 if want_loss else blocks, den[2])
        denom = self._launch_denominator(den, w, dpart, scal)
        loss_out = xp.empty(n, dt.compute) if want_loss else self._dummy(dt.compute)
        grad = xp.empty(n, dt.input) if return_grad else self._dummy(dt.input)
        self._launch(f"elementwise_fwd_bwd_{sfx}", blocks, threads, (
            x, t, np.int64(n), np.int32(ELEMENTWISE_KIND[kind]), dt.compute.type(param), w, np.int64(w.size),
            np.int64(reduce.weight_block), pw, np.int64(pw_period), *denom, loss_out, np.int32(want_loss), grad,
            np.int32(return_grad), part, np.int32(not want_loss), self._ticket(TICKET_LOSS), out))
        loss = loss_out.reshape(reduce.loss_shape) if want_loss else out[0:1].reshape(())
        return loss, (grad.reshape(shape) if return_grad else None)

    def cosine_distance(self, plan: CosinePlan, pred, target, w_values):
        """One launch (two for mean / sum_by_nonzero_weights: the divisor first)."""
        xp = self.xp
        dt = plan.dtypes
        p = self._contiguous(pred)
        t, sfx = self._second_operand(target, dt)
        w = self._weights(w_values, dt)
        rows = plan.rows
        reduced = plan.reduce.reduction != Reduction.NONE
        blocks, threads, group = cosine_launch(rows, plan.length, plan.inner)
        den = self._denominator(plan.reduce, w, per_measurement=False, n=w.size)
        out, scal, part, dpart = self._workspace(dt, blocks if reduced else 0, den[2])
        denom = self._launch_denominator(den, w, dpart, scal)
        loss_rows = self._dummy(dt.compute) if reduced else xp.empty(rows, dt.compute)
        grad = xp.empty(pred.shape, dt.input) if plan.return_grad else self._dummy(dt.input)
        self._launch(f"cosine_fwd_bwd_{sfx}", blocks, threads, (
            p, t, np.int64(rows), np.int64(plan.length), np.int64(plan.inner), w, np.int64(w.size),
            np.int64(plan.reduce.weight_block), *denom, loss_rows, np.int32(not reduced), grad,
            np.int32(plan.return_grad), np.int32(group), part, np.int32(reduced), self._ticket(TICKET_LOSS), out))
        loss = out[0:1].reshape(()) if reduced else loss_rows.reshape(plan.reduce.loss_shape)
        return loss, (grad if plan.return_grad else None)
