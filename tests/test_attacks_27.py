# Attacks of the red team's pass 27 on what no attack had probed: the index's
# reports, the statistics as they leave the daemon (the table, JSON, the
# Prometheus text and its textfile), the fill queue, and two uids that fill the
# all-uids pin bound together. Each runs the daemon as a real subprocess and its
# attackers and readers as real processes of other uids.
#
# Must never: leave a child process behind; pass for a reason other than the
# defence it names.
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .conftest import make_file, repo_env, requires_root
from .test_attacks import ALICE, BOB, LABEL_OPEN, call, child, mkdir_owned, require

pytestmark = requires_root

READ_TEXTFILE = """
out(open({path!r}, encoding="utf-8").read())
"""


def stats_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`shadowd stats ARGS` as its operator runs it (root, here)."""
    return subprocess.run(
        [sys.executable, "-m", "shadowd", "stats", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=repo_env(),
        check=False,
    )


async def test_50_the_metrics_textfile_shows_no_uid_another_uids_path_labels(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 50: operations.md has root keep a Prometheus textfile for the node
    exporter (`shadowd stats --textfile`), written 0644 for the collector, which serves
    it over HTTP. Root's stats carry every uid's path labels, so another user read
    alice's label of a file in her 0700 directory from that file (attack 12 through
    the monitoring), and any uid could add a time series a label to the monitoring's
    database. The textfile and --prometheus carry no path label unless asked (--paths)."""
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    alice = mkdir_owned(mkdir_owned(shared_dir / "home", 0) / "alice", ALICE, 0o755)
    private = mkdir_owned(alice / "private", ALICE, 0o700)
    f = make_file(private / "payroll-2026.xlsx", b"salaries\n" * 1000, 0o600)
    os.chown(f, ALICE, ALICE)
    collector = mkdir_owned(shared_dir / "textfile", 0, 0o755)
    textfile = collector / "shadowd.prom"
    sock = str(d.socket_path)
    with trio.fail_after(60):
        await call(child, ALICE, LABEL_OPEN.format(sock=sock, path=str(f)))
        asked = await call(stats_cli, "--socket", sock, "--json")
        written = await call(stats_cli, "--socket", sock, "--textfile", str(textfile))
        seen_by_bob = await call(child, BOB, READ_TEXTFILE.format(path=str(textfile)))
    require(asked.returncode == 0 and str(f) in asked.stdout, f"not in root's stats: {asked}")
    require(written.returncode == 0, f"--textfile failed: {written.stderr}")
    require("shadowd_up 1" in seen_by_bob, f"bob could not read the textfile: {seen_by_bob}")
    leaked = [ln for ln in seen_by_bob.splitlines() if str(f) in ln]
    print(f"lines naming alice's file that bob read: {leaked}")
    assert leaked == []  # before: shadowd_top_file_hits{path="...payroll-2026.xlsx"} 2 (and saved)
