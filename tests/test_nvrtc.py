"""NVRTC binding, kernel resource table, and common.cuh's host-side numerics.

Four groups:
* every kernels/*.cu compiles with NVRTC for sm_70 / sm_80 / sm_90, the
  ptxas report parses, and sm_90 has no spills (docs/design.md §3.1: zero spills);
  each (file, arch) is compiled once per run (nvrtc.compile_file keeps its
  results), and every test here that needs one shares it;
* the source text NVRTC and CuPy are handed carries a digest of every
  included header, so a header-only edit is a new source to CuPy's cache;
* ``gpuloss kernels`` prints every entry point and fails on a compile error;
* common.cuh compiled for the HOST with g++ (its bit paths are what the
  emulator and the GPU's cvt instructions must agree with): float16 and
  bfloat16 conversions against NumPy / ml_dtypes / exact rationals, and the
  online-softmax combine against a float64 logsumexp.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from gpuloss import kernel_table, nvrtc
from gpuloss._paths import device_source, headers_digest, included_files, kernel_sources, kernels_dir

ARCHS = ("sm_70", "sm_80", "sm_90")
# The shipped kernels, and the test-only selftest.cu (tests/kernels/) that exercises common.cuh.
SELFTEST = Path(__file__).resolve().parent / "kernels" / "selftest.cu"
SOURCES = kernel_sources() + [SELFTEST]


def _nvrtc_available() -> bool:
    try:
        nvrtc.version()
    except nvrtc.NvrtcError:
        return False
    return True


needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(),
                                 reason="NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12)")


VERBOSE = ("-Xptxas=-v",)  # what kernel_table and file_resources compile with: the same cache entry


def _compiled(path: Path, arch: str) -> nvrtc.CompileResult:
    """A kernel file as `gpuloss kernels` compiles it; compile_file keeps each result, so
    this compiles a (file, arch) once per run, shared by every test and the CLI's table."""
    # selftest.cu lives in tests/kernels and includes kernels/common.cuh; the shipped files are compiled
    # exactly as kernel_table compiles them (the same cache entry).
    return nvrtc.compile_file(path, arch, VERBOSE, include_dirs=[kernels_dir()] if path == SELFTEST else None)


def _skip_unsupported(arch: str) -> None:
    supported = nvrtc.supported_archs()
    if supported and arch not in supported:  # CUDA 13's NVRTC dropped sm_70
        pytest.skip(f"this NVRTC ({nvrtc.version()}) does not build {arch}")


# --------------------------------------------------------------------------------------
# The binding


@needs_nvrtc
def test_library_and_version():
    major, minor = nvrtc.version()
    assert major >= 12 and minor >= 0
    assert "nvrtc" in Path(nvrtc.library_path()).name
    assert "sm_90" in nvrtc.supported_archs()


def test_missing_library_names_the_wheel(monkeypatch):
    monkeypatch.setattr(nvrtc, "_lib", None)
    monkeypatch.setattr(nvrtc, "_wheel_candidates", lambda: [])
    monkeypatch.setattr(nvrtc, "_toolkit_candidates", lambda: ["/nonexistent/libnvrtc.so.12"])
    monkeypatch.delenv("GPULOSS_NVRTC", raising=False)
    with pytest.raises(nvrtc.NvrtcError, match="pip install nvidia-cuda-nvrtc-cu12"):
        nvrtc.version()


@needs_nvrtc
def test_compile_error_raises_with_full_log():
    src = '#include "common.cuh"\nextern "C" __global__ void broken(float* x) {\n  x[0] = undeclared_name;\n}\n'
    with pytest.raises(nvrtc.NvrtcError) as info:
        nvrtc.compile(src, "broken.cu", "sm_90")
    err = info.value
    assert err.code == "NVRTC_ERROR_COMPILATION"
    assert "broken.cu(3)" in err.log and "undeclared_name" in err.log
    assert err.log.strip() in str(err)  # the message carries the whole log


@needs_nvrtc
def test_invalid_arch_is_an_nvrtc_error():
    with pytest.raises(nvrtc.NvrtcError, match="INVALID_OPTION"):
        nvrtc.compile('extern "C" __global__ void k() {}', "k.cu", "sm_9")
    with pytest.raises(ValueError, match="sm_90"):
        nvrtc.compile('extern "C" __global__ void k() {}', "k.cu", "compute_90")


