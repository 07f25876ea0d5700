# docs/operations.md and contrib/systemd/ kept honest: every stats key and
# metric is documented, and the units agree with what the daemon needs.
from __future__ import annotations

import configparser
import re

import attrs
import pytest

from shadowd.prometheus import format_prometheus
from shadowd.stats import Stats

from . import promtext
from .conftest import REPO
from .test_report import sample_stats

DOC = (REPO / "docs" / "operations.md").read_text()
UNITS = REPO / "contrib" / "systemd"


def unit(path: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / path).read_text())
    return parser


def test_every_stats_key_is_documented() -> None:
    keys = [f.name for f in attrs.fields(Stats)] + ["hit_rate"]
    missing = [k for k in keys if f"`{k}`" not in DOC]
    assert not missing


def test_every_metric_is_documented() -> None:
    names = promtext.parse(format_prometheus(sample_stats(), paths=True))
    missing = [n for n in names if n not in DOC]
    assert not missing


@pytest.mark.parametrize("variant", ["", "user/"])
def test_units_are_socket_activated_notify_services_with_an_fd_store(variant: str) -> None:
    socket_unit = unit(variant + "shadowd.socket")
    service = unit(variant + "shadowd.service")
    assert socket_unit.get("Socket", "ListenSequentialPacket")
    assert service.get("Service", "Type") == "notify"
    assert service.get("Service", "NotifyAccess") == "main"
    assert service.get("Service", "NoNewPrivileges") == "yes"
    # The store and the flag must agree (systemd before 254 does not tell the daemon).
    store_max = service.get("Service", "FileDescriptorStoreMax")
    exec_start = service.get("Service", "ExecStart")
    assert re.search(rf"--fd-store-max {store_max}\b", exec_start)
    assert " serve " in exec_start


def test_system_unit_is_hardened() -> None:
    service = unit("shadowd.service")["Service"]
    assert service["ProtectSystem"] == "strict"
    assert service["RuntimeDirectory"] == "shadowd"
    # One capability: read leases on other users' files (docs/security.md).
    assert service["CapabilityBoundingSet"] == "CAP_LEASE"
    assert service["AmbientCapabilities"] == "CAP_LEASE"
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["User"] == "shadowd"
    socket_unit = unit("shadowd.socket")["Socket"]
    assert socket_unit["ListenSequentialPacket"] == "/run/shadowd/shadowd.sock"
    assert socket_unit["SocketGroup"] == service["Group"]
    # The store keeps every entry the default budget allows.
    assert int(service["FileDescriptorStoreMax"]) >= 10_000


def test_performance_is_a_report_not_a_log() -> None:
    perf = (REPO / "docs" / "performance.md").read_text()
    for phrase in (
        "this round",
        "commits earlier",
        "performance issue",
        "the issue's",
        "earlier round",
    ):
        assert phrase not in perf, phrase
    for section in ("## The machine", "## Reproducing", "## What is measured", "## Real programs"):
        assert section in perf, section
    # The real-program report took the place that was marked for it.
    assert "<!-- REAL-PROGRAMS" not in perf and "Not measured yet" not in perf
    real = perf[perf.index("## Real programs") :]
    for part in ("benchmarks/programs.py", "### Warm cache", "### Cold cache", "What limits"):
        assert part in real, part


def test_the_bench_takes_one_duration_everywhere() -> None:
    from shadowd.cli import build_parser

    def folded(text: str) -> str:
        return " ".join(text.split())

    readme = folded((REPO / "README.md").read_text())
    perf = folded((REPO / "docs" / "performance.md").read_text())
    usage = folded(build_parser().format_help())  # lists each command with its help
    for text in (readme, perf, usage):
        assert "about 45 seconds" in text
        assert "half a minute" not in text and "~45 s" not in text


def test_the_reasons_a_copy_is_served_uncached_agree_with_the_docs() -> None:
    """`shadowd_served_uncached_total`'s help and docs/operations.md's "served
    uncached" row name the same reasons (before, the help named three of six)."""
    help_line = next(
        line
        for line in format_prometheus(sample_stats()).splitlines()
        if line.startswith("# HELP shadowd_served_uncached_total ")
    )
    row = next(line for line in DOC.splitlines() if line.startswith("| served uncached |"))

    def reasons(text: str) -> list[str]:
        inside = re.search(r"\(([^)]*)\)", text)
        assert inside is not None, text
        return [r.strip() for r in inside.group(1).split(",")]

    assert reasons(help_line) == reasons(row)
    assert "it changed during the copy" in reasons(row)  # filling.py's reasons, all six
