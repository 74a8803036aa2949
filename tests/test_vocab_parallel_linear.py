"""gpuloss.torch.vocab_parallel_linear_cross_entropy: the fused linear head sharded by vocabulary
(docs/distributed.md).

* world of one (no process group): against the unsharded gpuloss.torch.linear_cross_entropy and
  torch's F.linear + F.cross_entropy in float64;
* 2 and 3 processes (multiprocessing spawn, gloo on 127.0.0.1, a hard timeout: the helpers of
  tests/test_distributed.py): loss, d input, the d weight shards and d bias shards against the same
  two references, V = 32003 over 3 ranks and V = 3 over 3 ranks (one class each), every option,
  reductions, ignored rows, N not a multiple of the chunk.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpuloss as gl

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")
F = torch.nn.functional

from .test_distributed import OPTIONS, REDUCTIONS, run_ranks, _ok  # noqa: E402

WORKER = "tests.test_vocab_parallel_linear:_linear_worker"


def _make_case(rng, rows: int, hidden: int, vocab: int, opts: dict, reduction: str, dtype=np.float32,
               bias=True, chunk_rows=8, grad_output=False):
    x = rng.standard_normal((rows, hidden)).astype(dtype)
    W = (rng.standard_normal((vocab, hidden)) * (2.0 / np.sqrt(hidden))).astype(dtype)
    y = rng.integers(0, vocab, rows)
    kw = {}
    if opts.get("holes"):
        y[rng.choice(rows, max(1, rows // 4), replace=False)] = -100
    if opts.get("class_weight"):
        kw["class_weight"] = rng.uniform(0.2, 2.0, vocab).astype(dtype)
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.0, 2.0, rows).astype(dtype)
    for k in ("label_smoothing", "z_loss", "softcap"):
        if k in opts:
            kw[k] = opts[k]
    case = dict(x=x, W=W, b=rng.standard_normal(vocab).astype(dtype) if bias else None, y=y, kw=kw,
                reduction=reduction, chunk_rows=chunk_rows)
    if grad_output and reduction == "none":
        case["grad_output"] = rng.uniform(-1.0, 2.0, rows).astype(dtype)
    return case


# ------------------------------------------------------------------------------------------------
# References


def torch_reference(case, dtype=torch.float64):
    """(loss, d x, d W, d b) of torch's F.linear (+ soft-cap) + F.cross_entropy per row, the z term, the
    per-row weights and gpuloss's six reductions (docs/api.md §2.1.1, §2.3.2), by autograd in ``dtype``."""
    kw = case["kw"]
    x = torch.tensor(case["x"], dtype=dtype, requires_grad=True)
    W = torch.tensor(case["W"], dtype=dtype, requires_grad=True)
    b = None if case["b"] is None else torch.tensor(case["b"], dtype=dtype, requires_grad=True)
    y = torch.from_numpy(case["y"])
    cw = None if "class_weight" not in kw else torch.tensor(kw["class_weight"], dtype=dtype)
    logits = F.linear(x, W, b)
    if kw.get("softcap"):
        logits = kw["softcap"] * torch.tanh(logits / kw["softcap"])
    rows = F.cross_entropy(logits, y, weight=cw, ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0),
                           reduction="none")
    valid = y != -100
    cw_y = torch.ones(len(y), dtype=dtype) if cw is None else cw[torch.where(valid, y, 0)]
    cw_y = cw_y * valid
    w = torch.ones(len(y), dtype=dtype) if "weight" not in kw else torch.tensor(kw["weight"], dtype=dtype)
    L = w * rows
    if kw.get("z_loss"):
        L = L + kw["z_loss"] * w * cw_y * torch.logsumexp(logits, dim=-1) ** 2
    red = case["reduction"]
    total = L.sum()
    denom = {"sum": 1.0, "mean": (w * cw_y).sum(), "sum_over_batch_size": float(len(y)),
             "sum_by_nonzero_weights": ((w * cw_y) != 0).sum().to(dtype), "batch_size": float(len(y))}.get(red)
    if red == "none":
        loss = L
    else:
        denom = torch.as_tensor(denom, dtype=dtype)
        loss = torch.where(denom == 0, torch.zeros_like(total), total / torch.where(denom == 0, 1.0, denom))
    g = torch.ones_like(loss) if "grad_output" not in case else torch.tensor(case["grad_output"], dtype=dtype)
    grads = torch.autograd.grad(loss, [t for t in (x, W, b) if t is not None], g)
    return (loss.detach().numpy(), grads[0].numpy(), grads[1].numpy(), None if b is None else grads[2].numpy())