@needs_nvrtc
def test_compile_returns_cubin_ptx_and_entries():
    res = nvrtc.compile('#include "common.cuh"\n'
                        'extern "C" __global__ void k(float* x) { x[0] = gl::pos_inf<float>(); }\n'
                        'GPULOSS_REGISTER(k);\n', "k.cu", "sm_80")
    assert res.cubin[:4] == b"\x7fELF"
    assert res.entry_points == ("k",)
    assert res.arch == "sm_80" and "-arch=sm_80" in res.options
    assert "2139095040" in res.ptx  # +inf (0x7f800000) built from bits folds to a constant


# --------------------------------------------------------------------------------------
# Every kernel file, every arch


def test_there_are_kernel_sources():
    assert {"xent.cu", "elementwise.cu", "reduce.cu"} <= {p.name for p in kernel_sources()}
    # test-only device code stays out of the package
    assert SELFTEST.is_file() and all(p.name != "selftest.cu" for p in kernel_sources())


@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_kernel_compiles_and_reports_resources(path, arch):
    _skip_unsupported(arch)
    res = _compiled(path, arch)
    assert res.cubin[:4] == b"\x7fELF"
    assert res.entry_points, f"{path.name} declares no extern \"C\" __global__ entry point"
    rows = nvrtc.resources_from_result(res)
    assert [r.kernel for r in rows] == sorted(res.entry_points)
    for r in rows:
        assert r.registers > 0, r
        assert r.arch == arch and r.source == path.name
    # docs/design.md §3.1: entry points are found by plain names with a dtype suffix.
    text = path.read_text()
    for name in res.entry_points:
        assert "GPULOSS_REGISTER" in text, f"{path.name}: entry points must be registered for the emulator"
        assert "_" in name


@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_spills(path, arch):
    _skip_unsupported(arch)
    res = _compiled(path, arch)
    entries, functions = nvrtc.parse_ptxas_log(res.log)
    spilled = {name: f for name, f in functions.items() if f["spill_stores"] or f["spill_loads"]}
    assert not spilled, f"{path.name} spills at {arch} (docs/design.md §3.1: zero spills is the rule): {spilled}"
    assert set(entries) == set(res.entry_points)


@pytest.mark.slow
@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_cross_entropy_registers_fit_the_launch_sizes(arch):
    """gpuloss/backends/launch.py gives the row kernels (one row or one slice per block) at most
    512 threads and the others at most 256: their registers must fit an SM's 64K at that size, and
    the uncached 16/32-bit row kernel must let two 512-thread blocks share an SM (64 registers;
    bfloat16 before sm_80 excepted: it converts in software)."""
    from gpuloss.backends import launch

    _skip_unsupported(arch)
    path = next(p for p in kernel_sources() if p.name == "xent.cu")
    rows = nvrtc.resources_from_result(_compiled(path, arch))
    assert rows
    for r in rows:
        row_kernel = r.kernel.startswith(("xent_fwd_bwd_", "xent_cached_fwd_bwd_", "xent_split_"))
        threads = launch.ROW_BLOCK_MAX if row_kernel else launch.MAX_THREADS
        assert r.registers * threads <= 65536, r
        if r.kernel.startswith("xent_fwd_bwd_") and not r.kernel.endswith("_f64"):
            if not (arch == "sm_70" and "bf16" in r.kernel):
                assert r.registers <= 64, r


def test_parse_ptxas_log_formats():
    # CUDA 12.9 style (barriers, cumulative stack), an older style (cmem, no
    # barriers), and a non-inlined device function with its own frame.
    log = """nvrtc: warning: Architectures prior to '<compute/sm>_75' are deprecated
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'a_f32' for 'sm_90'
ptxas info    : Function properties for a_f32
ptxas         .     320 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 320 bytes cumulative stack size
ptxas info    : Function properties for _Z6helperf
ptxas         .     16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compile time = 19.755 ms
ptxas info    : Compiling entry function 'b_f64' for 'sm_70'
ptxas info    : Function properties for b_f64
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, 1024 bytes smem, 364 bytes cmem[0]
"""
    entries, functions = nvrtc.parse_ptxas_log(log)
    assert entries["a_f32"] == {"registers": 40, "barriers": 1, "shared_bytes": 256, "constant_bytes": 0,
                                "cumulative_stack_bytes": 320, "stack_bytes": 320, "spill_stores": 8,
                                "spill_loads": 12}
    assert entries["b_f64"]["registers"] == 10 and entries["b_f64"]["shared_bytes"] == 1024
    assert entries["b_f64"]["constant_bytes"] == 364 and entries["b_f64"]["barriers"] == 0
    assert functions["_Z6helperf"] == {"stack_bytes": 16, "spill_stores": 4, "spill_loads": 4}


