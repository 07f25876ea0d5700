# report.py and prometheus.py: the Prometheus exposition parsed strictly, the
# table's new rows, labels that cannot reach a terminal raw, the --watch
# rates; and the daemon's log lines when stderr is the journal.
from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from shadowd.cache import HostKey
from shadowd.daemon import configure_logging, status_line, stream_is_journal
from shadowd.memfd import sealed_from_bytes
from shadowd.prometheus import format_prometheus, format_prometheus_down
from shadowd.protocol import ErrorCode
from shadowd.report import format_json, format_rates, format_table
from shadowd.server import Server, ServerConfig
from shadowd.stats import LATENCY_BOUNDS, Histogram, Latencies, Stats, TopEntry

from . import promtext

TRICKY = 'C:\\dir\\"quoted"\nnext line \x1b[2J'


def sample_stats(**changes: Any) -> Stats:
    base = Stats(
        server="shadowd/0.1.0",
        uptime_seconds=12.5,
        hits=90,
        misses=10,
        entries=3,
        bytes=3000,
        evictions=2,
        invalidations=1,
        uncached=4,
        refused=3,
        copies=9,
        bytes_copied=123456,
        clients=2,
        clients_total=7,
        max_entries=100,
        max_bytes=1 << 30,
        max_file_size=256 << 20,
        private_hits=5,
        private_misses=1,
        private_entries=1,
        private_bytes=100,
        open_fds=40,
        open_fds_age_seconds=0.25,
        fd_limit=1024,
        top_by_hits=(TopEntry("/lib/libc.so.6", 50, 2000), TopEntry(TRICKY, 5, 1)),
        top_by_bytes=(TopEntry("/lib/libc.so.6", 50, 2000), TopEntry("/lib/libc.so.6", 1, 10)),
        refused_by_code={"not-regular": 2, "file-too-large": 1},
        memory_bytes=12288,
        rss_bytes=30_000_000,
        fdstore_entries=3,
        fdstore_max=64,
        restored_entries=2,
        limits={"max_request": 65536, "max_clients": 4096, "max_inflight": 32},
        limit_hits={"max_inflight": 3},
        latency=sample_latency(),
    )
    return attrs.evolve(base, **changes)


def sample_latency() -> Latencies:
    """90 hits of 30 us and 10 of 400 us; 10 misses of 3 ms; no copies."""
    latency = Latencies()
    for _ in range(90):
        latency.observe("hit", 30e-6)
    for _ in range(10):
        latency.observe("hit", 400e-6)
        latency.observe("miss", 3e-3)
    return latency


def test_prometheus_output_parses_strictly_with_our_rules() -> None:
    text = format_prometheus(sample_stats(), paths=True)
    families = promtext.parse(text)
    for name, fam in families.items():
        assert name.startswith("shadowd_"), name
        assert fam.help and fam.type in ("counter", "gauge", "histogram"), name
        assert (fam.type == "counter") == name.endswith("_total"), name
        assert fam.type != "histogram" or name.endswith("_seconds"), name
        # Base units: no kilo-, mega- or milli- anything.
        assert not any(u in name for u in ("_kb", "_mb", "_kib", "_ms", "_millis")), name
    f = families
    assert f["shadowd_hits_total"].value(kind="host") == 85
    assert f["shadowd_hits_total"].value(kind="private") == 5
    assert f["shadowd_misses_total"].value(kind="host") == 9
    assert f["shadowd_uptime_seconds"].value() == 12.5
    assert f["shadowd_cache_bytes"].value() == 3000
    assert f["shadowd_cache_memory_bytes"].value() == 12288
    assert f["shadowd_copied_bytes_total"].value() == 123456
    assert f["shadowd_open_fds"].value() == 40 and f["shadowd_max_fds"].value() == 1024
    assert f["shadowd_open_fds_age_seconds"].value() == 0.25
    assert f["shadowd_fdstore_entries"].value() == 3
    assert f["shadowd_fdstore_restored_entries"].value() == 2
    assert f["shadowd_info"].value(version="0.1.0") == 1
    refusals = f["shadowd_refusals_total"]
    assert refusals.value(code="not-regular") == 2
    assert refusals.value(code="busy") == 0  # every code, so rate() works from the start
    assert len(refusals.samples) == len(ErrorCode)
    # A label with quotes, backslashes and a newline comes back exactly.
    assert f["shadowd_top_file_hits"].value(path=TRICKY) == 5
    # Two entries with one label are one series.
    assert f["shadowd_top_file_saved_bytes"].value(path="/lib/libc.so.6") == 100_010
    assert f["shadowd_up"].value() == 1