def unsharded(case):
    """(loss, d x, d W, d b) of the unsharded fused path: gpuloss.torch.linear_cross_entropy when torch's
    signature expresses the case (class weights, none/mean/sum), else gpuloss.linear_cross_entropy."""
    import gpuloss.torch as gt
    kw, red = case["kw"], case["reduction"]
    if "weight" not in kw and red in ("none", "mean", "sum") and "grad_output" not in case:
        x = torch.from_numpy(case["x"]).requires_grad_(True)
        W = torch.from_numpy(case["W"]).requires_grad_(True)
        b = None if case["b"] is None else torch.from_numpy(case["b"]).requires_grad_(True)
        extra = {k: kw[k] for k in ("label_smoothing", "z_loss", "softcap") if k in kw}
        cw = None if "class_weight" not in kw else torch.from_numpy(kw["class_weight"])
        loss = gt.linear_cross_entropy(x, W, torch.from_numpy(case["y"]), linear_bias=b, weight=cw, reduction=red,
                                       ignore_index=-100, **extra)
        loss.backward(torch.ones_like(loss))
        return (loss.detach().numpy(), x.grad.numpy(), W.grad.numpy(), None if b is None else b.grad.numpy())
    kw = dict(kw)
    if "grad_output" in case:   # d(sum_n g_n loss_n) = the "sum" of losses weighted by g
        kw["weight"] = kw.get("weight", 1.0) * case["grad_output"]
        loss_rows = gl.linear_cross_entropy(case["x"], case["W"], case["y"], linear_bias=case["b"], reduction="none",
                                            **case["kw"])
        _, grads = gl.linear_cross_entropy(case["x"], case["W"], case["y"], linear_bias=case["b"], reduction="sum",
                                           return_grad=True, **kw)
        return loss_rows, grads.input, grads.linear_weight, grads.linear_bias
    loss, grads = gl.linear_cross_entropy(case["x"], case["W"], case["y"], linear_bias=case["b"], reduction=red,
                                          return_grad=True, **kw)
    return loss, grads.input, grads.linear_weight, grads.linear_bias