@needs_nvrtc
def test_missing_verbose_report_is_loud():
    res = nvrtc.compile('extern "C" __global__ void k_f32(float* x) { x[0] = 1.f; }', "k.cu", "sm_90")
    with pytest.raises(nvrtc.NvrtcError, match="no resource usage"):
        nvrtc.resources_from_result(res)


@needs_nvrtc
def test_compile_file_compiles_once_and_again_after_a_header_edit(tmp_path, monkeypatch):
    header = tmp_path / "value.cuh"
    header.write_text("#define VALUE 1.f\n")
    src = tmp_path / "k.cu"
    src.write_text('#include "value.cuh"\nextern "C" __global__ void k_f32(float* x) { x[0] = VALUE; }\n')
    calls = []
    real = nvrtc.compile
    monkeypatch.setattr(nvrtc, "compile", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    first = nvrtc.compile_file(src, "sm_80")
    assert nvrtc.compile_file(src, "sm_80") is first and calls == ["sm_80"]
    nvrtc.compile_file(src, "sm_90")
    nvrtc.compile_file(src, "sm_80", VERBOSE)
    assert calls == ["sm_80", "sm_90", "sm_80"]  # another arch or options: another compile
    header.write_text("#define VALUE 2.f\n")    # the .cu file itself is unchanged
    edited = nvrtc.compile_file(src, "sm_80")
    assert calls == ["sm_80", "sm_90", "sm_80", "sm_80"]
    assert "1065353216" in first.ptx and "1073741824" in edited.ptx  # the bits of 1.0f, then of 2.0f


@needs_nvrtc
def test_a_failed_compile_is_not_kept(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text('extern "C" __global__ void k_f32(float* x) { x[0] = nope; }\n')
    with pytest.raises(nvrtc.NvrtcError):
        nvrtc.compile_file(src, "sm_90")
    src.write_text('extern "C" __global__ void k_f32(float* x) { x[0] = 1.f; }\n')
    assert nvrtc.compile_file(src, "sm_90").entry_points == ("k_f32",)


# --------------------------------------------------------------------------------------
# The source text every compiler gets: CuPy's cache keys on it, so it must change
# when any header it includes does.


def _kernels_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "kernels"
    shutil.copytree(kernels_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_included_files_are_found_through_nested_includes(tmp_path):
    inc = tmp_path / "inc"
    (inc / "sub").mkdir(parents=True)
    (tmp_path / "a.cuh").write_text('#include "sub/b.cuh"\n  #  include <c.cuh>\n#include <cstdint>\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.cuh").write_text('#include "d.cuh"\n#include "a.cuh"\n')  # d beside b; a cycle
    (tmp_path / "sub" / "d.cuh").write_text("")
    (inc / "c.cuh").write_text('#include "sub/e.cuh"\n')                        # e beside c, in inc/
    (inc / "sub" / "e.cuh").write_text("")
    (inc / "unused.cuh").write_text("")
    src = tmp_path / "k.cu"
    src.write_text('// #include "a.cuh" in a comment counts too: only ever a spare rebuild\n#include "a.cuh"\n')
    got = {p.relative_to(tmp_path).as_posix() for p in included_files(src, [inc])}
    assert got == {"a.cuh", "sub/b.cuh", "sub/d.cuh", "inc/c.cuh", "inc/sub/e.cuh"}


def test_every_kernel_file_covers_its_headers():
    for path in SOURCES:
        names = {p.name for p in included_files(path, [kernels_dir()])}
        assert "common.cuh" in names, f"{path.name}: common.cuh not found among its includes {names}"


def test_a_header_only_edit_changes_the_source_text(tmp_path):
    kdir = _kernels_copy(tmp_path)
    (kdir / "unrelated.cuh").write_text("// included by nobody\n")
    for src in sorted(kdir.glob("*.cu")):
        before = device_source(src, (kdir,))
        assert before.startswith(src.read_text()), "the digest goes last: line numbers must not move"
        headers = included_files(src, [kdir])
        assert headers, f"{src.name} includes no header"
        for header in headers:
            original = header.read_text()
            header.write_text(original + "\n// a comment-only edit\n")
            assert device_source(src, (kdir,)) != before, f"{src.name}: editing {header.name} kept its source text"
            header.write_text(original)
        assert device_source(src, (kdir,)) == before  # deterministic: restored headers, same text
    unrelated = kdir / "unrelated.cuh"
    texts = {src: device_source(src, (kdir,)) for src in kdir.glob("*.cu")}
    unrelated.write_text("// edited, still included by nobody\n")
    assert texts == {src: device_source(src, (kdir,)) for src in kdir.glob("*.cu")}
    assert headers_digest(kdir / "xent.cu", (kdir,)) in texts[kdir / "xent.cu"]


_FAKE_CUPY = """
import json, os
class RawModule:
    def __init__(self, code, options=()):
        with open(os.environ["FAKE_CUPY_LOG"], "a") as f:
            f.write(json.dumps({"code": code, "options": list(options)}) + "\\n")
"""


def _cupy_modules(tmp_path: Path, kdir: Path) -> list[dict]:
    """What CudaModules hands cupy.RawModule, with a stand-in cupy that records it (no GPU here)."""
    fake = tmp_path / "fake"
    (fake / "cupy").mkdir(parents=True, exist_ok=True)
    (fake / "cupy" / "__init__.py").write_text(_FAKE_CUPY)
    log = tmp_path / "rawmodules.jsonl"
    log.unlink(missing_ok=True)
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "PYTHONPATH": f"{fake}:{root}", "GPULOSS_KERNELS_DIR": str(kdir),
           "FAKE_CUPY_LOG": str(log)}
    code = "from gpuloss.backends import cuda; cuda.CudaModules()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [__import__("json").loads(line) for line in log.read_text().splitlines()]


def test_cuda_backend_hands_cupy_the_device_source(tmp_path):
    kdir = _kernels_copy(tmp_path)
    sources = sorted(kdir.glob("*.cu"))
    made = _cupy_modules(tmp_path, kdir)
    assert [m["code"] for m in made] == [device_source(s, (kdir,)) for s in sources]
    assert all(m["options"] == ["--std=c++17", f"-I{kdir}"] for m in made)
    common = kdir / "common.cuh"
    common.write_text(common.read_text() + "\n// a header-only edit\n")
    again = _cupy_modules(tmp_path, kdir)
    changed = [s.name for s, a, b in zip(sources, made, again) if a["code"] != b["code"]]
    assert changed == [s.name for s in sources], "every file includes common.cuh: each must be a new module"


# --------------------------------------------------------------------------------------
# The CLI


def test_arch_argument_forms():
    assert kernel_table._archs(None) == ["sm_90"]
    assert kernel_table._archs(["sm_90", "sm_80,sm_70", "90"]) == ["sm_90", "sm_80", "sm_70"]


@pytest.mark.slow
@needs_nvrtc
def test_cli_kernels_prints_every_entry(capsys):
    from gpuloss import cli

    assert cli.main(["kernels", "--arch", "sm_90"]) == 0  # compile_file's cache: no new NVRTC run
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["kernel", "arch", "regs"]
    for path in kernel_sources():
        for name in _compiled(path, "sm_90").entry_points:
            row = next((ln for ln in lines if ln.split()[:2] == [name, "sm_90"]), None)
            assert row is not None, f"{name} missing from the table:\n{out}"
            assert int(row.split()[2]) > 0


@needs_nvrtc
def test_cli_kernels_fails_on_compile_error(tmp_path, capsys):
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void bad_f32(float* x) { x[0] = nope; }\n')
    good = tmp_path / "good.cu"
    good.write_text('extern "C" __global__ void good_f32(float* x) { x[0] = 1.f; }\n')
    rc = kernel_table.run(["sm_90"], [bad, good])
    captured = capsys.readouterr()
    assert rc == 1
    assert "bad.cu" in captured.err and "nope" in captured.err
    assert "good_f32" in captured.out  # the other files are still tabulated


# --------------------------------------------------------------------------------------
# common.cuh on the host: conversions and online softmax

_DRIVER = r"""
// Host driver for common.cuh's portable paths. Only the few CUDA spellings
// the header names are defined here; the warp/block templates are never
// instantiated, so single-thread stubs suffice.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
struct StubDim3 { unsigned x, y, z; };
static StubDim3 threadIdx, blockIdx, blockDim, gridDim;
static inline void __syncthreads() {}
static inline void __threadfence() {}
#define __shared__ static
static inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p += v; return old; }
template <class T> T __shfl_xor_sync(unsigned, T v, int, int = 32) { return v; }
#include "common.cuh"

template <class T> static std::vector<T> read_all(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) { perror(path); exit(2); }
  fseek(f, 0, SEEK_END);
  long n = ftell(f) / (long)sizeof(T);
  fseek(f, 0, SEEK_SET);
  std::vector<T> v((size_t)n);
  if (n && fread(v.data(), sizeof(T), (size_t)n, f) != (size_t)n) exit(3);
  fclose(f);
  return v;
}
template <class T> static void write_all(const char* path, const std::vector<T>& v) {
  FILE* f = fopen(path, "wb");
  if (!f) { perror(path); exit(2); }
  if (!v.empty() && fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) exit(3);
  fclose(f);
}

// Pairwise tree of single-element states: exercises softmax_combine alone.
template <class A> static gl::SoftmaxState<A> tree(const A* x, long n) {
  if (n == 0) return gl::softmax_empty<A>();
  if (n == 1) { gl::SoftmaxState<A> s = gl::softmax_empty<A>(); gl::softmax_update(s, x[0]); return s; }
  return gl::softmax_combine(tree(x, n / 2), tree(x + n / 2, n - n / 2));
}

template <class A> static void lse(const char* in, const char* out, long rows, long cols) {
  std::vector<A> x = read_all<A>(in), r;
  for (long i = 0; i < rows; ++i) {
    gl::SoftmaxState<A> s = gl::softmax_empty<A>();
    A mx = gl::neg_inf<A>();
    for (long j = 0; j < cols; ++j) { gl::softmax_update(s, x[i * cols + j]); mx = gl::max_nan(mx, x[i * cols + j]); }
    r.push_back(gl::softmax_logsumexp(s));
    r.push_back(gl::softmax_logsumexp(tree(x.data() + i * cols, cols)));
    r.push_back(mx);
  }
  write_all(out, r);
}

int main(int argc, char** argv) {
  if (argc < 2) return 1;
  const char* mode = argv[1];
  if (!strcmp(mode, "h2f")) {            // all 65536 halves -> f32 bits
    std::vector<uint32_t> r;
    for (uint32_t h = 0; h < 65536; ++h) r.push_back(gl::float_to_bits(gl::half_bits_to_float((uint16_t)h)));
    write_all(argv[2], r);
  } else if (!strcmp(mode, "bf2f")) {
    std::vector<uint32_t> r;
    for (uint32_t b = 0; b < 65536; ++b) r.push_back(gl::float_to_bits(gl::storage<gl::bf16_t>::to_float(gl::bf16_t{(uint16_t)b})));
    write_all(argv[2], r);
  } else if (!strcmp(mode, "f2h") || !strcmp(mode, "f2bf")) {
    std::vector<float> x = read_all<float>(argv[2]);
    std::vector<uint16_t> r;
    for (size_t i = 0; i < x.size(); ++i) {  // through the typed layer, as kernels use it
      if (mode[2] == 'h') { gl::f16_t o[1]; gl::store_from_float(o, 0, gl::load_as_float(x.data(), (gl::index_t)i)); r.push_back(o[0].bits); }
      else { gl::bf16_t o[1]; gl::store_from_acc(o, 0, gl::load_as_acc(x.data(), (gl::index_t)i)); r.push_back(o[0].bits); }
    }
    write_all(argv[3], r);
  } else if (!strcmp(mode, "d2h") || !strcmp(mode, "d2bf")) {
    std::vector<double> x = read_all<double>(argv[2]);
    std::vector<uint16_t> r;
    for (double v : x) {
      if (mode[2] == 'h') { gl::f16_t o[1]; gl::store_from_double(o, 0, v); r.push_back(o[0].bits); }
      else { gl::bf16_t o[1]; gl::store_from_double(o, 0, v); r.push_back(o[0].bits); }
    }
    write_all(argv[3], r);
  } else if (!strcmp(mode, "lse32")) {
    lse<float>(argv[2], argv[3], atol(argv[4]), atol(argv[5]));
  } else if (!strcmp(mode, "lse64")) {
    lse<double>(argv[2], argv[3], atol(argv[4]), atol(argv[5]));
  } else {
    return 1;
  }
  return 0;
}
"""


class HostDriver:
    def __init__(self, exe: Path, workdir: Path):
        self.exe, self.workdir, self._n = exe, workdir, 0

    def _path(self, suffix: str) -> Path:
        self._n += 1
        return self.workdir / f"io{self._n}.{suffix}"

    def run(self, mode: str, inp: np.ndarray | None, out_dtype, *extra) -> np.ndarray:
        args = [str(self.exe), mode]
        if inp is not None:
            p = self._path("in")
            np.ascontiguousarray(inp).tofile(p)
            args.append(str(p))
        out = self._path("out")
        args += [str(out), *map(str, extra)]
        subprocess.run(args, check=True, timeout=60)
        return np.fromfile(out, dtype=out_dtype)


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> HostDriver:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    work = tmp_path_factory.mktemp("common_host")
    src = work / "driver.cpp"
    src.write_text(_DRIVER)
    exe = work / "driver"
    # -Werror with -Wall -Wextra: the header must stay warning-free for the emulator build.
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
           f"-I{kernels_dir()}", str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"g++ failed on common.cuh:\n{proc.stderr}"
    return HostDriver(exe, work)


ALL16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _half_midpoints() -> np.ndarray:
    """Float32 values exactly halfway between adjacent finite halves, and one f32 ulp either side."""
    finite = ALL16[(ALL16 & 0x7C00) != 0x7C00]
    lo = finite.view(np.float16).astype(np.float64)
    step = np.where((finite & 0x7C00) == 0, 2.0**-24, 2.0 ** (((finite >> 10) & 0x1F).astype(np.float64) - 25))
    mid = (lo + np.copysign(step / 2, np.where(lo == 0, np.where(finite & 0x8000, -1.0, 1.0), lo))).astype(np.float32)
    return np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))])


