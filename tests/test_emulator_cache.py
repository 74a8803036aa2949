"""The emulated backend's build cache under damage: truncated, corrupt and
planted libraries, leftovers of killed builds, concurrent builders, and a
kernels folder whose path needs escaping.

Every load of a damaged cache runs in a subprocess: a library that gets
dlopen'ed when it should not can kill its process with SIGBUS or run its
own code, and that must show as a failed test, not take pytest down.
Each test works in its own cache folder, seeded from one build of a tiny
probe kernel so that only the rebuild under test runs the compiler.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpuloss.backends import emulated

# Each case builds the emulated kernels into a fresh cache (seconds each): behind the slow marker,
# which .ci/run runs after the README's command.
pytestmark = [pytest.mark.skipif(shutil.which("g++") is None, reason="the emulated backend needs g++"),
              pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

_PROBE = ("#ifndef GPULOSS_REGISTER\n#define GPULOSS_REGISTER(name)\n#endif\n"
          "EXTRA\n"
          'extern "C" __global__ void cache_probe(int* out) { out[threadIdx.x] = VALUE; }\n'
          "GPULOSS_REGISTER(cache_probe)\n")
# Runs when its library is dlopen'ed, before any kernel: proof it was loaded at all.
_EVIL_CTOR = '__attribute__((constructor)) static void planted() { __builtin_puts("PLANTED-LIBRARY-LOADED"); }'

_LOAD = r"""
import json, sys, warnings
import numpy as np
from gpuloss.backends.emulated import EmulatedModule
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    m = EmulatedModule([sys.argv[1]], cache=sys.argv[2])
out = np.zeros(4, np.int32)
m.get_function("cache_probe")(1, 4, (out,))
print("RESULT " + json.dumps({"compiled": m.compiled, "path": str(m.path), "values": out.tolist(),
                              "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def _load_in_subprocess(src: Path, cache: Path, env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(src), str(cache)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode < 0:
        pytest.fail(f"loading the cache killed the process with signal {-proc.returncode}:\n{proc.stderr}")
    assert proc.returncode == 0, f"loading the cache failed (exit {proc.returncode}):\n{proc.stderr}"
    assert "PLANTED-LIBRARY-LOADED" not in proc.stdout, "a planted library was dlopen'ed (its constructor ran)"
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line[len("RESULT "):])


class Seed:
    """One probe source, built once; ``fresh_cache`` copies that build into a new folder."""

    def __init__(self, root: Path, value: int, extra: str = ""):
        # Its own folder: the key covers every source file beside it.
        (root / f"src{value}").mkdir()
        self.src = root / f"src{value}" / "probe.cu"
        self.src.write_text(_PROBE.replace("VALUE", str(value)).replace("EXTRA", extra))
        self.golden = root / f"golden{value}"
        self.lib, compiled = emulated.build_library([self.src], cache=self.golden)
        assert compiled
        self.record = emulated._record_path(self.lib)

    def fresh_cache(self, dest: Path) -> tuple[Path, Path, Path]:
        shutil.copytree(self.golden, dest)
        return dest, dest / self.lib.name, dest / self.record.name


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> tuple[Seed, Seed]:
    root = tmp_path_factory.mktemp("seeds")
    return Seed(root, 1), Seed(root, 666, _EVIL_CTOR)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_rebuilt(result: dict, lib: Path, record: Path, reason: str) -> None:
    assert result["values"] == [1] * 4, result
    assert result["compiled"], f"the damaged library was not rebuilt: {result}"
    assert result["path"] == str(lib)
    assert any("EmulatorCacheWarning" in w and reason in w for w in result["warnings"]), result["warnings"]
    rec = json.loads(record.read_text())
    assert rec["sha256"] == _sha256(lib) and rec["size"] == lib.stat().st_size


def test_a_build_records_the_library_hash(seeds):
    good, _ = seeds
    rec = json.loads(good.record.read_text())
    assert rec["sha256"] == _sha256(good.lib) and rec["size"] == good.lib.stat().st_size
    assert rec["sources"] == [str(good.src.resolve())]
    leftovers = [p.name for p in good.golden.iterdir() if p.name.startswith(("build-", "tmp"))]
    assert not leftovers, leftovers


@pytest.mark.parametrize("keep", [0, 64, 0.5], ids=["empty", "64-bytes", "half"])
def test_truncated_library_is_rebuilt_not_loaded(seeds, tmp_path, keep):
    good, _ = seeds
    cache, lib, record = good.fresh_cache(tmp_path / "cache")
    size = lib.stat().st_size
    with open(lib, "r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    result = _load_in_subprocess(good.src, cache)
    _assert_rebuilt(result, lib, record, "does not match its build record")
    again = _load_in_subprocess(good.src, cache)  # repaired for good: a plain cache hit
    assert not again["compiled"] and not again["warnings"] and again["values"] == [1] * 4


def test_garbage_library_is_rebuilt(seeds, tmp_path):
    good, _ = seeds
    cache, lib, record = good.fresh_cache(tmp_path / "cache")
    lib.write_bytes(b"this is not an ELF file\n" * 300)
    _assert_rebuilt(_load_in_subprocess(good.src, cache), lib, record, "does not match its build record")


@pytest.mark.parametrize("record_kind", ["none", "stale", "its-own"])
def test_planted_library_is_never_loaded(seeds, tmp_path, record_kind):
    # A working library of the same kernel name (returning 666, and announcing
    # itself from a constructor) put where the probe's library belongs.
    good, evil = seeds
    cache, lib, record = good.fresh_cache(tmp_path / "cache")
    shutil.copyfile(evil.lib, lib)
    if record_kind == "none":
        record.unlink()
        reason = "has no build record"
    elif record_kind == "stale":  # the probe's own record, now describing other bytes
        reason = "does not match its build record"
    else:  # a record that matches the planted bytes, but was written for other sources
        shutil.copyfile(evil.record, record)
        reason = "build record for other sources or flags"
    _assert_rebuilt(_load_in_subprocess(good.src, cache), lib, record, reason)


def test_unreadable_record_is_rebuilt(seeds, tmp_path):
    good, _ = seeds
    cache, lib, record = good.fresh_cache(tmp_path / "cache")
    record.write_text("{ not json")
    _assert_rebuilt(_load_in_subprocess(good.src, cache), lib, record, "unreadable build record")


def test_symlinked_library_is_not_followed(seeds, tmp_path):
    good, evil = seeds
    cache, lib, record = good.fresh_cache(tmp_path / "cache")
    lib.unlink()
    lib.symlink_to(evil.lib)
    shutil.copyfile(evil.record, record)
    result = _load_in_subprocess(good.src, cache)
    _assert_rebuilt(result, lib, record, "cannot be opened")
    assert not lib.is_symlink() and _sha256(evil.lib) != _sha256(lib)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: no process has this pid now
    return proc.pid


def test_leftovers_of_killed_builds_are_removed(seeds, tmp_path):
    good, _ = seeds
    cache = tmp_path / "cache"
    cache.mkdir()
    host = emulated._host_tag()
    dead = _dead_pid()
    old = 2 * emulated._STALE_AGE_S

    def make(name: str, *, folder: bool = True, age: float = 0.0) -> Path:
        p = cache / name
        if folder:
            p.mkdir()
            (p / "unit0_probe.cpp").write_text("// half-written\n")
        else:
            p.write_bytes(b"\x7fELF partial")
        if age:
            t = p.stat().st_mtime - age
            os.utime(p, (t, t))
        return p

    gone = [make(f"build-{dead}@{host}-abcd1234"),                       # its builder was killed
            make(f"tmp-{dead}@{host}-xyz.part", folder=False),
            make("build-k3j2h1g0", age=old),                               # old-style name, long untouched
            make(f"build-{os.getpid()}@otherhost-q1", age=old)]            # elsewhere: only its age counts
    kept = [make(f"build-{os.getpid()}@{host}-live"),                     # a live builder's
            make(f"build-{dead}@otherhost-recent"),                        # a pid of another host, recent
            make("build-recent9")]
    unrelated = make("notes.txt", folder=False, age=old)
    path, compiled = emulated.build_library([good.src], cache=cache)
    assert compiled and path.is_file()
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    assert unrelated.exists()


def test_concurrent_builders_compile_once(seeds, tmp_path):
    good, _ = seeds
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _LOAD, str(good.src), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
    assert sorted(r["compiled"] for r in results) == [False, False, True], results
    assert all(r["values"] == [1] * 4 and not r["warnings"] for r in results), results
    assert len(list(cache.glob("*.so"))) == 1 and len(list(cache.glob("*.json"))) == 1


def test_kernels_dir_path_with_a_quote_and_a_space(tmp_path):
    # The generated wrapper used to #include the source by path, and #include
    # "..." takes no escapes: a `"` in the path broke the build.
    weird = tmp_path / 'ker "nels" dir' / "kernels"
    shutil.copytree(emulated._paths.kernels_dir(), weird)
    shutil.copy(Path(__file__).resolve().parent / "kernels" / "selftest.cu", weird / "selftest.cu")
    code = r"""
import numpy as np
from gpuloss import _paths
from gpuloss.backends import emulated
assert _paths.kernels_dir() == emulated._paths.kernels_dir()
kdir = _paths.kernels_dir()
assert '"' in str(kdir) and emulated.emulator_dir() == kdir / "emulator", (kdir, emulated.emulator_dir())
m = emulated.EmulatedModule([kdir / "selftest.cu"])
x = np.arange(64, dtype=np.float32)
out = np.zeros(3, np.float32)
m.get_function("selftest_row_reduce_f32")((1,), (32,), (x, out, np.int64(1), np.int64(64)))
assert out[0] == x.sum() and out[1] == 63, out
print("OK", m.path)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPULOSS_KERNELS_DIR": str(weird),
           "GPULOSS_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_diagnostics_name_a_quoted_path(tmp_path):
    folder = tmp_path / 'a "b" c'
    folder.mkdir()
    src = folder / "broken.cu"
    src.write_text('extern "C" __global__ void broken(int* out) {\n  out[0] = undeclared_name;\n}\n')
    with pytest.raises(emulated.EmulatorBuildError) as info:
        emulated.build_library([src], cache=tmp_path / "cache")
    assert f'{src}:2' in str(info.value) and "undeclared_name" in str(info.value)


def test_kernels_dir_override_must_hold_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("GPULOSS_KERNELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GPULOSS_KERNELS_DIR"):
        emulated._paths.kernels_dir()
