# `shadowd bench` end to end with tiny settings: it must run, clean up, and
# report figures that hang together. Speed itself is not asserted here:
# timings on a shared machine belong in benchmarks, not tests.
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import shadowd_client.index as index_module
import trio

from shadowd import hotcalls
from shadowd.bench import c_compiler

from .conftest import REPO, Daemon, repo_env


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = repo_env()
    return subprocess.run(
        [sys.executable, "-m", "shadowd", "bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


async def test_bench_json_hangs_together(
    c_client_build: Callable[..., tuple[str | None, str]],
) -> None:
    with trio.fail_after(150):
        proc = await trio.to_thread.run_sync(
            lambda: run_bench(
                "--json",
                "--rounds",
                "3",
                "--procs",
                "1,2",
                "--seconds",
                "0.3",
                "--memory-procs",
                "3",
                "--connections",
                "10",
            )
        )
    assert proc.returncode == 0, proc.stderr
    assert "shadowd bench:" in proc.stderr  # progress went to stderr
    data = json.loads(proc.stdout)
    names = [s["name"] for s in data["sizes"]]
    assert names[:8] == [
        "1 KiB", "4 KiB", "16 KiB", "64 KiB", "256 KiB", "1 MiB", "2 MiB", "16 MiB"
    ]  # fmt: skip
    assert any(n.startswith("libc") for n in names)
    for s in data["sizes"]:
        assert s["copy"]["n"] >= 3 and s["hit"]["n"] >= 3
        assert 0 < s["hit"]["p50"] <= s["hit"]["p99"]
        assert s["speedup"] == s["copy"]["p50"] / s["hit"]["p50"]
        # The bench's daemon runs as this uid: hits through its index are measured too.
        assert s["index"]["n"] >= 3 and 0 < s["index"]["p50"] <= s["index"]["p99"]
        assert s["index_speedup"] == s["copy"]["p50"] / s["index"]["p50"]
    assert data["index_crossover"]
    # The Python client's index hits ran where this install runs them.
    assert data["index_path"] == ("C" if index_module.C_CALLS is not None else "Python")
    if c_client_build()[0] is not None:  # a compiler here: the C client's too
        for s in data["sizes"]:
            c = s["c"]  # copy, socket hit and index hit timed in C, per file
            for series in ("copy", "hit", "index", "syscalls"):
                assert c[series]["n"] == 3 and 0 < c[series]["p50"] <= c[series]["p99"]
            assert c["index_speedup"] == c["copy"]["p50"] / c["index"]["p50"]
            assert c["index_over_syscalls"] == c["index"]["p50"] / c["syscalls"]["p50"]
        assert data["c_index_crossover"].startswith("hits ")
    assert [t["procs"] for t in data["throughput"]] == [1, 2]
    assert all(t["hits_per_s"] > 0 and t["copies_per_s"] > 0 for t in data["throughput"])
    mem = data["memory"]
    # Three holders of one 16 MiB file: one copy through shadowd, three private.
    assert mem["private_bytes"] > mem["shadowd_bytes"] + 16 * 1024 * 1024
    assert data["crowd"]["connections"] == 10
    assert data["cpu_us_per_hit"] > 0
    assert data["hit_path"] == hotcalls.DESCRIPTION
    if c_client_build()[0] is not None:  # a compiler here: C figures too
        assert data["c_client_missing"] == ""
        for t in data["throughput"]:
            assert t["c_hits_per_s"] > 0 and t["c_copies_per_s"] > 0
            assert t["c_ratio"] == t["c_hits_per_s"] / t["c_copies_per_s"]
        assert data["c_cpu_us_per_hit"] > 0


async def test_bench_table_and_bad_flags() -> None:
    with trio.fail_after(150):
        proc = await trio.to_thread.run_sync(
            lambda: run_bench(
                "--rounds",
                "2",
                "--procs",
                "1",
                "--seconds",
                "0.2",
                "--memory-procs",
                "0",
                "--connections",
                "0",
            )
        )
        assert proc.returncode == 0, proc.stderr
        assert "copy/hit" in proc.stdout and "crossover" in proc.stdout
        if c_compiler() is not None:  # the C client's index hits, in a table of their own
            assert "index crossover in C:" in proc.stdout and "copy/idx" in proc.stdout
        assert "transport floor" in proc.stdout
        assert f"daemon hit path system calls in: {hotcalls.DESCRIPTION}" in proc.stdout
        bad = await trio.to_thread.run_sync(lambda: run_bench("--procs", "x"))
    assert bad.returncode == 2 and "--procs" in bad.stderr
    assert "Traceback" not in bad.stderr


async def test_bench_against_a_daemon_with_a_racy_window_measures_cached_files(
    start_daemon: Any,
) -> None:
    """`shadowd bench --socket S` writes its files at the start, and a daemon run as
    usual caches no file younger than its racy window (here 0.5 s): the bench waits
    that long (the hello says how long) before it measures, and says so, so that its
    "hit" columns are hits. Before, every serve of its files was a copy the daemon
    did not keep (served uncached), and nothing said so."""
    d: Daemon = await start_daemon("--racy-window", "0.5")
    with trio.fail_after(150):
        tiny = ["--rounds", "3", "--procs", "1", "--seconds", "0.2", "--memory-procs", "0"]
        proc = await trio.to_thread.run_sync(
            lambda: run_bench("--socket", str(d.socket_path), *tiny, "--connections", "0")
        )
        assert proc.returncode == 0, proc.stderr
        from shadowd_client import Client

        with Client(d.socket_path, timeout=10) as c:
            s = c.stats()
    assert s["uncached"] == 0 and s["hits"] > 0, (s["uncached"], s["hits"])
    assert "racy window 0.5 s" in proc.stdout and "waited" in proc.stdout, proc.stdout


async def test_bench_on_a_socket_nobody_answers_is_one_line(tmp_path: Path) -> None:
    """`shadowd bench --socket PATH` with no daemon there: one line naming PATH, exit 1."""
    (tmp_path / "file").write_text("not a socket\n")
    for path in (tmp_path / "none.sock", tmp_path / "file"):
        with trio.fail_after(60):
            proc = await trio.to_thread.run_sync(run_bench, "--socket", str(path))
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.splitlines() == [
            f"shadowd bench: cannot reach shadowd at {path}: "
            + ("No such file or directory" if path.name == "none.sock" else "not a socket")
            + " (connecting)"
        ]
    assert sorted(os.listdir(tmp_path)) == ["file"]


async def test_hit_path_benchmark_runs_and_answers_every_request_as_a_hit() -> None:
    """benchmarks/hit_path.py drives the server's internals: it must keep working."""
    env = repo_env()
    with trio.fail_after(60):
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, str(REPO / "benchmarks" / "hit_path.py"), "140"],
                capture_output=True,
                text=True,
                timeout=50,
                env=env,
                check=False,
            )
        )
    assert proc.returncode == 0, proc.stderr
    assert "the daemon's hit path (Server._answer_datagram):" in proc.stdout
    assert "statx (ctypes)" in proc.stdout