def _diff(a, b):
    """(max abs difference, max relative difference against max |b|)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0, 0.0
    d = float(np.max(np.abs(a - b)))
    return d, d / max(float(np.max(np.abs(b))), 1e-300)


def compare(cases, results, world, tol_unsharded, tol_f64, label=""):
    """Every rank's loss and d input identical; d W / d b shards concatenated in rank order; all four held
    to both references (max abs difference <= tol * max |reference|).  Prints the worst differences."""
    from gpuloss.torch.distributed import shard_bounds
    worst = {}
    for k, case in enumerate(cases):
        per_rank = [results[r][k] for r in range(world)]
        for r in range(1, world):
            np.testing.assert_array_equal(per_rank[r][0], per_rank[0][0])   # the same loss on every rank
            np.testing.assert_array_equal(per_rank[r][1], per_rank[0][1])   # the same d input on every rank
        bounds = shard_bounds(case["W"].shape[0], world)
        assert [p[2].shape[0] for p in per_rank] == list(np.diff(bounds))
        got = (per_rank[0][0], per_rank[0][1], np.concatenate([p[2] for p in per_rank]),
               None if case["b"] is None else np.concatenate([p[3] for p in per_rank]))
        for ref_name, ref, tol in (("unsharded", unsharded(case), tol_unsharded),
                                   ("torch f64", torch_reference(case), tol_f64)):
            for name, g, r in zip(("loss", "d_input", "d_weight", "d_bias"), got, ref):
                if r is None:
                    continue
                assert g.shape == np.shape(r), (name, g.shape, np.shape(r))
                abs_d, rel_d = _diff(g, r)
                key = (ref_name, name)
                worst[key] = (max(worst.get(key, (0, 0))[0], abs_d), max(worst.get(key, (0, 0))[1], rel_d))
                assert rel_d <= tol, (f"{label} case {k} ({case['reduction']}, {case['kw'].keys()}): {name} differs "
                                      f"from {ref_name} by {abs_d:.3g} (relative to max |ref| {rel_d:.3g} > {tol})")
    for (ref_name, name), (a, r) in sorted(worst.items()):
        print(f"{label} {name} vs {ref_name}: max abs {a:.3g}, max rel (to max |ref|) {r:.3g}")
    return worst


# ------------------------------------------------------------------------------------------------
# The worker (runs inside each spawned rank)


def _linear_worker(rank, world, payload):
    import gpuloss.torch as gt
    from gpuloss.torch.distributed import shard_bounds
    out = []
    for case in payload["cases"]:
        a, b = shard_bounds(case["W"].shape[0], world)[rank:rank + 2]
        x = torch.from_numpy(case["x"]).requires_grad_(True)
        Ws = torch.from_numpy(case["W"][a:b].copy()).requires_grad_(True)
        bs = None if case["b"] is None else torch.from_numpy(case["b"][a:b].copy()).requires_grad_(True)
        kw = dict(case["kw"])
        for key in ("class_weight", "weight"):
            if key in kw:
                kw[key] = torch.from_numpy(kw[key])
        loss = gt.vocab_parallel_linear_cross_entropy(x, Ws, torch.from_numpy(case["y"]), linear_bias_shard=bs,
                                                      reduction=case["reduction"], chunk_rows=case["chunk_rows"],
                                                      backend=payload.get("backend"), **kw)
        g = torch.ones_like(loss) if "grad_output" not in case else torch.from_numpy(case["grad_output"])
        loss.backward(g)
        out.append((loss.detach().numpy().copy(), x.grad.numpy().copy(), Ws.grad.numpy().copy(),
                    None if bs is None else bs.grad.numpy().copy()))
    return out


def _disagreement_worker(rank, world, payload):
    """Ranks that disagree on chunk_rows or on input get a ValueError naming it on every rank, no hang."""
    import gpuloss.torch as gt
    torch.manual_seed(payload)
    x = torch.randn(6, 4)
    y = torch.randint(0, 11, (6,))
    W = torch.randn(5 + rank, 4)   # the shards differ in height: drawn last
    errors = {}
    tries = {
        "chunk_rows": lambda: gt.vocab_parallel_linear_cross_entropy(x, W, y, chunk_rows=2 + rank),
        "input": lambda: gt.vocab_parallel_linear_cross_entropy(x + rank, W, y),
        "hidden": lambda: gt.vocab_parallel_linear_cross_entropy(x[:, :3 + rank], W[:, :3 + rank], y),
        "ok": lambda: gt.vocab_parallel_linear_cross_entropy(x, W, y),
    }
    for name, call in tries.items():
        try:
            errors[name] = float(call())
        except (ValueError, TypeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


# ------------------------------------------------------------------------------------------------
# World of one (no process group): the unsharded loss


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_world_of_one_every_option(rng, opts):
    """N = 37 rows in chunks of 8 (the last one 5), every reduction, float32 and float64."""
    import gpuloss.torch as gt  # noqa: F401
    cases = []
    for red in REDUCTIONS:
        cases.append(_make_case(rng, 37, 24, 301, opts, red, np.float32))
    cases.append(_make_case(rng, 37, 24, 301, opts, "none", np.float64, grad_output=True, chunk_rows=5))
    cases.append(_make_case(rng, 37, 24, 301, opts, "mean", np.float64, bias=False, chunk_rows=64))
    results = [[_linear_worker(0, 1, dict(cases=[c]))[0]] for c in cases]
    for c, res in zip(cases, results):
        f64 = c["x"].dtype == np.float64
        compare([c], [res], 1, tol_unsharded=1e-11 if f64 else 2e-5, tol_f64=1e-11 if f64 else 2e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_world_of_one_16bit(rng, dtype):
    """16-bit input and weights: float32 loss, gradients in the input dtype, as the unsharded gpuloss.torch
    path (which also computes in float32)."""
    import gpuloss.torch as gt
    tdt = getattr(torch, dtype)
    case = _make_case(rng, 19, 16, 97, OPTIONS[-2] | dict(class_weight=True, holes=True), "mean")
    x = torch.from_numpy(case["x"]).to(tdt).requires_grad_(True)
    W = torch.from_numpy(case["W"]).to(tdt).requires_grad_(True)
    b = torch.from_numpy(case["b"]).to(tdt).requires_grad_(True)
    y = torch.from_numpy(case["y"])
    cw = torch.from_numpy(case["kw"]["class_weight"])
    loss = gt.vocab_parallel_linear_cross_entropy(x, W, y, linear_bias_shard=b, class_weight=cw, chunk_rows=4)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == W.grad.dtype == b.grad.dtype == tdt
    x2, W2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, W, b))
    ref = gt.linear_cross_entropy(x2, W2, y, linear_bias=b2, weight=cw.to(tdt))
    ref.backward()
    np.testing.assert_allclose(float(loss.detach()), float(ref.detach()), rtol=1e-2)
    for got, want in ((x.grad, x2.grad), (W.grad, W2.grad), (b.grad, b2.grad)):
        np.testing.assert_allclose(got.float().numpy(), want.float().numpy(), rtol=2e-2, atol=2e-3)


def test_world_of_one_return_z_and_no_input_grad(rng):
    import gpuloss.torch as gt
    case = _make_case(rng, 11, 8, 50, dict(z_loss=1e-2, label_smoothing=0.1), "sum")
    x = torch.from_numpy(case["x"])            # no gradient wanted for input: no d input product
    W = torch.from_numpy(case["W"]).requires_grad_(True)
    loss, z = gt.vocab_parallel_linear_cross_entropy(x, W, torch.from_numpy(case["y"]), z_loss=1e-2,
                                                     label_smoothing=0.1, reduction="sum", return_z_loss=True)
    assert not z.requires_grad
    loss.backward()
    ref, ref_z, grads = gl.linear_cross_entropy(case["x"], case["W"], case["y"], z_loss=1e-2, label_smoothing=0.1,
                                                reduction="sum", return_z_loss=True, return_grad=True)
    np.testing.assert_allclose(float(loss.detach()), float(ref), rtol=1e-6)
    np.testing.assert_allclose(float(z), float(ref_z), rtol=1e-6)
    np.testing.assert_allclose(W.grad.numpy(), grads.linear_weight, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        again = gt.vocab_parallel_linear_cross_entropy(x, W, torch.from_numpy(case["y"]), z_loss=1e-2,
                                                       label_smoothing=0.1, reduction="sum")
    assert float(again) == float(loss.detach())


def test_world_of_one_3d_input_rows_weighted_backward(rng):
    """input [2, 5, H] and target [2, 5]; reduction "none" with a grad_output that is not all ones (backward
    recomputes d W from the kept statistics) against torch float64 autograd."""
    import gpuloss.torch as gt
    case = _make_case(rng, 10, 6, 40, OPTIONS[-1], "none", np.float64, chunk_rows=3, grad_output=True)
    x = torch.from_numpy(case["x"].reshape(2, 5, 6)).requires_grad_(True)
    W = torch.from_numpy(case["W"]).requires_grad_(True)
    b = torch.from_numpy(case["b"]).requires_grad_(True)
    kw = {k: (torch.from_numpy(val.reshape(2, 5)) if k == "weight" else torch.from_numpy(val))
          if isinstance(val, np.ndarray) else val for k, val in case["kw"].items()}
    loss = gt.vocab_parallel_linear_cross_entropy(x, W, torch.from_numpy(case["y"].reshape(2, 5)), linear_bias_shard=b,
                                                  reduction="none", chunk_rows=3, **kw)
    assert loss.shape == (2, 5)
    loss.backward(torch.from_numpy(case["grad_output"].reshape(2, 5)))
    ref = torch_reference(case)
    np.testing.assert_allclose(loss.detach().numpy().reshape(-1), ref[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(x.grad.numpy().reshape(10, 6), ref[1], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(W.grad.numpy(), ref[2], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(b.grad.numpy(), ref[3], rtol=1e-11, atol=1e-13)


def test_argument_errors():
    import gpuloss.torch as gt
    x, W, y = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match=r"linear_weight_shard must have shape \(V_r, H\) with H = input.shape\[-1\] = 3"):
        gt.vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4), y)
    with pytest.raises(ValueError, match=r"linear_bias_shard must be a tensor of shape \(5,\)"):
        gt.vocab_parallel_linear_cross_entropy(x, W, y, linear_bias_shard=torch.randn(4))
    with pytest.raises(TypeError, match="linear_weight_shard must have the dtype of input"):
        gt.vocab_parallel_linear_cross_entropy(x, W.double(), y)
    with pytest.raises(ValueError, match="chunk_rows or chunk_bytes, not both"):
        gt.vocab_parallel_linear_cross_entropy(x, W, y, chunk_rows=2, chunk_bytes=1 << 20)
    with pytest.raises(ValueError, match="chunk_bytes=10 is too small for one row"):
        gt.vocab_parallel_linear_cross_entropy(x, W, y, chunk_bytes=10)
    with pytest.raises(ValueError, match="target holds 5 at flat position"):
        gt.vocab_parallel_linear_cross_entropy(x, W, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="class_weight must have shape"):
        gt.vocab_parallel_linear_cross_entropy(x, W, y, class_weight=torch.ones(4))


# ------------------------------------------------------------------------------------------------
# 2 and 3 processes on gloo


@pytest.mark.slow
def test_three_ranks_odd_vocabulary_every_option(rng, tmp_path):
    """V = 32003 over 3 ranks (10668, 10668, 10667), H = 32, N = 37 rows in chunks of 8 (the last 5):
    every option with none / mean / sum, the all-options case with every reduction, against the unsharded
    fused path (float32) and torch's F.linear + F.cross_entropy in float64."""
    cases = []
    for opts in OPTIONS:
        for red in ("none", "mean", "sum"):
            cases.append(_make_case(rng, 37, 32, 32003, opts, red))
    for red in ("sum_over_batch_size", "sum_by_nonzero_weights", "batch_size"):
        cases.append(_make_case(rng, 37, 32, 32003, OPTIONS[-1], red))
    cases.append(_make_case(rng, 37, 32, 32003, OPTIONS[-1], "none", grad_output=True, bias=False))
    results = _ok(run_ranks(3, WORKER, dict(cases=cases), tmp_path))
    compare(cases, results, 3, tol_unsharded=2e-5, tol_f64=2e-5, label="V=32003/3 f32")


