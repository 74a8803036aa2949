"""The benchmark machinery (gpuloss bench) on tiny shapes: it measures, compares and writes results.
Timings themselves are never asserted."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpuloss import benchmark


@pytest.fixture
def tiny_report():
    torch = benchmark._torch()
    report = benchmark.Report(machine="test machine", date="2026-01-01", command="pytest", backend="cpu", threads=1,
                              copy_gbps=1.0, versions={})
    report.rows.append(benchmark.bench_cross_entropy((64, 100), np.float32, 2, torch, "cpu"))
    report.rows.append(benchmark.bench_cross_entropy((64, 100), np.float32, 2, torch, "cpu", forward_only=True))
    report.rows.append(benchmark.bench_elementwise("huber", 4096, 2, torch, "cpu"))
    return report


def test_16bit_cross_entropy_rows_time_against_torch_and_the_floor():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays come from ml_dtypes")
    torch = benchmark._torch()
    for dtype in (np.float16, ml_dtypes.bfloat16):
        row = benchmark.bench_cross_entropy((64, 100), dtype, 2, torch, "cpu")
        assert row.dtype == np.dtype(dtype).name and row.bytes_moved == 2 * 64 * 100 * 2 + 64 * 8
        assert row.floor_ms > 0 and (torch is None or row.torch_ms > 0)


def test_rows_carry_times_ratios_and_floor(tiny_report):
    fwd_bwd, fwd, huber = tiny_report.rows
    assert fwd_bwd.gpuloss_ms > 0 and fwd_bwd.floor_ms > 0 and fwd_bwd.vs_floor > 0
    assert fwd_bwd.bytes_moved == 2 * 64 * 100 * 4 + 64 * 8
    assert fwd.floor_ms is None and fwd.bytes_moved == 64 * 100 * 4 + 64 * 8
    if benchmark._torch() is not None:
        assert fwd_bwd.torch_ms > 0 and fwd_bwd.speedup_vs_torch == pytest.approx(fwd_bwd.torch_ms / fwd_bwd.gpuloss_ms)
    assert huber.shape == (1024, 4)


def test_results_are_written_as_json_markdown_and_plot(tiny_report, tmp_path):
    paths = benchmark.write_results(tiny_report, tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["machine"] == "test machine" and len(data["rows"]) == 3
    md = paths[1].read_text()
    assert "| softmax_cross_entropy fwd+bwd | (64, 100) | float32 |" in md and "test machine" in md
    if any(p.suffix == ".png" for p in paths):
        assert (tmp_path / paths[-1].name).stat().st_size > 1000


def test_copy_bandwidth_is_positive():
    assert benchmark.copy_bandwidth_gbps(nbytes=1 << 22, repeats=2) > 0


@pytest.mark.slow
def test_first_call_cost_is_measured_cold_and_warm():
    cold, warm = benchmark.first_call_seconds()
    assert cold > 0 and warm > 0
