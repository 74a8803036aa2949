"""Argument checks and their error messages, written once (docs/api.md §4).

Every message names the argument, what was expected and what came.  Nothing
here copies or modifies an input array.
"""
from __future__ import annotations

import enum
import functools
import math
import numbers

import numpy as np

from .backends import BACKEND_NAMES, forced_backend_name, get_backend, is_cupy_array


class Reduction(str, enum.Enum):
    """How per-measurement losses become one number (docs/api.md §2.3.4).

    The values are the strings the functions accept; the comments give the
    names the same rule has elsewhere.
    """

    NONE = "none"
    SUM = "sum"
    MEAN = "mean"  # sum(L) / sum(w): PyTorch's weighted mean, TF's MEAN
    SUM_OVER_BATCH_SIZE = "sum_over_batch_size"  # TF SUM_OVER_BATCH_SIZE, Caffe FULL
    SUM_BY_NONZERO_WEIGHTS = "sum_by_nonzero_weights"  # TF SUM_BY_NONZERO_WEIGHTS, Caffe VALID
    BATCH_SIZE = "batch_size"  # Caffe BATCH_SIZE

    def __str__(self) -> str:
        return self.value


def check_reduction(reduction) -> Reduction:
    try:
        return Reduction(reduction)
    except ValueError:
        choices = ", ".join(repr(r.value) for r in Reduction)
        raise ValueError(f"reduction must be one of {choices}; got {reduction!r}") from None


def _kind(a) -> str:
    return f"{type(a).__module__.split('.')[0]}.{type(a).__name__}"


def is_array(a) -> bool:
    return isinstance(a, np.ndarray) or is_cupy_array(a)


def check_array(name: str, a) -> None:
    if not is_array(a):
        raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray; got {_kind(a)}")


# ndarray subclasses whose meaning a plain view would silently drop: a mask, or
# matrix semantics (always 2-D, `*` is a matrix product).
_REFUSED_SUBCLASSES = (np.ma.MaskedArray, np.matrix)


def as_input(name: str, a):
    """An array argument as the kernels read it: a plain array in native byte order.

    Refused with a TypeError naming ``name``: masked arrays (the mask would be
    ignored: pass ``a.filled(value)`` or select the valid elements) and
    ``np.matrix``. Other ndarray subclasses (``np.memmap``, ...) are read as plain
    arrays; a non-native byte order (``">f4"`` on a little-endian machine) is
    converted to a native copy. Anything else is returned unchanged (the
    argument's own check names it). The caller's array is never modified.
    """
    if isinstance(a, _REFUSED_SUBCLASSES):
        hint = " (its mask would be ignored: pass a.filled(value) or the valid elements)" \
            if isinstance(a, np.ma.MaskedArray) else " (pass np.asarray(m))"
        raise TypeError(f"{name} must be a plain numpy.ndarray or cupy.ndarray; got {_kind(a)}{hint}")
    if isinstance(a, np.ndarray):
        if type(a) is not np.ndarray:
            a = a.view(np.ndarray)
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
    return a


def is_bfloat16(dtype) -> bool:
    return getattr(dtype, "name", "") == "bfloat16"


def is_float_dtype(dtype) -> bool:
    """float16/32/64, and bfloat16 where the array type has one (ml_dtypes, CuPy)."""
    dtype = np.dtype(dtype)
    return (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)) or is_bfloat16(dtype)


def check_floating(name: str, a) -> None:
    check_array(name, a)
    if not is_float_dtype(a.dtype):
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
                        f"got {a.dtype}")


def check_real_dtype(name: str, a, *, allow_bool: bool = True) -> None:
    """Floating, integer (or bool, where allowed): values that convert exactly enough to the compute dtype."""
    kinds = "iub" if allow_bool else "iu"
    if not (is_float_dtype(a.dtype) or np.dtype(a.dtype).kind in kinds):
        raise TypeError(f"{name} must have a real dtype; got {a.dtype}")


def check_integer(name: str, a, why: str) -> None:
    if np.dtype(a.dtype).kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype {why}; got {a.dtype}")