def test_prometheus_writes_no_path_label_unless_asked() -> None:
    """Its output is read by others than the viewer the daemon answered (attack 50)."""
    without = promtext.parse(format_prometheus(sample_stats()))
    assert not [name for name in without if name.startswith("shadowd_top_file_")]
    assert "shadowd_hits_total" in without


def test_limits_are_split_by_unit_and_every_limit_has_a_reached_counter() -> None:
    f = promtext.parse(format_prometheus(sample_stats()))
    # Bytes and counts in families of their own: one unit per family.
    assert f["shadowd_limit_bytes"].samples == {frozenset({("limit", "max_request")}): 65536}
    assert f["shadowd_limit"].value(limit="max_clients") == 4096
    assert frozenset({("limit", "max_request")}) not in f["shadowd_limit"].samples
    # Every limit has a series from the start, 0 until a peer first runs into it.
    reached = f["shadowd_limit_reached_total"]
    assert reached.value(limit="max_inflight") == 3
    assert reached.value(limit="max_clients") == 0
    assert reached.value(limit="max_request") == 0


def test_latency_is_a_proper_prometheus_histogram() -> None:
    f = promtext.parse(format_prometheus(sample_stats()))
    hist = f["shadowd_latency_seconds"]
    assert hist.type == "histogram"
    hits = dict(hist.buckets(kind="hit"))
    assert hits[2e-5] == 0 and hits[5e-5] == 90 and hits[5e-4] == 100
    assert hits[math.inf] == 100 == hist.count(kind="hit")
    assert hist.sum(kind="hit") == pytest.approx(90 * 30e-6 + 10 * 400e-6)
    assert hist.count(kind="miss") == 10 and hist.count(kind="copy") == 0
    assert [le for le, _ in hist.buckets(kind="copy")] == [*LATENCY_BOUNDS, math.inf]


def test_a_textfile_without_a_daemon_says_so_and_when() -> None:
    f = promtext.parse(format_prometheus_down(now=1700000000.5))
    assert f["shadowd_up"].value() == 0
    assert f["shadowd_scrape_timestamp_seconds"].value() == 1700000000.5
    assert set(f) == {"shadowd_up", "shadowd_scrape_timestamp_seconds"}
    up = promtext.parse(format_prometheus(sample_stats(), now=1700000001.0))
    assert up["shadowd_scrape_timestamp_seconds"].value() == 1700000001.0


def test_json_hit_rate_is_null_before_any_lookup_and_top_files_are_objects() -> None:
    data = json.loads(format_json(sample_stats(hits=0, misses=0)))
    assert data["hit_rate"] is None
    assert json.loads(format_json(sample_stats()))["hit_rate"] == 0.9
    assert data["top_by_hits"][0] == {
        "path": "/lib/libc.so.6",
        "hits": 50,
        "size": 2000,
        "bytes_saved": 100_000,
    }
    assert data["latency"]["hit"]["counts"][LATENCY_BOUNDS.index(5e-5)] == 90
    # What the CLI reads back is what was written.
    assert Stats.from_wire(data) == sample_stats(hits=0, misses=0)


