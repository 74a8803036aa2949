"""Data-parallel training of the layer graph over ``torch.distributed`` (docs/distributed.md).

``gpuloss train`` started by ``torchrun`` (or with ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` set by hand) trains data-parallel: every rank
holds the whole net, reads its contiguous shard of every global batch (the
batch the single-process run would read, so the samples seen do not depend on
the number of ranks), and after backward the gradients are averaged with
bucketed all-reduces before the same update runs on every rank.  The
parameters therefore stay identical on every rank and equal to a single
process's up to float reassociation, as long as each loss averages over its
samples (a loss normalised by a data-dependent count, e.g. ``VALID`` with an
``ignore_label``, averages the per-rank means, as PyTorch's
DistributedDataParallel does).

Transport: gloo on CPUs (NumPy buffers handed to torch without a copy,
``torch.from_numpy``), NCCL when the net runs on CUDA (CuPy buffers through
DLPack).  The process group has a timeout, so a rank that dies or hangs makes
the others stop with an error instead of waiting for ever.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np

from .layer import GraphError

__all__ = ["launched", "DataParallel", "DistributedFailure", "BUCKET_BYTES", "DEFAULT_TIMEOUT_S"]

# Gradients travel in buckets of at most this many bytes (several parameters per all-reduce: fewer,
# larger messages; PyTorch DDP's default bucket is 25 MiB).
BUCKET_BYTES = 25 << 20
DEFAULT_TIMEOUT_S = 300.0


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the network broke."""


def launched() -> bool:
    """True when this process is one of several ranks (``WORLD_SIZE`` > 1, as torchrun sets it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise GraphError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def select_local_device() -> None:
    """Before the net is built on CUDA: this rank's GPU is LOCAL_RANK (one GPU per rank)."""
    import cupy
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = cupy.cuda.runtime.getDeviceCount()
    if local >= count:
        raise GraphError(f"LOCAL_RANK {local} but this host has {count} GPU(s): start at most {count} ranks per "
                         f"host (torchrun --nproc-per-node {count})")
    cupy.cuda.Device(local).use()
    try:   # torch's current device too: the small collectives put their tensors there (.cuda())
        import torch
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
    except ImportError:
        pass


