# The package as users get it: the sdist carries the systemd units, the C
# client, the docs, LICENSE and a test tree that runs from the unpacked sdist;
# the build draws no deprecation warning; `make run` installs only what the
# daemon needs; docs/operations.md installs into a virtual environment.
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import REPO

#: Tests run from the unpacked sdist: the docs and units it ships, the
#: report, the daemon as a subprocess (conftest), and the C client it ships.
SUBSET = [
    "tests/test_protocol_doc.py",
    "tests/test_operations_doc.py",
    "tests/test_report.py",
    "tests/test_cli.py::test_stats_table_and_json",
    "tests/test_c_client.py::test_exact_bytes_a_miss_then_a_hit",
]
#: What a source tree holds that is no part of it.
LOCAL = (".git", ".venv", "__pycache__", "*.so", "build", "dist", "*.egg-info", ".*_cache")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The sdist built as a user would (from a copy: the build writes beside its sources)."""
    tree = tmp_path_factory.mktemp("tree") / "shadowd"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*LOCAL, ".hypothesis"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = out.glob("shadowd-*.tar.gz")
    return archive, proc.stdout + proc.stderr


def test_the_build_warns_of_nothing(sdist: tuple[Path, str]) -> None:
    _, log = sdist
    assert not re.search(r"warn|deprecat", log, re.IGNORECASE), log


def test_the_sdist_carries_units_c_client_docs_license_and_tests(sdist: tuple[Path, str]) -> None:
    archive, _ = sdist
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{archive.name.removesuffix('.tar.gz')}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    wanted = {"LICENSE", "Makefile", "README.md", "pyproject.toml", "setup.py"}
    for part in ("contrib", "client/c", "docs", "tests", "benchmarks"):
        wanted |= {
            str(p.relative_to(REPO))
            for p in (REPO / part).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so")
        }
    assert {"contrib/systemd/shadowd.service", "client/c/shadowd.c", "tests/conftest.py"} <= wanted
    assert wanted <= names, sorted(wanted - names)
    assert not any("__pycache__" in n for n in names)
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata


@pytest.mark.slow
def test_the_unpacked_sdist_runs_its_tests(sdist: tuple[Path, str], tmp_path: Path) -> None:
    archive, _ = sdist
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pytest's pythonpath (pyproject.toml) puts the unpacked tree first.
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path[:0] = ['.', 'client']; import shadowd, shadowd_client; "
            "print(shadowd.__file__); print(shadowd_client.__file__)",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert all(line.startswith(str(tree)) for line in where.stdout.splitlines()), where.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUBSET],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout), proc.stdout[-1000:]


def make_dry_run(target: str) -> str:
    return subprocess.run(
        ["make", "-n", target, "VENV=/nonexistent/venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_make_run_installs_only_what_running_needs() -> None:
    run = make_dry_run("run")
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert installs and all("[test]" not in line for line in installs), run
    assert "shadowd serve" in run
    test = make_dry_run("test")
    assert any("'.[test]'" in line for line in test.splitlines() if "pip install" in line), test


def test_the_documented_install_uses_a_virtual_environment() -> None:
    """PEP 668 systems (Debian 12, Ubuntu 23.04+) refuse pip in the system Python."""
    doc = (REPO / "docs" / "operations.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", doc, re.DOTALL)
    commands = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines()]
    pips = [c for c in commands if re.search(r"\bpip3? install\b", c)]
    assert pips, "the install names its pip command"
    for command in pips:
        # Only a venv's own pip; never `pip install --user`, never the system's.
        assert re.match(r"/opt/shadowd/bin/pip install ", command), command
    assert "python3 -m venv /opt/shadowd" in commands
    assert any(c.startswith("pipx install") or " pipx install" in c for c in commands)
    assert "ln -s /opt/shadowd/bin/shadowd /usr/local/bin/shadowd" in commands
    unit = (REPO / "contrib" / "systemd" / "shadowd.service").read_text()
    assert "ExecStart=/usr/local/bin/shadowd serve" in unit