def test_stats_from_an_older_daemon_still_read() -> None:
    wire = sample_stats().to_wire()
    wire["top_by_hits"] = [["/lib/libc.so.6", 50, 2000]]  # positional, as before
    del wire["latency"]
    old = Stats.from_wire(wire)
    assert old.top_by_hits == (TopEntry("/lib/libc.so.6", 50, 2000),)
    assert old.latency == Latencies()


def test_histogram_buckets_merge_and_wire() -> None:
    a, b = Histogram(), Histogram()
    a.observe(1e-5)  # exactly on a bound: in that bucket (le means at most)
    a.observe(11.0)  # above every bound
    b.observe(0.003)
    assert a.cumulative()[1] == (1e-5, 1) and a.cumulative()[-1] == (math.inf, 2)
    merged = a.merge(b)
    assert merged.count == 3 and merged.sum == pytest.approx(11.00301)
    assert (a.count, b.count) == (2, 1)  # merging changes neither
    assert Histogram.from_wire(merged.to_wire()) == merged
    assert merged.quantile(0.5) == 5e-3 and merged.quantile(1.0) == math.inf
    assert Histogram().quantile(0.5) is None
    with pytest.raises(ValueError):
        a.merge(Histogram(bounds=(1.0, 2.0)))
    with pytest.raises(ValueError):
        Histogram(bounds=(2.0, 1.0))
    both = Latencies()
    both.observe("copy", 0.25)
    assert both.merge(sample_latency()).copy_.count == 1
    assert Latencies.from_wire(both.to_wire()) == both


def test_a_server_of_today_builds_stats_with_empty_latency() -> None:
    server = Server(ServerConfig(socket_path=""))
    assert server.stats().latency.hit.count >= 0
    assert Stats.from_wire(server.stats().to_wire()).latency == server.stats().latency


def test_prometheus_leaves_out_what_the_daemon_could_not_measure() -> None:
    families = promtext.parse(
        format_prometheus(sample_stats(open_fds=-1, open_fds_age_seconds=-1.0, rss_bytes=-1))
    )
    assert "shadowd_open_fds" not in families
    assert "shadowd_open_fds_age_seconds" not in families
    assert "shadowd_resident_memory_bytes" not in families


HIST = "# TYPE shadowd_h_seconds histogram\n"


@pytest.mark.parametrize(
    "bad",
    [
        HIST + 'shadowd_h_seconds_bucket{le="1"} 1\nshadowd_h_seconds_sum 1\n'
        "shadowd_h_seconds_count 1\n",  # no +Inf bucket
        HIST + 'shadowd_h_seconds_bucket{le="1"} 2\nshadowd_h_seconds_bucket{le="+Inf"} 1\n'
        "shadowd_h_seconds_sum 1\nshadowd_h_seconds_count 1\n",  # not cumulative
        HIST + 'shadowd_h_seconds_bucket{le="+Inf"} 1\nshadowd_h_seconds_bucket{le="1"} 1\n'
        "shadowd_h_seconds_sum 1\nshadowd_h_seconds_count 1\n",  # le not increasing
        HIST + 'shadowd_h_seconds_bucket{le="+Inf"} 2\nshadowd_h_seconds_sum 1\n'
        "shadowd_h_seconds_count 1\n",  # _count is not the +Inf bucket
        HIST + 'shadowd_h_seconds_bucket{le="+Inf"} 1\nshadowd_h_seconds_count 1\n',  # no _sum
        HIST + "shadowd_h_seconds_bucket 1\n",  # a bucket without le
        HIST + 'shadowd_h_seconds_bucket{le="+Inf"} 1\nshadowd_h_seconds_sum{le="1"} 1\n'
        "shadowd_h_seconds_count 1\n",  # le on _sum
        HIST + "shadowd_h_seconds 1\n",  # a sample without a suffix
        HIST + 'shadowd_h_seconds_bucket{le="+Inf"} 1\nshadowd_x 1\n'
        "shadowd_h_seconds_sum 1\nshadowd_h_seconds_count 1\n",  # not together
        "shadowd_x 1",  # no final newline
        "shadowd_x{a=1} 1\n",  # unquoted
        'shadowd_x{a="\\q"} 1\n',  # unknown escape
        'shadowd_x 1\nshadowd_y 1\nshadowd_x{a="b"} 2\n',  # not together
        "shadowd_x 1\nshadowd_x 2\n",  # duplicate series
        "shadowd_x 1\n# TYPE shadowd_x gauge\n",  # TYPE after samples
        "# TYPE shadowd_x gauge\n# TYPE shadowd_x counter\n",
        "shadowd_x one\n",
        "9x 1\n",
    ],
)
def test_the_strict_reader_is_strict(bad: str) -> None:
    with pytest.raises(promtext.FormatError):
        promtext.parse(bad)


