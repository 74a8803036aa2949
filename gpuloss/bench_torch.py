"""``gpuloss bench``'s torch-module case: one training step's loss through ``gpuloss.torch``.

Times ``gpuloss.torch.cross_entropy(x, y).backward()`` against
``torch.nn.functional.cross_entropy(x, y).backward()`` on the same tensors, in
the same process and thread count, and returns rows in the format of
``gpuloss.benchmark.Row`` (median of ``repeats`` runs after a warm-up).  What
is timed is what a training step pays: the loss forward, the gradient, and
the handing of tensors across (zero-copy on the CPU; bfloat16 is widened to
float32 by torch before the kernel, and the gradient narrowed back).
"""
from __future__ import annotations

from .benchmark import Row, _timed_once_ms, median_ms

TORCH_MODULE_SHAPES = [(4096, 32000), (512, 128256)]
QUICK_TORCH_MODULE_SHAPES = [(1024, 32000), (128, 128256)]
TORCH_MODULE_DTYPES = ["float32", "bfloat16"]


def bench_torch_module(shape, dtype: str, repeats: int) -> Row:
    """One row: gpuloss.torch.cross_entropy vs torch.nn.functional.cross_entropy, forward + backward."""
    import torch

    import gpuloss.torch as G

    F = torch.nn.functional
    rows, classes = shape
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2).to(getattr(torch, dtype))
    y = torch.randint(0, classes, (rows,), generator=gen)

    def step(loss_fn):
        xg = x.detach().requires_grad_(True)  # a fresh leaf: the step's own gradient buffer
        loss_fn(xg, y).backward()
        return xg.grad

    first = _timed_once_ms(lambda: step(G.cross_entropy))
    ms = median_ms(lambda: step(G.cross_entropy), repeats)
    torch_ms = median_ms(lambda: step(F.cross_entropy), repeats)
    ours, theirs = step(G.cross_entropy).float(), step(F.cross_entropy).float()
    agree = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
    moved = x.element_size() * x.numel() * 2 + y.numel() * y.element_size()  # read logits, write grad
    return Row(case="gpuloss.torch.cross_entropy fwd+bwd", shape=tuple(shape), dtype=dtype, gpuloss_ms=ms,
               first_call_ms=first, bytes_moved=moved, gbps=moved / (ms * 1e-3) / 1e9, torch_ms=torch_ms,
               speedup_vs_torch=torch_ms / ms,
               notes=f"vs torch.nn.functional.cross_entropy; max |grad diff| / max |grad| = {agree:.1e}")


def torch_module_rows(quick: bool = False, repeats: int | None = None) -> list[Row]:
    """The torch-module rows for ``gpuloss bench`` (empty when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return []
    import numba

    torch.set_num_threads(numba.get_num_threads())  # same thread count on both sides
    repeats = repeats or (3 if quick else 7)
    shapes = QUICK_TORCH_MODULE_SHAPES if quick else TORCH_MODULE_SHAPES
    return [bench_torch_module(s, d, repeats) for s in shapes for d in TORCH_MODULE_DTYPES]


if __name__ == "__main__":  # python -m gpuloss.bench_torch [--quick]
    import datetime
    import sys

    import numba

    from .benchmark import Report, machine_name, markdown

    report = Report(machine=machine_name(), date=datetime.date.today().isoformat(),
                    command="python -m gpuloss.bench_torch " + " ".join(sys.argv[1:]), backend="cpu",
                    threads=numba.get_num_threads(), copy_gbps=float("nan"), versions={},
                    rows=torch_module_rows(quick="--quick" in sys.argv))
    print(markdown(report))
    for r in report.rows:
        print(f"{r.shape} {r.dtype}: {r.notes}")