def check_same_shape(name: str, a, other_name: str, other) -> None:
    if tuple(a.shape) != tuple(other.shape):
        raise ValueError(f"{name} must have the shape of {other_name} {tuple(other.shape)}; "
                         f"got {tuple(a.shape)}")


def normalize_axis(name: str, axis, ndim: int, what: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {_kind(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for {what} of rank {ndim} "
                         f"(expected {-ndim} <= {name} < {ndim})")
    return int(axis) % ndim


def check_ignore_index(ignore_index) -> int | None:
    """An int that fits int64 (the kernels' target type), or None (ignore nothing)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None; got {_kind(ignore_index)}")
    info = np.iinfo(np.int64)
    if not info.min <= int(ignore_index) <= info.max:
        raise ValueError(f"ignore_index must fit in int64 ([{info.min}, {info.max}]) or be None; "
                         f"got {int(ignore_index)}")
    return int(ignore_index)


def _where(shape: tuple, flat: int, name: str) -> str:
    pos = first_bad_position(shape, flat)
    return f"{name}[{', '.join(map(str, pos))}]" if pos else name


def check_class_targets(target, classes: int, ignore_index: int | None) -> None:
    """Every class-index target is in [0, classes) or equal to ignore_index; the first bad one is named.

    On the GPU this read is the one synchronisation validate=True costs.
    """
    bad = (target < 0) | (target >= classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        flat = int(bad.reshape(-1).argmax())
        value = int(target.reshape(-1)[flat])
        ignored = "" if ignore_index is None else f" nor ignore_index={ignore_index}"
        raise ValueError(f"{_where(tuple(target.shape), flat, 'target')} = {value} is not a class index in "
                         f"[0, {classes}){ignored}; pass validate=False to get NaN for such rows instead")


def check_binary_labels(name: str, target) -> None:
    """Every label is 0 or 1 (hinge's {0, 1} convention; -1/+1 labels would be read as 2t - 1 = -3/+1)."""
    bad = (target != 0) & (target != 1)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).argmax())
        value = target.reshape(-1)[flat].item()
        raise ValueError(f"{_where(tuple(target.shape), flat, name)} = {value!r} is not a label in {{0, 1}} "
                         f"(for -1/+1 labels pass (t + 1) / 2); pass validate=False to skip this check")


def check_real(name: str, value, *, low=None, high=None, low_open=False) -> float:
    """A finite Python float within [low, high] (or (low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {_kind(value)}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value > high
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" <= {high}"
        raise ValueError(f"{name} must be a finite number with {lo}{name}{hi}; got {value!r}")
    return value


def array_module(named_arrays: dict, backend: str | None):
    """Resolve the backend from the arrays (NumPy -> cpu, CuPy -> cuda) or ``backend=``.

    Mixing NumPy and CuPy arrays is a TypeError naming the arguments on each side.
    """
    cupy_names = [n for n, a in named_arrays.items() if is_cupy_array(a)]
    numpy_names = [n for n, a in named_arrays.items() if isinstance(a, np.ndarray)]
    if cupy_names and numpy_names:
        raise TypeError(f"arrays on different devices: {', '.join(cupy_names)} on the GPU (cupy) but "
                        f"{', '.join(numpy_names)} on the host (numpy); move them to one device")
    on_gpu = bool(cupy_names)
    if backend is None:
        # GPULOSS_BACKEND (parsed in one place, a typo is an error) can route NumPy
        # arrays to the emulated kernels; otherwise the arrays' device decides.
        forced = forced_backend_name()
        backend = "cuda" if on_gpu else ("emulated" if forced == "emulated" else "cpu")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None; got {backend!r}")
    wants_gpu = backend == "cuda"
    if wants_gpu != on_gpu:
        names = ", ".join(cupy_names or numpy_names)
        have = "cupy" if on_gpu else "numpy"
        need = "cupy" if wants_gpu else "numpy"
        raise TypeError(f"backend={backend!r} takes {need} arrays; got {have} arrays ({names})")
    return get_backend(backend)


def constant(xp, value: float, dtype):
    """A 1-element array of ``value`` that kernels only read (an absent or scalar weight).

    On a device (an array module with ``cuda``: CuPy) one array is kept per device, dtype
    and value, so that after the first call a loss with ``weight=None`` launches no fill
    kernel of CuPy's (docs/design.md §4) and can be captured in a CUDA graph.  On the host
    a fresh NumPy array costs nothing worth keeping.
    """
    cuda = getattr(xp, "cuda", None)
    if cuda is None:
        return xp.full(1, value, dtype=dtype)
    # float.hex tells -0.0 from 0.0, and equals itself for NaN (a NaN key would never hit).
    return _device_constant(xp, cuda.Device().id, np.dtype(dtype).str, value.hex())


@functools.lru_cache(maxsize=64)
def _device_constant(xp, device: int, dtype: str, value_hex: str):
    with xp.cuda.Device(device):
        return xp.full(1, float.fromhex(value_hex), dtype=dtype)


def weight_layout(name: str, weight, loss_shape: tuple, xp, dtype, hint: str = ""):
    """Express ``weight`` against the loss as ``(values, block)``: element ``i`` of the
    flattened loss has weight ``values[i // block]`` (docs/api.md §2.3.1).

    Accepted: None (all ones), a scalar, an array whose shape is a leading prefix
    of the loss shape (TensorFlow's per-sample weights), or an array of the loss's
    rank whose dims are 1 or equal (broadcast).  A prefix-shaped weight needs no
    copy; only a broadcast along a non-trailing dim is materialised.
    """
    size = math.prod(loss_shape)
    if weight is None:
        return constant(xp, 1.0, dtype), max(size, 1)
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        return constant(xp, float(weight), dtype), max(size, 1)
    if not is_array(weight):
        raise TypeError(f"{name} must be None, a real number or an array; got {_kind(weight)}")
    check_real_dtype(name, weight)
    wshape = tuple(weight.shape)
    if wshape == ():
        return weight.reshape(1).astype(dtype, copy=False), max(size, 1)
    # Strip trailing size-1 dims of a same-rank weight: (N, 1) against (N, d) is per-sample.
    core = wshape
    if len(core) == len(loss_shape):
        while core and core[-1] == 1 and loss_shape[len(core) - 1] != 1:
            core = core[:-1]
    if core == tuple(loss_shape[:len(core)]):
        block = math.prod(loss_shape[len(core):])
        values = weight.reshape(-1).astype(dtype, copy=False)
        return values, max(block, 1)
    if len(wshape) == len(loss_shape) and all(w in (1, s) for w, s in zip(wshape, loss_shape)):
        values = xp.ascontiguousarray(xp.broadcast_to(weight, loss_shape)).reshape(-1).astype(dtype, copy=False)
        return values, 1
    raise ValueError(f"{name} of shape {wshape} does not fit the loss of shape {tuple(loss_shape)}: expected a "
                     f"scalar, a leading prefix of {tuple(loss_shape)}, or a shape of rank {len(loss_shape)} whose "
                     f"dims are 1 or equal to the loss's{hint}")


# Arguments of torch.nn.functional that the functional API spells otherwise (docs/api.md §5).
TORCH_SPELLINGS = {"dim": "axis=", "size_average": "reduction=", "reduce": "reduction=",
                   "input": "the first positional argument", "eps": "epsilon= (log_loss) or label_smoothing="}


def torch_spelling_hints(fn):
    """Wrap a public loss so that a PyTorch-only keyword (``dim=``, ``size_average=``, ...) is a
    TypeError that names our spelling, instead of Python's bare 'unexpected keyword argument'."""
    import functools
    import inspect

    accepted = set(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for key in kwargs:
            if key not in accepted:
                hint = TORCH_SPELLINGS.get(key)
                more = (f"; gpuloss spells it {hint} (gpuloss.torch takes PyTorch's own arguments)"
                        if hint else "")
                raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {key!r}{more}")
        return fn(*args, **kwargs)

    return wrapper


def first_bad_position(shape: tuple, flat_index: int) -> tuple:
    return tuple(int(i) for i in np.unravel_index(flat_index, shape)) if shape else ()
