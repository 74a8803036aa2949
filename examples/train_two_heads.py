"""Train examples/two_heads_net.prototxt with the solver API: a loop you can copy.

The net has a shared trunk and two heads, each a loss with its own
``loss_weight``: which digit (SoftmaxWithLoss, weight 1.0) and whether it is
odd (SigmoidCrossEntropyLoss, weight 0.5). Data: scikit-learn's digits, which
ship with scikit-learn (no download).

    python examples/train_two_heads.py                 # 900 iterations, a few seconds on a CPU
    python examples/train_two_heads.py --iterations 50 --backend emulated

The same training through the command line, without this script, needs the
data as an .npz keyed by input blob name (data, label, parity):
``gpuloss train examples/two_heads_net.prototxt --solver examples/two_heads_solver.prototxt --data D.npz``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import gpuloss as gl

HERE = Path(__file__).resolve().parent
SOLVER = HERE / "two_heads_solver.prototxt"


def digits_arrays(seed: int = 0):
    """(train, test) dicts keyed by the net's input blobs: data, label, parity."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)            # pixel counts 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)

    def pack(xs, ys):
        return {"data": xs, "label": ys, "parity": (ys % 2).astype(np.float32)[:, None]}

    return pack(x_tr, y_tr), pack(x_te, y_te)


def batches(arrays: dict, batch_size: int, seed: int):
    """Endless mini-batches: a fresh permutation of the samples every epoch."""
    n = len(arrays["label"])
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = order[lo:lo + batch_size]
            yield {name: a[idx] for name, a in arrays.items()}


def evaluate(net, arrays: dict, batch_size: int) -> dict:
    """Sample-weighted means of the TEST net's scalar outputs over the whole set."""
    n = len(arrays["label"])
    sums: dict = {}
    for lo in range(0, n, batch_size):
        batch = {name: a[lo:lo + batch_size] for name, a in arrays.items()}
        net.forward(**batch)
        for top in ("digit_loss", "parity_loss", "accuracy"):
            sums[top] = sums.get(top, 0.0) + float(net.blobs[top].data) * len(batch["label"])
    return {top: s / n for top, s in sums.items()}


def main(iterations: int | None = None, backend: str = "auto", out=print) -> dict:
    # The solver file names the net; this builds the TRAIN net and a TEST net sharing its parameters.
    solver = gl.solver_from_prototxt(SOLVER, backend=backend)
    net, test_net = solver.net, solver.test_net
    cfg = solver.config
    max_iter = cfg.max_iter if iterations is None else int(iterations)
    batch_size = net.input_shape("data")[0]
    train, test = digits_arrays()
    feed = batches(train, batch_size, seed=cfg.random_seed)
    out(f"{net.name}: backend {net.backend}, {len(train['label'])} training digits, batch {batch_size}, "
        f"weighted tops {net.weighted_tops}")

    total = None
    while solver.iter < max_iter:
        total = solver.step(next(feed))           # forward, backward, update; iter += 1
        if cfg.display and solver.iter % cfg.display == 0:
            # Reading the 0-d device values is this loop's only synchronisation.
            terms = ", ".join(f"{t.top} {float(t.value):.4f} (x{t.weight:g})" for t in net.loss_terms)
            out(f"iter {solver.iter:4d}  lr {solver.learning_rate():.4f}  total {float(total):.4f}  {terms}")

    result = evaluate(test_net, test, batch_size)
    out("test: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    result["iterations"] = solver.iter
    result["final_total"] = None if total is None else float(total)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, help="override the solver's max_iter")
    parser.add_argument("--backend", default="auto", help="auto | cpu | cuda | emulated")
    args = parser.parse_args()
    main(args.iterations, args.backend)