class DataParallel:
    """This process's place among the ranks, and the collectives of a training run."""

    def __init__(self, net_backend: str, timeout_s: float = DEFAULT_TIMEOUT_S, bucket_bytes: int = BUCKET_BYTES):
        import torch.distributed as dist
        self._dist = dist
        self.backend = "nccl" if net_backend == "cuda" else "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(self.backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
            except Exception as exc:   # a rank that never came, a port in use, a bad address
                raise DistributedFailure(f"could not join the process group ({self.backend}, "
                                         f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                                         f"{_first_line(exc)}") from None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout_s = timeout_s
        self.bucket_bytes = int(bucket_bytes)
        self._buckets = None
        self.exchanges = 0   # gradient exchanges so far (step tells a failure before one from one after)
        self._cuda = net_backend == "cuda"

    def describe(self) -> str:
        return f"data-parallel over {self.world} ranks ({self.backend})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ----------------------------------------------------------------------------------------
    def check_batch(self, batch: int) -> int:
        """This rank's share of a global batch (the net's declared batch size)."""
        if batch % self.world:
            raise GraphError(f"the net's batch size {batch} does not split evenly over {self.world} ranks: "
                             f"declare a multiple of {self.world} (each rank reads batch / ranks samples)")
        return batch // self.world

    def shard(self, arrays: dict) -> dict:
        """This rank's contiguous share of one global batch."""
        n = len(next(iter(arrays.values())))
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return {k: a[lo:hi] for k, a in arrays.items()}

    # -- collectives ---------------------------------------------------------------------------------
    def _tensor(self, a):
        """A torch tensor sharing ``a``'s memory (NumPy: from_numpy; CuPy: DLPack)."""
        import torch
        if isinstance(a, np.ndarray):
            return torch.from_numpy(a)
        return torch.from_dlpack(a)

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:   # gloo/NCCL report a dead peer or a timeout as RuntimeError (or subclasses)
            raise DistributedFailure(f"{what} failed on rank {self.rank} of {self.world}: another rank died, hung "
                                     f"past the {self.timeout_s:g} s timeout, or the network broke "
                                     f"({_first_line(exc)})") from None

    def broadcast_params(self, params) -> None:
        """Every rank starts from rank 0's parameters (fillers are seeded alike; this makes it certain)."""
        for p in params:
            self._collective("broadcast of the parameters", self._dist.broadcast, self._tensor(p.data), src=0)

    def _make_buckets(self, params):
        xp = type(params[0].data).__module__.split(".")[0]
        buckets, current, size = [], [], 0
        for p in params:
            nbytes = p.diff.nbytes
            if current and size + nbytes > self.bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            buckets.append(current)
        out = []
        for k, group in enumerate(buckets):
            total = sum(int(p.diff.size) for p in group)
            mod = np if xp == "numpy" else __import__(xp)
            # The last bucket carries one more number per rank: 1 where that rank's step failed
            # before the exchange (see step), so that every rank learns it in the same all-reduce.
            extra = self.world if k == len(buckets) - 1 else 0
            flat = mod.zeros(total + extra, dtype=group[0].diff.dtype)
            out.append((group, flat, self._tensor(flat)))
        return out

    def average_gradients(self, params, failure: Exception | None = None) -> None:
        """diff <- mean over ranks of diff, for every parameter: one all-reduce per bucket.

        ``failure``: this rank's step raised before the exchange (see :meth:`step`); it still takes
        part, with its flag set in the last bucket, and every rank then stops."""
        if self._buckets is None:
            self._buckets = self._make_buckets(list(params))
        self.exchanges += 1
        scale = 1.0 / self.world
        status = self._buckets[-1][1][-self.world:]
        status[...] = 0
        if failure is not None:
            status[self.rank] = 1
        for group, flat, tensor in self._buckets:
            pos = 0
            for p in group:
                n = int(p.diff.size)
                flat[pos:pos + n] = p.diff.reshape(-1)
                pos += n
            self._collective("all-reduce of the gradients", self._dist.all_reduce, tensor)
            flat *= flat.dtype.type(scale)
            pos = 0
            for p in group:
                n = int(p.diff.size)
                p.diff.reshape(-1)[...] = flat[pos:pos + n]
                pos += n
        flags = status if isinstance(status, np.ndarray) else status.get()   # CuPy: a few bytes to the host
        failed = [r for r in range(self.world) if flags[r] > 0]
        if failed:
            self._stop_everyone("a training step", failure, failed)

    def step(self, sol, inputs: dict):
        """``sol.step(inputs)``; when it raises before the gradient exchange (a bad label in this
        rank's share, out of memory, ...), this rank still joins the exchange, flagged, so that the
        others stop at once naming it instead of waiting in the all-reduce (until its process exits
        with gloo, until the timeout with NCCL)."""
        before = self.exchanges
        try:
            return sol.step(inputs)
        except DistributedFailure:
            raise
        except Exception as exc:
            if self.exchanges != before:   # failed after the exchange (the update): nothing to pair with
                raise
            self.average_gradients(sol.params, failure=exc)
            raise   # not reached: average_gradients raised this rank's error

    def mean(self, values: dict) -> dict:
        """The mean over ranks of a few host numbers (the displayed losses): one float64 all-reduce."""
        import torch
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if self._cuda:
            t = t.cuda()
        self._collective("all-reduce of the displayed losses", self._dist.all_reduce, t)
        t = t.cpu()
        return {k: float(t[i]) / self.world for i, k in enumerate(keys)}

    def evaluate(self, net, arrays: dict, evaluate_fn) -> dict:
        """The test phase sharded: each rank evaluates a contiguous share of the test set, the
        sample-weighted sums are all-reduced, and every rank gets the means over the whole set."""
        import torch
        n = len(next(iter(arrays.values())))
        if n < self.world:
            raise GraphError(f"the test set holds {n} samples, fewer than the {self.world} ranks")
        part = self.shard(arrays)
        local_n = len(next(iter(part.values())))
        means = self.together("the test phase", evaluate_fn, net, part)
        keys = list(means)   # the same net on every rank: the same outputs in the same order
        t = torch.tensor([means[k] * local_n for k in keys], dtype=torch.float64)
        if self._cuda:
            t = t.cuda()
        self._collective("all-reduce of the test results", self._dist.all_reduce, t)
        t = t.cpu()
        return {k: float(t[i]) / n for i, k in enumerate(keys)}

    def together(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on every rank, then one small all-reduce in which each rank says whether
        it raised.  A rank whose ``fn`` raised re-raises its own error after that collective; every other
        rank raises :class:`DistributedFailure` naming the failed rank(s) and their errors.

        Without it a rank that fails between two collectives leaves the others waiting in the next one
        until they notice: gloo sees the closed connection when the failed process exits, NCCL only at the
        process group's timeout, and either way the others can only say that "another rank" failed.
        """
        failure = None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:   # SIGINT/SIGTERM (BaseException) end the process: the others see it die
            failure, result = exc, None
        self._check_none_failed(what, failure)
        return result

    def _check_none_failed(self, what: str, failure) -> None:
        import torch
        flags = torch.zeros(self.world, dtype=torch.float64)
        if failure is not None:
            flags[self.rank] = 1.0
        if self._cuda:
            flags = flags.cuda()
        self._collective(f"the all-reduce that ends {what}", self._dist.all_reduce, flags)
        failed = [r for r, f in enumerate(flags.cpu().tolist()) if f]
        if failed:
            self._stop_everyone(what, failure, failed)

    def _stop_everyone(self, what: str, failure, failed: list) -> None:
        """Every rank knows that ``failed`` ranks raised in ``what``: they re-raise their own error, the
        others a DistributedFailure naming the first failed rank and its error (one all_gather_object)."""
        texts = [None] * self.world   # the failed ranks' one-line errors, for every rank's message
        self._collective(f"the exchange of the errors of {what}", self._dist.all_gather_object, texts,
                         None if failure is None else _first_line(failure))
        if failure is not None:
            raise failure
        also = f" (and on rank{'s' if len(failed) > 2 else ''} {', '.join(map(str, failed[1:]))})" \
            if len(failed) > 1 else ""
        raise DistributedFailure(f"{what} failed on rank {failed[0]} of {self.world}{also}: {texts[failed[0]]}; "
                                 f"rank {self.rank} stops too")

    def barrier(self) -> None:
        self._collective("barrier", self._dist.barrier)

    def close(self) -> None:
        if self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:   # the group may already be broken (a dead rank): nothing left to release
                pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