def _special_floats() -> np.ndarray:
    v = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-14, 2.0**-24,
         2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
         np.finfo(np.float32).max, np.finfo(np.float32).tiny, np.finfo(np.float32).smallest_subnormal,
         3.3895314e38, 3.4e38, 1e-45, 9.2e-41]
    a = np.array(v, dtype=np.float32)
    return np.concatenate([a, -a])


def _assert_bits_equal(got: np.ndarray, want: np.ndarray, inputs: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[:8]
        pytest.fail(f"{what}: {bad.size} mismatches, e.g. inputs {inputs[i]!r} got {got[i]} want {want[i]}")


def test_half_to_float_all_patterns(host):
    got = host.run("h2f", None, np.uint32)
    want = ALL16.view(np.float16).astype(np.float32).view(np.uint32)
    nan = np.isnan(ALL16.view(np.float16))
    _assert_bits_equal(got[~nan], want[~nan], ALL16[~nan], "f16 -> f32")
    assert (got[nan] == 0x7FFFFFFF).all(), "NaN converts to the canonical f32 NaN"


def test_half_round_trip_all_patterns(host):
    as_f32 = host.run("h2f", None, np.uint32).view(np.float32)
    back = host.run("f2h", as_f32, np.uint16)
    nan = np.isnan(ALL16.view(np.float16))
    _assert_bits_equal(back[~nan], ALL16[~nan], ALL16[~nan], "f16 -> f32 -> f16")
    assert (back[nan] == 0x7FFF).all()


def test_float_to_half_matches_numpy(host):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every class
        (rng.choice([-1.0, 1.0], 100_000) * 2.0 ** rng.uniform(-27, 17, 100_000)).astype(np.float32),
        _half_midpoints(),
        _special_floats(),
    ])
    got = host.run("f2h", x, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    _assert_bits_equal(got[~nan], want[~nan], x[~nan], "f32 -> f16")
    assert (got[nan] == 0x7FFF).all()


def test_bf16_to_float_all_patterns(host):
    import ml_dtypes

    got = host.run("bf2f", None, np.uint32)
    want = ALL16.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32)
    _assert_bits_equal(got, want, ALL16, "bf16 -> f32")  # a shift: NaN payloads survive too


