"""gpuloss.torch.linear_cross_entropy against torch 2.13's F.linear_cross_entropy (and the float64 formulas)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="gpuloss.torch needs PyTorch")
F = torch.nn.functional
import gpuloss.torch as GT  # noqa: E402


def _inputs(rng, n=13, h=6, c=11, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    x = torch.randn(n, h, dtype=dtype, generator=gen, requires_grad=True)
    w = (0.5 * torch.randn(c, h, dtype=dtype, generator=gen)).requires_grad_()
    b = (0.3 * torch.randn(c, dtype=dtype, generator=gen)).requires_grad_() if bias else None
    y = torch.randint(0, c, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.2] = -100
    return x, w, b, y


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.15}, {"weight": True}, {"ignore_index": 3}])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(reduction, options, bias, rng):
    x, w, b, y = _inputs(rng, bias=bias)
    kw = dict(options)
    if "ignore_index" in kw:
        y[y == -100] = kw["ignore_index"]
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(11, dtype=torch.float64) + 0.1
    ours = GT.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, **kw)
    ref = F.linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.rand_like(ref) if reduction == "none" else torch.tensor(1.7, dtype=ref.dtype)
    for a, r in zip(_grads((ours * g).sum(), (x, w, b)), _grads((ref * g).sum(), (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_chunking_options_are_honoured_and_change_nothing(rng):
    x, w, b, y = _inputs(rng, n=37)
    whole = GT.linear_cross_entropy(x, w, y, linear_bias=b)
    chunked = GT.linear_cross_entropy(x, w, y, linear_bias=b,
                                      options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5))
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=0)


def test_float32_and_bfloat16(rng):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, w, b, y = _inputs(rng, dtype=dtype)
        ours = GT.linear_cross_entropy(x, w, y, linear_bias=b)
        ref = F.linear_cross_entropy(x.double(), w.double(), y, linear_bias=b.double())
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        assert ours.dtype == dtype


def test_all_ignored_mean_is_nan_as_torch(rng):
    x, w, b, y = _inputs(rng)
    y[:] = -100
    assert torch.isnan(GT.linear_cross_entropy(x, w, y, linear_bias=b))
    assert torch.isnan(F.linear_cross_entropy(x, w, y, linear_bias=b))


def test_z_loss_and_softcap_against_a_float64_rendering(rng):
    x, w, b, y = _inputs(rng)
    loss, z = GT.linear_cross_entropy(x, w, y, linear_bias=b, z_loss=0.01, softcap=3.0, return_z_loss=True)
    logits = 3.0 * torch.tanh((x @ w.T + b) / 3.0)
    valid = y != -100
    lse = torch.logsumexp(logits, dim=1)
    expected_z = 0.01 * (lse[valid] ** 2).sum() / valid.sum()
    expected = F.cross_entropy(logits, y) + expected_z
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, expected_z, rtol=1e-12, atol=1e-12)
    for a, r in zip(_grads(loss, (x, w, b)), _grads(expected, (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_gradcheck(rng):
    x, w, b, y = _inputs(rng, n=5, h=3, c=4)
    assert torch.autograd.gradcheck(lambda x, w, b: GT.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1),
                                    (x, w, b))


def test_module_and_torch_compile(rng):
    x, w, b, y = _inputs(rng)
    loss_fn = GT.LinearCrossEntropyLoss(label_smoothing=0.05)
    eager = loss_fn(x, w, y, b)
    compiled = torch.compile(lambda x, w, y, b: loss_fn(x, w, y, b), fullgraph=True)(x, w, y, b)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)


def test_out_of_range_class_is_torchs_error(rng):
    x, w, b, y = _inputs(rng)
    y[0] = 11
    with pytest.raises(IndexError, match="Target 11 is out of bounds"):
        GT.linear_cross_entropy(x, w, y, linear_bias=b)


def test_the_fused_kernels_run_not_torchs_fallback(rng, monkeypatch):
    import gpuloss.torch.linear as module

    calls = []
    real = module._gl.linear_cross_entropy
    monkeypatch.setattr(module._gl, "linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(module.F, "linear_cross_entropy", None)   # any fallback would fail loudly
    x, w, b, y = _inputs(rng)
    GT.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1).backward()
    assert len(calls) == 1 and calls[0]["return_grad"] and x.grad is not None and w.grad is not None


def test_a_target_that_requires_grad_goes_to_torch(rng):
    x, w, b, _ = _inputs(rng)
    probs = torch.softmax(torch.randn(13, 11, dtype=torch.float64), dim=1).requires_grad_()
    ours = GT.linear_cross_entropy(x, w, probs, linear_bias=b)
    torch.testing.assert_close(ours, F.linear_cross_entropy(x, w, probs, linear_bias=b))
