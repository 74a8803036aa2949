"""The emulated backend's runtime: kernels/emulator/ and gpuloss/backends/emulated.py.

Tests the machinery that runs CUDA C on CPU threads (barriers, warp
intrinsics, indexing, atomics, argument packing, the build cache, failure
reports and the sanitizer proofs of docs/design.md §7.3) with the small kernels of
tests/kernels/, not any loss. Every launch here is at most 256 threads per
block and a few blocks: emulated threads are OS threads.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from gpuloss.backends import emulated
from gpuloss.backends.emulated import (EmulatedModule, EmulatorBuildError, EmulatorLaunchError,
                                       KernelNotFoundError, run_sanitized)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated backend needs g++")

KERNELS = Path(__file__).resolve().parent / "kernels"
SELFTEST = KERNELS / "emu_selftest.cu"
RACY = KERNELS / "racy.cu"


@pytest.fixture(scope="module")
def mod() -> EmulatedModule:
    return EmulatedModule([SELFTEST])


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


# ---------------------------------------------------------------------------
# Barriers and shared memory.

def tree_sum_reference(x: np.ndarray, block: int) -> np.ndarray:
    """The kernel's reduction tree, level by level in NumPy: bitwise the same sums."""
    nblocks = -(-x.size // block)
    buf = np.zeros(nblocks * block, x.dtype)
    buf[:x.size] = x
    buf = buf.reshape(nblocks, block)
    s = block // 2
    while s:
        buf[:, :s] = buf[:, :s] + buf[:, s:2 * s]
        s //= 2
    return buf[:, 0].copy()


@pytest.mark.parametrize("dtype,block", [(np.float32, 256), (np.float64, 64), (np.float32, 32)])
def test_block_tree_reduction_in_shared_memory(mod, rng, dtype, block):
    n = 5 * block - 3  # a ragged last block
    x = rng.standard_normal(n).astype(dtype)
    out = np.full(5, np.nan, dtype)
    sfx = "f32" if dtype == np.float32 else "f64"
    mod.get_function(f"emu_tree_sum_{sfx}")((5,), (block,), (x, out, np.int32(n)))
    np.testing.assert_array_equal(out, tree_sum_reference(x, block))


# ---------------------------------------------------------------------------
# Warp intrinsics.

def warp_ops_reference(x: np.ndarray, src: int, width: int) -> np.ndarray:
    """The five rows of emu_warp_ops, computed per warp in NumPy with CUDA's shuffle rules."""
    w = x.reshape(-1, 32)
    lane = np.arange(32)
    a = w.copy()
    for o in (16, 8, 4, 2, 1):
        a = a + a[:, lane ^ o]
    d = w.copy()
    for o in (16, 8, 4, 2, 1):
        srcl = np.where(lane + o < 32, lane + o, lane)  # out of range: the lane's own value
        d = d + d[:, srcl]
    s = w.copy()
    for o in (1, 2, 4, 8, 16):
        u = s[:, np.maximum(lane - o, 0)]
        s = np.where(lane >= o, s + u, s)
    b = np.repeat(w[:, src:src + 1], 32, axis=1)
    seg = w.copy()
    o = width // 2
    while o:
        seg = seg + seg[:, lane ^ o]
        o //= 2
    return np.stack([a.ravel(), d.ravel(), s.ravel(), b.ravel(), seg.ravel()])


@pytest.mark.parametrize("sfx,dtype", [("f32", np.float32), ("f64", np.float64), ("i32", np.int32),
                                       ("u32", np.uint32), ("i64", np.int64)])
def test_warp_shuffles_match_numpy(mod, rng, sfx, dtype):
    blocks, block = 2, 96
    n = blocks * block
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal(n).astype(dtype)
    else:
        x = rng.integers(0, 1000, n).astype(dtype)
    out = np.zeros((5, n), dtype)
    mod.get_function(f"emu_warp_ops_{sfx}")((blocks,), (block,), (x, out, np.int32(7), np.int32(8)))
    np.testing.assert_array_equal(out, warp_ops_reference(x, 7, 8))


def test_votes_and_block_counts_in_a_partial_warp(mod, rng):
    block = 40  # warp 1 has lanes 0-7 only
    x = rng.integers(0, 2, 2 * block).astype(np.int32)
    x[:32] = 1  # block 0, warp 0: all true
    out = np.zeros((7, 2 * block), np.uint32)
    mod.get_function("emu_votes")((2,), (block,), (x, out))
    for b in range(2):
        for t in range(block):
            i, w = b * block + t, t // 32
            lanes = range(w * 32, min(w * 32 + 32, block))
            ballot = sum(1 << (u - w * 32) for u in lanes if x[b * block + u])
            assert out[0, i] == ballot
            assert out[1, i] == (ballot != 0)
            assert out[2, i] == all(x[b * block + u] for u in lanes)
            assert out[3, i] == (1 << len(lanes)) - 1
            count = int(np.count_nonzero(x[b * block:(b + 1) * block]))
            assert (out[4, i], out[5, i], out[6, i]) == (count, count > 0, count == block)


def test_disjoint_partial_masks_and_syncwarp(mod):
    x = np.arange(128, dtype=np.int32)
    out = np.zeros(128, np.int32)
    mod.get_function("emu_half_warps")((2,), (64,), (x, out))
    w = x.reshape(-1, 32)
    lane = np.arange(32)
    src = np.where(lane < 16, (lane + 1) % 16, 16 + (lane + 1) % 16)
    v = w[:, src]
    np.testing.assert_array_equal(out, (v + v[:, lane ^ 16]).ravel())


# ---------------------------------------------------------------------------
# Grids and indexing.

@pytest.mark.parametrize("grid,block", [((3,), (32,)), ((2, 3), (8, 4)), ((2, 2, 3), (4, 2, 3))])
def test_multi_block_grid_coordinates(mod, grid, block):
    g3 = tuple(grid) + (1,) * (3 - len(grid))
    b3 = tuple(block) + (1,) * (3 - len(block))
    total = int(np.prod(g3) * np.prod(b3))
    out = np.full((total, 6), -1, np.int32)
    mod.get_function("emu_coords")(grid, block, (out,))
    expected = np.array([(bx, by, bz, tx, ty, tz)
                         for bz in range(g3[2]) for by in range(g3[1]) for bx in range(g3[0])
                         for tz in range(b3[2]) for ty in range(b3[1]) for tx in range(b3[0])], np.int32)
    np.testing.assert_array_equal(out, expected)


def test_2d_indexing_with_a_strided_view(mod, rng):
    base = rng.standard_normal((19, 40)).astype(np.float32)
    x = base[:, :37]  # non-contiguous: the kernel indexes with the row stride itself
    y = np.zeros_like(base)
    ld = np.int64(base.strides[0] // base.itemsize)
    mod.get_function("emu_matrix_2d")((3, 5), (16, 4), (x, y, np.int32(19), np.int32(37), ld))
    np.testing.assert_array_equal(y[:, :37], 2 * x + np.arange(19, dtype=np.float32)[:, None])
    assert not y[:, 37:].any()


def test_int_and_single_tuple_dims_are_accepted(mod):
    out = np.full((4 * 32, 6), -1, np.int32)
    mod.get_function("emu_coords")(4, 32, (out,))
    assert out[:, 3].tolist() == list(range(32)) * 4


def test_early_returning_threads_do_not_deadlock(mod):
    block, active = 96, 50  # warp 1 is half exited, warp 2 wholly
    x = np.arange(2 * block, dtype=np.int32)
    out = np.full(2 * block, -1, np.int32)
    t0 = time.perf_counter()
    mod.get_function("emu_early_exit")((2,), (block,), (x, out, np.int32(active)))
    assert time.perf_counter() - t0 < 10
    for b in range(2):
        for t in range(block):
            got = out[b * block + t]
            if t >= active:
                assert got == -1
            else:
                live = min(32, active - (t // 32) * 32)
                assert got == x[b * block + (t + 1) % active] + live


# ---------------------------------------------------------------------------
# Atomics.

def test_atomics(mod, rng):
    blocks, block = 3, 128
    n = blocks * block
    x = rng.integers(-50, 50, n).astype(np.int32)
    counters = np.array([0, -(2**31), 2**31 - 1, 0, 0, 0, 0, 0], np.int32)
    ucounters = np.array([0, 0, 0, 0, 0xFFFFFFFF, 0, 0, 0], np.uint32)
    big = np.zeros(1, np.uint64)
    fsum, dsum, fmax = np.zeros(1, np.float32), np.zeros(1, np.float64), np.full(1, -1e30, np.float32)
    mod.get_function("emu_atomics")((blocks,), (block,), (x, counters, ucounters, big, fsum, dsum, fmax))
    assert counters[0] == x.sum() and counters[1] == x.max() and counters[2] == x.min()
    assert ucounters[3] == 0xFFFFFFFF and ucounters[4] == 0
    xor = 0
    for i in range(n):
        xor ^= 1 << (i % 7)
    assert ucounters[5] == xor
    assert ucounters[6] == n % 10  # atomicInc wraps to 0 after 9
    assert counters[7] == 7
    assert big[0] == np.uint64(int(x.astype(np.int64).sum()) % 2**64)
    assert fsum[0] == x.sum() and dsum[0] == x.sum() and fmax[0] == x.max()


# ---------------------------------------------------------------------------
# Arguments.

def test_every_scalar_type_is_packed_exactly(mod):
    ints = np.zeros(4, np.int64)
    uints = np.zeros(5, np.uint64)
    floats = np.zeros(2, np.float64)
    args = (np.int8(-128), np.uint8(255), np.int16(-32768), np.uint16(65535), np.int32(-(2**31)),
            np.uint32(2**32 - 1), np.int64(-(2**63)), np.uint64(2**64 - 1), np.float32(1.0 / 3.0),
            np.float64(np.pi), np.bool_(True), ints, uints, floats)
    mod.get_function("emu_echo")(1, 32, args)
    assert ints.tolist() == [-128, -32768, -(2**31), -(2**63)]
    assert uints.tolist() == [255, 65535, 2**32 - 1, 2**64 - 1, 1]
    assert floats[0] == np.float64(np.float32(1.0 / 3.0)) and floats[1] == np.pi
    mod.get_function("emu_echo")(1, 1, args[:10] + (np.bool_(False),) + args[11:])
    assert uints[4] == 0


def test_plain_python_numbers_are_refused_with_the_position(mod):
    out = np.zeros(4, np.float32)
    k = mod.get_function("emu_tree_sum_f32")
    with pytest.raises(TypeError, match=r"argument 2 is a plain Python int .*np\.int32\(4\)"):
        k(1, 32, (out, out, 4))
    with pytest.raises(TypeError, match=r"argument 2: .*int \(np\.int32\), got np\.int64"):
        k(1, 32, (out, out, np.int64(4)))
    with pytest.raises(TypeError, match=r"argument 0: .*4-byte elements.*float64"):
        k(1, 32, (out.astype(np.float64), out, np.int32(4)))
    with pytest.raises(TypeError, match=r"takes 3 arguments"):
        k(1, 32, (out, out))
    with pytest.raises(TypeError, match=r"argument 1: .*got list"):
        k(1, 32, (out, [1.0], np.int32(1)))


def test_none_is_a_null_pointer(mod):
    out = np.zeros(32, np.float32)
    mod.get_function("emu_nullable")(1, 32, (None, out))
    assert (out == -1).all()
    src = np.arange(32, dtype=np.float32)
    mod.get_function("emu_nullable")(1, 32, (src, out))
    np.testing.assert_array_equal(out, src)


def test_dynamic_shared_memory(mod):
    x = np.arange(3 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    mod.get_function("emu_dynamic_shared")(3, 64, (x, y), shared_mem=64 * 4)
    np.testing.assert_array_equal(y, x.reshape(3, 64)[:, ::-1].ravel())


def test_unknown_kernel_and_bad_launch_shapes(mod):
    with pytest.raises(KernelNotFoundError, match=r"emu_tree_sum_f16.*did you mean"):
        mod.get_function("emu_tree_sum_f16")
    k = mod.get_function("emu_coords")
    out = np.zeros(6 * 2048, np.int32)
    with pytest.raises(EmulatorLaunchError, match=r"invalid block \(2048,1,1\)"):
        k(1, 2048, (out,))
    with pytest.raises(EmulatorLaunchError, match=r"invalid block \(32,32,2\)"):
        k(1, (32, 32, 2), (out,))
    with pytest.raises(EmulatorLaunchError, match=r"invalid grid \(0,1,1\)"):
        k(0, 32, (out,))
    with pytest.raises(TypeError, match="grid must be"):
        k((1, 1, 1, 1), 32, (out,))
    assert "emu_coords" in mod.names() and mod.signature("emu_coords") == ("*i4",)


# ---------------------------------------------------------------------------
# Failures are reported, never hung.

def test_divergent_barrier_is_reported_as_deadlock(mod):
    with pytest.raises(EmulatorLaunchError, match=r"emu_broken: deadlock in block \(0,0,0\)"):
        mod.get_function("emu_broken")(2, 64, (np.int32(0),))


def test_trap_names_block_and_thread_and_the_module_stays_usable(mod):
    with pytest.raises(EmulatorLaunchError, match=r"__trap\(\) called in block \(1,0,0\) thread \(5,0,0\)"):
        mod.get_function("emu_broken")(3, 64, (np.int32(1),))
    out = np.zeros(6 * 32, np.int32)
    mod.get_function("emu_coords")(1, 32, (out,))
    assert out.reshape(32, 6)[:, 3].tolist() == list(range(32))


# ---------------------------------------------------------------------------
# Determinism.

def test_bitwise_identical_across_runs(mod, rng):
    x = rng.standard_normal(4 * 256).astype(np.float32)
    results = []
    for _ in range(3):
        sums = np.zeros(4, np.float32)
        warps = np.zeros((5, 4 * 256), np.float32)
        mod.get_function("emu_tree_sum_f32")(4, 256, (x, sums, np.int32(x.size)))
        mod.get_function("emu_warp_ops_f32")(4, 256, (x, warps, np.int32(3), np.int32(16)))
        results.append(sums.tobytes() + warps.tobytes())
    assert results[0] == results[1] == results[2]


# ---------------------------------------------------------------------------
# Build cache.

def test_cache_reuses_a_build_and_rebuilds_on_change(tmp_path):
    src = tmp_path / "k.cu"
    text = ("#ifndef GPULOSS_REGISTER\n#define GPULOSS_REGISTER(name)\n#endif\n"
            'extern "C" __global__ void cache_probe(int* out) { out[threadIdx.x] = VALUE; }\n'
            "GPULOSS_REGISTER(cache_probe)\n")
    src.write_text(text.replace("VALUE", "1"))
    cache = tmp_path / "cache"
    first = EmulatedModule([src], cache=cache)
    second = EmulatedModule([src], cache=cache)
    assert first.compiled and not second.compiled and first.path == second.path
    assert len(list(cache.glob("*.so"))) == 1
    src.write_text(text.replace("VALUE", "2"))
    third = EmulatedModule([src], cache=cache)
    assert third.compiled and third.path != first.path
    out = np.zeros(4, np.int32)
    third.get_function("cache_probe")(1, 4, (out,))
    assert out.tolist() == [2] * 4
    first.get_function("cache_probe")(1, 4, (out,))  # the old library stays loaded and intact
    assert out.tolist() == [1] * 4
    flagged = EmulatedModule([src], extra_flags=("-O1",), cache=cache)
    assert flagged.compiled and flagged.path != third.path
    assert not list(cache.glob("build-*")) and not list(cache.glob("*.tmp*"))  # no temporaries left


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GPULOSS_CACHE_DIR", str(tmp_path / "c"))
    assert emulated.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GPULOSS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert emulated.cache_dir() == tmp_path / "x" / "gpuloss" / "emulator"


def test_compile_error_carries_the_compiler_message(tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text('extern "C" __global__ void broken(int* out) { out[0] = undeclared_name; }\n')
    with pytest.raises(EmulatorBuildError, match=r"(?s)broken\.cu:1.*undeclared_name"):
        EmulatedModule([src], cache=tmp_path / "cache")


def test_same_helper_name_in_two_files_does_not_merge(tmp_path):
    # Each file is its own unnamed namespace, as each is its own NVRTC module.
    for name, value in (("a", 1), ("b", 2)):
        (tmp_path / f"{name}.cu").write_text(
            "#ifndef GPULOSS_REGISTER\n#define GPULOSS_REGISTER(name)\n#endif\n"
            f"__device__ __forceinline__ int helper() {{ return {value}; }}\n"
            f'extern "C" __global__ void probe_{name}(int* out) {{ out[0] = helper(); }}\n'
            f"GPULOSS_REGISTER(probe_{name})\n")
    m = EmulatedModule([tmp_path / "a.cu", tmp_path / "b.cu"], cache=tmp_path / "cache")
    out = np.zeros(1, np.int32)
    m.get_function("probe_a")(1, 1, (out,))
    assert out[0] == 1
    m.get_function("probe_b")(1, 1, (out,))
    assert out[0] == 2


def test_duplicate_entry_names_are_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.cu").write_text(
            'extern "C" __global__ void twice(int* out) { out[0] = 1; }\nGPULOSS_REGISTER(twice)\n')
    # g++ keeps extern "C" names external even in an unnamed namespace, so the
    # linker refuses first; the registry's own check backs it up.
    with pytest.raises(EmulatorBuildError, match=r"multiple definition of .twice|kernel twice is defined twice"):
        EmulatedModule([tmp_path / "a.cu", tmp_path / "b.cu"], cache=tmp_path / "cache")


@pytest.mark.slow
def test_sanitized_build_refuses_to_load_without_its_runtime(tmp_path):
    with pytest.raises(RuntimeError, match="LD_PRELOAD=.*libtsan"):
        EmulatedModule([RACY], sanitize="thread")
    with pytest.raises(ValueError, match="sanitize must be"):
        EmulatedModule([RACY], sanitize="memory")


# ---------------------------------------------------------------------------
# Sanitizer proofs (docs/design.md §7.3). A subprocess per run: TSan/ASan must be
# preloaded before the interpreter starts, which run_sanitized arranges.

_SHIFT = """
import numpy as np
from gpuloss.backends.emulated import EmulatedModule
m = EmulatedModule([{src!r}], sanitize={san!r})
# 5 blocks of 256 threads; x holds `5 * 256 - short` elements, so with short=1
# the last thread's x[n] is one element past the allocation.
x = np.arange(5 * 256 - {short}, dtype=np.float32)
y = np.zeros(5 * 256, np.float32)
m.get_function({kernel!r})((5,), (256,), (x, y, np.int32(x.size)))
print("done")
"""


def _shift(kernel: str, san: str, short: int = 0) -> str:
    return _SHIFT.format(src=str(RACY), san=san, kernel=kernel, short=short)


@pytest.mark.slow
def test_tsan_reports_missing_syncthreads_as_a_data_race():
    run = run_sanitized(_shift("racy_shift_unsynced", "thread"), "thread", sources=[RACY])
    assert "data race" in run.reports, str(run)
    assert "done" in run.stdout  # halt_on_error=0: the report, not a crash
    assert "racy.cu" in run.stderr  # the report points into the kernel source


@pytest.mark.slow
def test_tsan_is_silent_when_the_barrier_is_there():
    run = run_sanitized(_shift("racy_shift_synced", "thread"), "thread", sources=[RACY])
    assert run.ok, str(run)
    assert "done" in run.stdout


@pytest.mark.slow
def test_asan_reports_a_read_past_the_end():
    run = run_sanitized(_shift("racy_read_past_end", "address", short=1), "address", sources=[RACY])
    assert "heap-buffer-overflow" in run.reports, str(run)
    assert "racy.cu" in run.stderr


@pytest.mark.slow
def test_asan_is_silent_on_a_correct_kernel():
    run = run_sanitized(_shift("racy_shift_synced", "address"), "address", sources=[RACY])
    assert run.ok, str(run)


# ---------------------------------------------------------------------------
# The test kernels are real CUDA C: the same text builds under NVRTC.

@pytest.mark.parametrize("src", [SELFTEST, RACY], ids=lambda p: p.name)
def test_test_kernels_also_compile_with_nvrtc(src):
    nvrtc = pytest.importorskip("gpuloss.nvrtc")
    try:
        nvrtc.version()
    except Exception as exc:  # no libnvrtc on this machine
        pytest.skip(f"NVRTC unavailable: {exc}")
    nvrtc.compile_file(src, "sm_80")