@pytest.mark.slow
def test_three_ranks_one_class_each(rng, tmp_path):
    """V = 3 over 3 ranks (one class each), N = 10 in chunks of 4, every option, none / mean / sum."""
    cases = [_make_case(rng, 10, 5, 3, opts, red, chunk_rows=4) for opts in OPTIONS for red in ("none", "mean", "sum")]
    cases.append(_make_case(rng, 10, 5, 3, OPTIONS[-1], "none", chunk_rows=3, grad_output=True))
    results = _ok(run_ranks(3, WORKER, dict(cases=cases), tmp_path))
    compare(cases, results, 3, tol_unsharded=2e-5, tol_f64=2e-5, label="V=3/3 f32")


@pytest.mark.slow
def test_two_ranks_float64_and_disagreement(rng, tmp_path):
    """float64 over 2 ranks, V = 777, N = 29 in chunks of 6: tight agreement, including reduction "none"
    with a random grad_output (backward recomputes d W from the kept statistics, no collective); then
    ranks that disagree get an error naming the argument, on every rank."""
    cases = [_make_case(rng, 29, 12, 777, opts, red, np.float64, chunk_rows=6, grad_output=True)
             for opts, red in ((OPTIONS[-1], "none"), (OPTIONS[-1], "mean"), (OPTIONS[4], "none"),
                               (OPTIONS[0], "sum"), (OPTIONS[6], "sum_by_nonzero_weights"))]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = _ok(run_ranks(2, WORKER, dict(cases=cases), tmp_path / "a"))
    compare(cases, results, 2, tol_unsharded=1e-11, tol_f64=1e-11, label="V=777/2 f64")
    errors = _ok(run_ranks(2, "tests.test_vocab_parallel_linear:_disagreement_worker", int(rng.integers(1 << 30)),
                           tmp_path / "b"))
    for rank_errors in errors:
        assert "chunk_rows differs across ranks" in rank_errors["chunk_rows"]
        assert "input differs across ranks" in rank_errors["input"]
        assert "hidden size (input.shape[-1]) differs across ranks" in rank_errors["hidden"]
        assert isinstance(rank_errors["ok"], float)
    assert errors[0]["ok"] == errors[1]["ok"]
