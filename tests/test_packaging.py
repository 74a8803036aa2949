"""The repository's promises about itself: CI runs the README's command, the CLI answers."""
from __future__ import annotations

from pathlib import Path

import gpuloss
from gpuloss import cli
from gpuloss._paths import kernel_sources, kernels_dir

ROOT = Path(__file__).resolve().parents[1]


def _ci_pytest_lines() -> list[str]:
    return [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
            if "pytest" in ln and not ln.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim_then_the_slow_cases():
    readme = (ROOT / "README.md").read_text().splitlines()
    first, *rest = _ci_pytest_lines()
    assert first in readme                       # the README's command, as a newcomer types it
    assert rest == [".venv/bin/python -m pytest -q -m slow -n 0"]   # and everything it leaves out


def test_the_default_run_leaves_out_exactly_the_slow_marker():
    text = (ROOT / "pyproject.toml").read_text()
    assert "addopts = \"-rfEs -m 'not slow' -n 2\"" in text


def test_kernels_are_packaged_and_found():
    assert (kernels_dir() / "common.cuh").is_file()
    names = {p.name for p in kernel_sources()}
    assert {"xent.cu", "elementwise.cu", "reduce.cu"} <= names


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"gpuloss           {gpuloss.__version__}" in out
    for backend in ("backend cpu", "backend cuda", "backend emulated"):
        assert backend in out


def test_help_lists_every_command(capsys):
    parser = cli.build_parser()
    text = parser.format_help()
    for command in ("train", "time", "bench", "kernels", "info"):
        assert command in text