def test_table_shows_memory_fd_store_fds_and_both_top_lists() -> None:
    table = format_table(sample_stats(), "/run/shadowd/shadowd.sock")
    assert "latency" in table
    assert "hit p50 <= 50 us, p99 <= 500 us (100); miss p50 <= 5 ms, p99 <= 5 ms (10)" in table
    assert "copy p50" not in table  # no copies timed: nothing to say
    assert "12.0 KiB in cached memfds (whole pages); daemon resident 28.6 MiB" in table
    assert "open fds" in table and "40 of 1024 (3.9%)\n" in table  # a fresh count: no age
    old = format_table(sample_stats(open_fds_age_seconds=63.5))
    assert "40 of 1024 (3.9%), counted 1m03s ago" in old
    assert "3 of 64 entries kept for warm restarts; 2 restored at start" in table
    assert "by bytes not copied" in table and "by hits" in table
    assert "evicted file stays in memory" in table
    # A label is printed with its control characters escaped, never raw.
    assert "\x1b" not in table and "\\x1b[2J" in table
    off = format_table(sample_stats(fdstore_entries=0, fdstore_max=0, restored_entries=0))
    assert "off (the cache starts cold after a restart)" in off


def test_rates_between_two_snapshots() -> None:
    before = sample_stats()
    after = sample_stats(
        hits=190, misses=10, bytes_copied=123456 + 2048, evictions=4, uptime_seconds=14.5
    )
    line = format_rates(before, after, 2.0)
    assert "50.0 opens/s" in line and "hit rate 100.0%" in line
    assert "1.0 KiB/s copied" in line and "1.0 evictions/s" in line
    # A restarted daemon (uptime went back): no rates from two daemons.
    assert "next refresh" in format_rates(after, before, 2.0)


def test_status_line_is_one_line() -> None:
    server = Server(ServerConfig(socket_path=""))
    assert status_line(server) == "0 files, 0 B cached; 0 hits, 0 misses (hit rate -); 0 clients"
    f = sealed_from_bytes(b"x" * 3000)
    server.cache.insert(HostKey(1, 1), (3000, 1, 1), f, ctime_ns=1)
    f.release()
    for _ in range(9):
        server.cache.lookup(HostKey(1, 1), (3000, 1, 1))
    server.cache.lookup(HostKey(1, 2), (5, 1, 1))
    line = status_line(server)
    assert "\n" not in line
    assert line == "1 files, 2.9 KiB cached; 9 hits, 1 misses (hit rate 90.0%); 0 clients"
    server.cache.clear()


