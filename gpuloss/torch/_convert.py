"""Tensor <-> array without copies: NumPy views of CPU tensors, CuPy views of CUDA tensors (DLPack).

bfloat16 has no NumPy dtype: a CPU bf16 tensor is reinterpreted through int16
(same bits) as an ``ml_dtypes.bfloat16`` array, which the cpu backend accepts.
CUDA work runs on torch's current stream, so no synchronisation is needed
between torch's kernels and ours.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def _ml_bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _cupy_bfloat16():
    # CuPy reads bf16 through ml_dtypes where it supports it (CuPy >= 14); bits are bits.
    return _ml_bfloat16()


def to_array(t: torch.Tensor | None):
    """A NumPy (CPU) or CuPy (CUDA) array sharing ``t``'s memory; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_ml_bfloat16())
        return t.numpy()
    import cupy

    if t.dtype == torch.bfloat16:
        return cupy.from_dlpack(t.view(torch.int16)).view(_cupy_bfloat16())
    return cupy.from_dlpack(t)


def to_tensor(a, device: torch.device) -> torch.Tensor:
    """The backend's result array as a tensor on ``device``, sharing its memory."""
    if device.type == "cpu":
        a = np.asarray(a)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays; results are ours to own
            a = a.copy()
        return torch.from_numpy(a)
    if a.dtype.name == "bfloat16":
        return torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    return torch.from_dlpack(a)


@contextlib.contextmanager
def on_torch_stream(t: torch.Tensor):
    """Run the CuPy backend on torch's current stream of ``t``'s device (nothing to do on the CPU)."""
    if t.device.type != "cuda":
        yield
        return
    import cupy

    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield
