"""The whole GPU suite in one command: tests on the cuda backend, then the kernel timings.

Usage, on a machine with a CUDA device and the preinstalled CuPy, Numba and
PyTorch (nothing is installed)::

    PYTHONPATH=. python bench/gpu_suite.py              # tests + benchmarks
    PYTHONPATH=. python bench/gpu_suite.py --skip-tests # benchmarks only
    python bench/gpu_suite.py --dry-run --results-dir /tmp/x   # no GPU: checks the plumbing

1. ``pytest`` with ``GPULOSS_BACKEND=cuda`` on the tests marked ``gpu`` (every
   parametrised suite has a ``cuda`` case, picked when a device answers) and
   tests/test_kernels.py; its summary line goes into the results.
2. Softmax cross entropy forward+backward (``return_grad=True``, mean over
   class-index targets) on [4096, 32000], [512, 128256], [8192, 1000] and
   [65536, 10] in float32 and bfloat16, and the element-wise losses on 2^26
   elements: medians of CUDA-event times over ``--iters`` (>= 20) runs after
   ``--warmup`` runs; achieved GB/s (bytes that must cross DRAM: logits read
   once, grad written once, targets read once) against the device's copy
   bandwidth measured here (a CuPy copy of the same bytes); the same loss in
   PyTorch (``F.cross_entropy`` + ``backward``) and Liger-Kernel (if
   importable) timed in the same run, as ratios.
3. ``bench/results/<date>-<gpu>.json`` and ``.md`` (``--results-dir`` to change).

bfloat16: CuPy has no bfloat16 dtype, so where ``cupy.empty(1, bfloat16)``
fails the bf16 case calls the ``xent_fwd_bwd_bf16`` kernels through the same
launch code on uint16 storage (``_bf16_cross_entropy`` below), which is what
the public function would run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

XENT_SHAPES = ((4096, 32000), (512, 128256), (8192, 1000), (65536, 10))
XENT_DTYPES = ("float32", "bfloat16")
ELEMENTWISE = ("mean_squared_error", "absolute_difference", "huber", "smooth_l1", "sigmoid_cross_entropy",
               "hinge", "log_loss")
ELEMENTWISE_N = 2 ** 26
# The PyTorch twin of each element-wise loss (reduction mean), for the ratio column.
TORCH_ELEMENTWISE = {"mean_squared_error": "mse_loss", "absolute_difference": "l1_loss", "huber": "huber_loss",
                     "smooth_l1": "smooth_l1_loss", "sigmoid_cross_entropy": "binary_cross_entropy_with_logits"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: check arguments, shapes and the results writer")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--skip-bench", action="store_true", help="tests only")
    p.add_argument("--pytest-args", default="-q -m gpu tests/",
                   help="arguments for pytest (default: the cuda cases of every suite)")
    p.add_argument("--iters", type=int, default=25, help="timed runs per case (>= 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="where the .json and .md go (default bench/results; a new temp dir for --dry-run)")
    p.add_argument("--elementwise-n", type=int, default=ELEMENTWISE_N)
    args = p.parse_args(argv)
    if args.iters < 20:
        p.error(f"--iters must be at least 20 (medians of >= 20 runs); got {args.iters}")
    if args.warmup < 1:
        p.error(f"--warmup must be at least 1; got {args.warmup}")
    return args


# ---------------------------------------------------------------------------
# Cases and bytes (no GPU needed).

def xent_cases() -> list[dict]:
    cases = []
    for rows, classes in XENT_SHAPES:
        for dtype in XENT_DTYPES:
            item = 4 if dtype == "float32" else 2
            # logits read once, grad written once, int64 targets read once
            cases.append({"shape": [rows, classes], "dtype": dtype,
                          "bytes": rows * classes * item * 2 + rows * 8})
    return cases


def elementwise_cases(n: int) -> list[dict]:
    # pred and target read, grad written (reduction mean: no per-element loss stored)
    return [{"loss": name, "dtype": "float32", "elements": n, "bytes": n * 4 * 3} for name in ELEMENTWISE]


# ---------------------------------------------------------------------------
# Results.

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def write_results(results: dict, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{_slug(results['device'])}"
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# gpuloss GPU suite — {results['device']}", "",
             f"{results['date']}; CuPy {results['versions'].get('cupy')}, PyTorch {results['versions'].get('torch')}, "
             f"Liger-Kernel {results['versions'].get('liger_kernel')}. Medians of {results['iters']} CUDA-event "
             f"timings after {results['warmup']} warm-up runs. \"% of copy\": against a CuPy copy moving the "
             f"same bytes, timed alongside ({_fmt(results.get('copy_gbps'), '.0f')} GB/s at the largest size)."]
    if results.get("dry_run"):
        lines += ["", "**Dry run: no GPU, no timings.**"]
    if results.get("tests"):
        lines += ["", f"Tests (`pytest {results['tests']['args']}`, GPULOSS_BACKEND=cuda): "
                      f"{results['tests']['summary']} (exit {results['tests']['returncode']})"]
    lines += ["", "## Softmax cross entropy, forward + backward (mean, class indices)", "",
              "| shape | dtype | gpuloss ms | GB/s | % of copy | torch ms | torch / gpuloss | liger ms "
              "| liger / gpuloss | gpuloss.torch ms | torch / gpuloss.torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cross_entropy"]:
        lines.append(f"| {c['shape'][0]}×{c['shape'][1]} | {c['dtype']} | {_fmt(c.get('ms'))} | "
                     f"{_fmt(c.get('gbps'), '.0f')} | {_fmt(c.get('pct_of_copy'), '.0f')} | "
                     f"{_fmt(c.get('torch_ms'))} | "
                     f"{_fmt(c.get('torch_ratio'), '.2f')} | {_fmt(c.get('liger_ms'))} | "
                     f"{_fmt(c.get('liger_ratio'), '.2f')} | {_fmt(c.get('torch_module_ms'))} | "
                     f"{_fmt(c.get('torch_module_ratio'), '.2f')} |")
    n = results["elementwise"][0]["elements"] if results["elementwise"] else 0
    lines += ["", f"## Element-wise losses, forward + backward, {n} float32 elements", "",
              "| loss | gpuloss ms | GB/s | % of copy | torch ms | torch / gpuloss |", "|---|---|---|---|---|---|"]
    for c in results["elementwise"]:
        lines.append(f"| {c['loss']} | {_fmt(c.get('ms'))} | {_fmt(c.get('gbps'), '.0f')} | "
                     f"{_fmt(c.get('pct_of_copy'), '.0f')} | {_fmt(c.get('torch_ms'))} | "
                     f"{_fmt(c.get('torch_ratio'), '.2f')} |")
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results["notes"]]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _versions() -> dict:
    out = {}
    for mod in ("cupy", "torch", "numba", "numpy", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:
            out[mod] = None
    return out


# ---------------------------------------------------------------------------
# Tests.

def run_tests(pytest_args: str) -> dict:
    env = {**os.environ, "GPULOSS_BACKEND": "cuda", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # -o addopts: the repository's defaults ask for pytest-xdist workers and leave out `slow`; the lent
    # GPU machine may have no pytest-xdist, and one GPU is best driven by one process.
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=-rfEs", *pytest_args.split(), "-p", "no:cacheprovider"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-6000:])
    sys.stderr.write(proc.stderr[-3000:])
    lines = reversed(proc.stdout.splitlines())
    summary = next((ln.strip("= ") for ln in lines if re.search(r"passed|failed|error", ln)), "no summary")
    return {"args": pytest_args, "returncode": proc.returncode, "summary": summary}


# ---------------------------------------------------------------------------
# Timing (GPU only).

def _median_ms(fn, warmup: int, iters: int, events) -> float:
    """Median of per-run times measured by a pair of events around each run."""
    for _ in range(warmup):
        fn()
    events.synchronize()
    times = []
    for _ in range(iters):
        start, stop = events.pair()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(events.elapsed(start, stop))
    return statistics.median(times)


class _CupyEvents:
    def __init__(self, cupy):
        self.cupy = cupy

    def pair(self):
        return self.cupy.cuda.Event(), self.cupy.cuda.Event()

    def elapsed(self, a, b):
        return self.cupy.cuda.get_elapsed_time(a, b)

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()


class _TorchEvents:
    def __init__(self, torch):
        self.torch = torch

    def pair(self):
        return self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)

    def elapsed(self, a, b):
        return a.elapsed_time(b)

    def synchronize(self):
        self.torch.cuda.synchronize()


def _bf16_cross_entropy(backend, x_u16, y):
    """The bf16 cross entropy of gl.softmax_cross_entropy(..., return_grad=True) (mean), launched
    through the same LaunchBackend pieces on uint16 storage (CuPy has no bfloat16 dtype)."""
    import numpy as np

    from gpuloss._plan import CrossEntropyPlan, DtypePlan, ReducePlan
    from gpuloss._validate import Reduction

    cp = backend.xp
    rows, classes = x_u16.shape
    w = cp.ones(1, np.float32)
    f32 = np.dtype(np.float32)
    plan = CrossEntropyPlan(dtypes=DtypePlan(input=f32, compute=f32, loss=f32),
                            reduce=ReducePlan(Reduction.MEAN, (rows,), rows), outer=rows, classes=classes, inner=1,
                            index_target=True, has_class_weight=False, ignore_index=-100, label_smoothing=0.0,
                            return_grad=True, validate=False)
    loss, _, grad = backend._xent(plan, "bf16", x_u16, y, y.dtype.itemsize, x_u16, w, None)
    return loss, grad


def _check_bf16_fallback() -> str:
    """Without a GPU: run _bf16_cross_entropy on the emulated backend (NumPy uint16 storage)
    and compare it with the public function on ml_dtypes bfloat16 arrays."""
    if shutil.which("g++") is None:
        return "dry run: no g++, bf16 fallback not checked"
    try:
        import ml_dtypes
    except ImportError:
        return "dry run: no ml_dtypes, bf16 fallback not checked"
    import numpy as np

    import gpuloss as gl
    from gpuloss.backends import get_backend

    rng = np.random.default_rng(1)
    for rows, classes in ((3, 10), (2, 1500)):
        xb = (rng.standard_normal((rows, classes)) * 3).astype(ml_dtypes.bfloat16)
        y = rng.integers(0, classes, rows)
        loss, grad = _bf16_cross_entropy(get_backend("emulated"), xb.view(np.uint16), y)
        ref_loss, ref_grad = gl.softmax_cross_entropy(xb, y, return_grad=True, backend="emulated")
        if loss.tobytes() != ref_loss.tobytes() or grad.tobytes() != ref_grad.view(np.uint16).tobytes():
            raise AssertionError(f"bf16 fallback differs from the public function on {(rows, classes)}")
    return "dry run: bf16 fallback launch == public function on the emulated backend"


def run_benchmarks(args, results: dict) -> None:
    import cupy as cp
    import numpy as np

    import gpuloss as gl
    from gpuloss.backends import get_backend

    backend = get_backend("cuda")
    ev = _CupyEvents(cp)
    try:
        import torch
        import torch.nn.functional as F
        has_torch = torch.cuda.is_available()
    except Exception:
        has_torch = False
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy  # type: ignore
    except Exception:
        liger_cross_entropy = None
        results["notes"].append("Liger-Kernel not importable: no liger column")
    try:
        import ml_dtypes
        cp.empty(1, ml_dtypes.bfloat16)
        cupy_bf16 = ml_dtypes.bfloat16
    except Exception:
        cupy_bf16 = None
        results["notes"].append("CuPy has no bfloat16 dtype: bf16 cases launch the xent_*_bf16 kernels on uint16 "
                                "storage through the same launch code")

    results["notes"].append("gpuloss cross entropy timed with validate=False: validate=True adds one host "
                            "synchronisation per call (docs/api.md §4.3); torch checks targets on the device")

    def copy_gbps(nbytes: int) -> float:
        """Device copy bandwidth moving `nbytes` in all (nbytes/2 read, nbytes/2 written), as a loss kernel does."""
        src = cp.ones(max(1, nbytes // 8), cp.float32)
        dst = cp.empty_like(src)
        ms = _median_ms(lambda: dst.__setitem__(Ellipsis, src), args.warmup, args.iters, ev)
        return 2 * src.nbytes / ms / 1e6

    results["copy_gbps"] = copy_gbps(max(c["bytes"] for c in results["cross_entropy"]))

    rng = np.random.default_rng(0)
    for case in results["cross_entropy"]:
        rows, classes = case["shape"]
        x32 = cp.asarray(rng.standard_normal((rows, classes), dtype=np.float32) * 3)
        y = cp.asarray(rng.integers(0, classes, rows))
        if case["dtype"] == "float32":
            ours = lambda: gl.softmax_cross_entropy(x32, y, return_grad=True, validate=False)  # noqa: E731
        elif cupy_bf16 is not None:
            xb = x32.astype(cupy_bf16)
            ours = lambda: gl.softmax_cross_entropy(xb, y, return_grad=True, validate=False)  # noqa: E731
        else:
            bits = x32.view(cp.uint32)
            # float32 -> bfloat16 round to nearest even, on the device
            xb = ((bits + cp.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
            ours = lambda: _bf16_cross_entropy(backend, xb, y)  # noqa: E731
        case["ms"] = _median_ms(ours, args.warmup, args.iters, ev)
        case["gbps"] = case["bytes"] / case["ms"] / 1e6
        case["copy_gbps"] = copy_gbps(case["bytes"])
        case["pct_of_copy"] = 100 * case["gbps"] / case["copy_gbps"]
        if has_torch:
            tdtype = torch.float32 if case["dtype"] == "float32" else torch.bfloat16
            tx = torch.as_tensor(x32, device="cuda").to(tdtype).requires_grad_(True)
            ty = torch.as_tensor(y, device="cuda")

            def torch_step():
                tx.grad = None
                F.cross_entropy(tx, ty).backward()

            case["torch_ms"] = _median_ms(torch_step, args.warmup, args.iters, _TorchEvents(torch))
            case["torch_ratio"] = case["torch_ms"] / case["ms"]
            try:   # the one-line swap: gpuloss.torch.cross_entropy in the same training step
                import gpuloss.torch as gt

                def module_step():
                    tx.grad = None
                    gt.cross_entropy(tx, ty).backward()
                case["torch_module_ms"] = _median_ms(module_step, args.warmup, args.iters, _TorchEvents(torch))
                case["torch_module_ratio"] = case["torch_ms"] / case["torch_module_ms"]
            except Exception as exc:
                results["notes"].append(f"gpuloss.torch failed on {case['shape']} {case['dtype']}: {exc}")
            if liger_cross_entropy is not None:
                def liger_step():
                    tx.grad = None
                    liger_cross_entropy(tx, ty).backward()
                try:
                    case["liger_ms"] = _median_ms(liger_step, args.warmup, args.iters, _TorchEvents(torch))
                    case["liger_ratio"] = case["liger_ms"] / case["ms"]
                except Exception as exc:
                    results["notes"].append(f"liger failed on {case['shape']} {case['dtype']}: {exc}")
            del tx, ty
        del x32, y
        cp.get_default_memory_pool().free_all_blocks()
        print(f"xent {case['shape']} {case['dtype']}: {case['ms']:.3f} ms, {case['gbps']:.0f} GB/s "
              f"({case['pct_of_copy']:.0f}% of copy), torch x{_fmt(case.get('torch_ratio'), '.2f')}", flush=True)

    n = args.elementwise_n
    a = cp.asarray(rng.random(n, dtype=np.float32) * 0.98 + 0.01)
    b = cp.asarray((rng.random(n, dtype=np.float32) < 0.5).astype(np.float32))
    for case in results["elementwise"]:
        fn = getattr(gl, case["loss"])
        case["ms"] = _median_ms(lambda: fn(a, b, return_grad=True), args.warmup, args.iters, ev)
        case["gbps"] = case["bytes"] / case["ms"] / 1e6
        case["copy_gbps"] = copy_gbps(case["bytes"])
        case["pct_of_copy"] = 100 * case["gbps"] / case["copy_gbps"]
        if has_torch and case["loss"] in TORCH_ELEMENTWISE:
            ta = torch.as_tensor(a, device="cuda").requires_grad_(True)
            tb = torch.as_tensor(b, device="cuda")
            tfn = getattr(F, TORCH_ELEMENTWISE[case["loss"]])

            def torch_step():
                ta.grad = None
                tfn(ta, tb).backward()

            case["torch_ms"] = _median_ms(torch_step, args.warmup, args.iters, _TorchEvents(torch))
            case["torch_ratio"] = case["torch_ms"] / case["ms"]
        print(f"{case['loss']}: {case['ms']:.3f} ms, {case['gbps']:.0f} GB/s ({case['pct_of_copy']:.0f}% of copy)",
              flush=True)


def _device_name() -> str:
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {"date": _dt.date.today().isoformat(), "dry_run": bool(args.dry_run), "iters": args.iters,
               "warmup": args.warmup, "versions": _versions(), "python": platform.python_version(),
               "cross_entropy": xent_cases(), "elementwise": elementwise_cases(args.elementwise_n),
               "copy_gbps": None, "tests": None, "notes": []}
    for c in results["cross_entropy"]:
        assert len(c["shape"]) == 2 and c["bytes"] > 0
    if args.dry_run:
        results["device"] = "dry-run"
        results["notes"].append(_check_bf16_fallback())
        # the writer, exercised into the requested folder (a temp dir unless given)
        out_dir = args.results_dir or Path(tempfile.mkdtemp(prefix="gpuloss-gpu-suite-"))
        json_path, md_path = write_results(results, out_dir)
        print(f"dry run: {len(results['cross_entropy'])} cross-entropy cases, {len(results['elementwise'])} "
              f"element-wise cases; wrote {json_path} and {md_path}")
        return 0
    results["device"] = _device_name()
    rc = 0
    if not args.skip_tests:
        results["tests"] = run_tests(args.pytest_args)
        rc = results["tests"]["returncode"]
    if not args.skip_bench:
        try:
            run_benchmarks(args, results)
        except Exception as exc:  # keep what was measured
            results["notes"].append(f"benchmarks stopped: {exc.__class__.__name__}: {exc}")
            rc = rc or 1
    json_path, md_path = write_results(results, args.results_dir or ROOT / "bench" / "results")
    print(f"wrote {json_path} and {md_path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