@pytest.mark.parametrize("refresh", [3600.0, 0.0])
async def test_costly_stats_are_reused_within_the_refresh_interval(refresh: float) -> None:
    """The fd count and the top files (scans) are not redone on every stats request.

    The counters stay live either way. A stats request starts an fd count
    (in a worker thread) only when the last one began *refresh* seconds ago
    or more; the stats answer with the last finished count until it is done.
    """
    server = Server(ServerConfig(socket_path="", stats_refresh=refresh))
    f = sealed_from_bytes(b"x" * 3000)
    server.cache.insert(HostKey(1, 1), (3000, 1, 1), f, label="/lib/a.so", ctime_ns=1)
    f.release()
    fds = server.collector.fds
    assert server.stats().open_fds == -1  # not counted yet, and not serving: nothing starts one
    assert not fds.running
    extra = -1
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                server.collector.nursery = nursery  # as serve() does
                await fds.since(time.monotonic())  # a first count, as serve() makes
                first = server.stats()
                assert first.top_by_hits == () and first.open_fds > 0
                server.cache.lookup(HostKey(1, 1), (3000, 1, 1))
                acted = time.monotonic()
                extra = os.open("/dev/null", os.O_RDONLY)
                answered = server.stats()  # starts a count at refresh 0, none at 3600
                assert answered.open_fds == first.open_fds  # the last count, meanwhile
                assert fds.running == (not refresh)
                if fds.running:
                    assert await fds.since(acted) == first.open_fds + 1
                second = server.stats()
                server.collector.nursery = None
    finally:
        if extra >= 0:
            os.close(extra)
        server.cache.clear()
    assert second.hits == first.hits + 1
    if refresh:
        assert second.top_by_hits == () and second.open_fds == first.open_fds
    else:
        assert second.top_by_hits == (TopEntry("/lib/a.so", 1, 3000),)
        assert second.open_fds == first.open_fds + 1
        assert 0 <= second.open_fds_age_seconds <= time.monotonic() - acted


# -- logging ------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def log_through(journal: bool, monkeypatch: pytest.MonkeyPatch) -> str:
    r, w = os.pipe()
    with os.fdopen(w, "w") as stream, os.fdopen(r) as reader:
        st = os.fstat(w)
        value = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
        monkeypatch.setenv("JOURNAL_STREAM", value)
        configure_logging("debug", stream=stream)
        logging.getLogger("shadowd.test").info("started")
        logging.getLogger("shadowd.test").warning("refused")
        stream.flush()
        stream.close()
        return reader.read()


def test_journal_lines_have_no_timestamp_and_carry_the_level(
    root_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert log_through(True, monkeypatch) == (
        "<6>INFO shadowd.test: started\n<4>WARNING shadowd.test: refused\n"
    )


def test_an_inherited_journal_stream_does_not_count(
    root_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JOURNAL_STREAM names another stream: stderr was redirected, keep timestamps.
    lines = log_through(False, monkeypatch).splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO shadowd.test: started") and lines[0][:4].isdigit()


def test_stream_is_journal_needs_a_real_descriptor() -> None:
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "garbage"})


def test_unknown_fd_limit_is_not_a_negative_percentage() -> None:
    from shadowd.report import _pct

    assert _pct(10, -1) == "-" and _pct(-1, 100) == "-" and _pct(5, 0) == "-"
    assert _pct(25, 100) == "25.0%"


def test_a_user_sees_only_the_labels_its_own_uid_sent() -> None:
    """Paths in the top files say something about their owner: others are not shown them."""
    server = Server(ServerConfig(socket_path="", stats_refresh=0.0))
    for ino, (label, uid) in enumerate([("/home/alice/payroll.xlsx", 1000), ("/lib/b.so", 1001)]):
        f = sealed_from_bytes(b"x" * 3000)
        server.cache.insert(
            HostKey(1, ino), (3000, 1, 1), f, label=label, ctime_ns=1, label_uid=uid
        )
        f.release()
        server.cache.lookup(HostKey(1, ino), (3000, 1, 1))
    try:
        both = {"/home/alice/payroll.xlsx", "/lib/b.so"}
        for viewer in (None, 0, os.geteuid()):
            seen = server.stats(viewer)
            assert {t.label for t in seen.top_by_hits} == both
            assert {t.label for t in seen.top_by_bytes} == both
        for viewer, own in ((1000, "/home/alice/payroll.xlsx"), (1001, "/lib/b.so")):
            seen = server.stats(viewer)
            assert [t.label for t in seen.top_by_hits] == [own]
            assert [t.label for t in seen.top_by_bytes] == [own]
        assert server.stats(1002).top_by_hits == ()
    finally:
        server.cache.clear()