def test_float_to_bf16_matches_ml_dtypes(host):
    import ml_dtypes

    rng = np.random.default_rng(1)
    b = rng.integers(0, 65536, 50_000).astype(np.uint32)
    mid = (b << 16) | 0x8000  # exactly halfway between two bf16 neighbours
    x = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        mid.view(np.float32), (mid + 1).view(np.float32), (mid - 1).view(np.float32),
        _special_floats(),
    ])
    got = host.run("f2bf", x, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    _assert_bits_equal(got[~nan], want[~nan], x[~nan], "f32 -> bf16")
    assert (got[nan] == 0x7FFF).all()


def _double_traps(step_bits: int, rng) -> np.ndarray:
    """Doubles a hair off a 16-bit format's rounding midpoint: float32 rounds
    them onto the midpoint, so double -> float -> 16-bit rounds twice wrongly."""
    p = rng.integers(-10, 12, 2000).astype(np.float64)
    base = (1.0 + rng.integers(0, 2**step_bits, 2000) / 2.0**step_bits) * 2.0**p
    mid = base + 2.0 ** (p - step_bits - 1)  # half an ulp above a representable value
    tiny = 2.0**-40  # far below float32's resolution: float32 lands exactly on mid
    return np.concatenate([mid * (1 + tiny), mid * (1 - tiny), mid])


def test_double_to_half_rounds_once(host):
    rng = np.random.default_rng(2)
    x = np.concatenate([
        _double_traps(10, rng),
        rng.integers(0, 2**64, 50_000, dtype=np.uint64).view(np.float64),
        rng.uniform(-7e4, 7e4, 20_000), 2.0 ** rng.uniform(-30, -10, 20_000),
        _special_floats().astype(np.float64),
    ])
    got = host.run("d2h", x, np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16).view(np.uint16)  # NumPy converts double -> half directly
    nan = np.isnan(x)
    _assert_bits_equal(got[~nan], want[~nan], x[~nan], "f64 -> f16")
    assert (got[nan] == 0x7FFF).all()


def _exact_bf16(d: float) -> int:
    """Round a double to bfloat16 (8 significant bits, float32's exponent range),
    nearest-even, with exact rational arithmetic: independent of any library."""
    if math.isnan(d):
        return 0x7FFF
    sign = 0x8000 if math.copysign(1.0, d) < 0 else 0
    a = abs(d)
    if a == 0:
        return sign
    if math.isinf(a):
        return sign | 0x7F80
    e = max(math.frexp(a)[1] - 1, -126)  # exponent of the leading bit, clamped at subnormals
    q = Fraction(2) ** (e - 7)
    n = round(Fraction(a) / q)  # Fraction rounding is half-to-even
    value = n * q
    if value >= 2**128:
        return sign | 0x7F80
    return sign | int(np.array([float(value)], dtype=np.float32).view(np.uint32)[0] >> 16)


def test_double_to_bf16_rounds_once(host):
    rng = np.random.default_rng(3)
    x = np.concatenate([
        _double_traps(7, rng)[::3],
        rng.integers(0, 2**64, 2000, dtype=np.uint64).view(np.float64),
        np.array([3.4e38, 3.3961775e38, 3.39617752e38, -3.4e38, 1e-40, 9.18355e-41, 1e-45, 1e300, -1e-300]),
        _special_floats().astype(np.float64),
    ])
    got = host.run("d2bf", x, np.uint16)
    want = np.array([_exact_bf16(float(v)) for v in x], dtype=np.uint16)
    _assert_bits_equal(got, want, x, "f64 -> bf16")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_online_softmax_logsumexp(host, dtype):
    rng = np.random.default_rng(4)
    cols = 37
    rows = [rng.normal(0, 3, cols), rng.normal(0, 1e4 if dtype == np.float32 else 1e6, cols),
            np.full(cols, -np.inf), np.where(rng.random(cols) < 0.7, -np.inf, rng.normal(0, 5, cols)),
            np.r_[np.inf, rng.normal(0, 1, cols - 1)], np.r_[rng.normal(0, 1, cols - 2), np.nan, 1.0],
            np.r_[-np.inf, np.inf, np.zeros(cols - 2)], np.full(cols, 88.0), np.linspace(-50, 50, cols)]
    x = np.array(rows, dtype=dtype)
    mode = "lse32" if dtype == np.float32 else "lse64"
    out = host.run(mode, x, dtype, len(rows), cols).reshape(len(rows), 3)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.max(x64, axis=1, keepdims=True)
        shift = np.where(np.isfinite(m), m, 0.0)
        want = np.log(np.sum(np.exp(x64 - shift), axis=1)) + shift[:, 0]
    want[np.isnan(x64).any(axis=1)] = np.nan
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for col, what in ((0, "sequential update"), (1, "pairwise combine")):
        np.testing.assert_allclose(out[:, col], want, rtol=tol, atol=0, err_msg=what)
    np.testing.assert_array_equal(out[:, 2], np.max(x64, axis=1).astype(dtype))  # NaN-propagating max
    # empty row: logsumexp of nothing is -inf, never NaN
    empty = host.run(mode, np.zeros(0, dtype), dtype, 1, 0)
    assert empty[0] == -np.inf and empty[1] == -np.inf


# --------------------------------------------------------------------------------------
# selftest.cu through the emulated backend: the warp/block reductions and the
# online-softmax combine as kernels run them (1, 3 and 4 warps per block).


@pytest.fixture(scope="module")
def selftest_module():
    emulated = pytest.importorskip("gpuloss.backends.emulated")
    return emulated.EmulatedModule(sources=[SELFTEST])


def _storage_dtypes():
    import ml_dtypes

    # (suffix, storage dtype, accumulation dtype)
    return [("f32", np.float32, np.float32), ("f64", np.float64, np.float64),
            ("f16", np.float16, np.float32), ("bf16", ml_dtypes.bfloat16, np.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("sfx", ["f32", "f64", "f16", "bf16"])
def test_selftest_kernels_emulated(selftest_module, sfx):
    _, dt, acc = next(t for t in _storage_dtypes() if t[0] == sfx)
    rng = np.random.default_rng(5)
    rows, cols = 5, 300
    x = rng.normal(0, 3, (rows, cols)).astype(dt)
    x[2, :] = -np.inf          # fully masked row
    x[3, 7] = np.nan           # NaN must reach the row's results
    x[4, :200] = -np.inf       # partly masked
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = x64.max(axis=1, keepdims=True)
        shift = np.where(np.isfinite(m), m, 0.0)
        lse = np.log(np.exp(x64 - shift).sum(axis=1)) + shift[:, 0]
    kernel = selftest_module.get_function(f"selftest_row_reduce_{sfx}")
    for block in (32, 96, 128):
        out = np.zeros(rows * 3, acc)
        kernel((2,), (block,), (x, out, np.int64(rows), np.int64(cols)))
        got = out.reshape(rows, 3)
        np.testing.assert_allclose(got[:, 0], x64.sum(axis=1), rtol=1e-5, err_msg=f"sum, block {block}")
        np.testing.assert_array_equal(got[:, 1], x64.max(axis=1).astype(acc), err_msg=f"max, block {block}")
        np.testing.assert_allclose(got[:, 2], lse, rtol=1e-6, err_msg=f"logsumexp, block {block}")

    y = np.concatenate([rng.normal(0, 100, 997), [0.0, -0.0, np.inf]]).astype(dt)
    back, as_f32 = np.zeros_like(y), np.zeros(y.size, np.float32)
    selftest_module.get_function(f"selftest_roundtrip_{sfx}")((3,), (64,), (y, back, as_f32, np.int64(y.size)))
    assert back.view(np.uint8).tobytes() == y.view(np.uint8).tobytes()
    np.testing.assert_array_equal(as_f32, y.astype(np.float32))


# --------------------------------------------------------------------------------------
# On a GPU: the cvt instructions agree bitwise with the bit paths (the NaN
# convention of common.cuh rests on this; nothing without a GPU can check it).


def _cuda_unavailable() -> str | None:
    try:
        from gpuloss.backends import cuda_unavailable_reason
    except ImportError as exc:
        return f"gpuloss.backends: {exc}"
    return cuda_unavailable_reason()


@pytest.mark.gpu
def test_device_conversions_match_bit_paths():
    reason = _cuda_unavailable()
    if reason is not None:
        pytest.skip(f"cuda backend: {reason}")
    import cupy as cp

    # device_source, as the cuda backend: CuPy's cache then sees header edits too
    mod = cp.RawModule(code=device_source(SELFTEST, (kernels_dir(),)),
                       options=("--std=c++17", f"--include-path={kernels_dir()}"), backend="nvrtc")
    rng = np.random.default_rng(6)
    f = np.concatenate([rng.integers(0, 2**32, 1 << 21, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        _half_midpoints(), _special_floats()]).astype(np.float32)
    bad = cp.zeros(1, dtype=cp.uint32)
    mod.get_function("selftest_convert_check")((512,), (256,), (cp.asarray(f), np.int64(f.size), bad))
    assert int(bad.get()[0]) == 0, "cvt.* and the bit paths disagree on the device"

    # All halves through the cvt path: IEEE values, canonical NaN.
    h = cp.asarray(ALL16)
    back, as_f32 = cp.zeros_like(h), cp.zeros(h.size, dtype=cp.float32)
    mod.get_function("selftest_roundtrip_f16")((64,), (256,), (h, back, as_f32, np.int64(h.size)))
    got = as_f32.get().view(np.uint32)
    nan = np.isnan(ALL16.view(np.float16))
    _assert_bits_equal(got[~nan], ALL16[~nan].view(np.float16).astype(np.float32).view(np.uint32),
                       ALL16[~nan], "device f16 -> f32")
    assert (got[nan] == 0x7FFFFFFF).all() and (back.get()[nan] == 0x7FFF).all()
    _assert_bits_equal(back.get()[~nan], ALL16[~nan], ALL16[~nan], "device f16 round trip")
