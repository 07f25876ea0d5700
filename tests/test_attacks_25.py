# Attacks of the red team's pass 25 on the newer parts of the daemon: the index
# published to same-uid peers, told batches ("serve": false), the all-uids pin
# bound, the watches, the fd store. Each runs the daemon as a real subprocess
# and its attackers as real processes of other uids.
#
# Must never: leave a child process behind; pass for a reason other than the
# bound it names.
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import Daemon, make_file, requires_root, run_as, test_uid
from .test_attacks import require

pytestmark = requires_root

#: The attackers' uids (need not exist in /etc/passwd).
MALLORY = test_uid(90)

# Another uid fills the probe run of a file it can name (a stat of its path
# needs no read access) with files of its own: where a file's probe starts is
# slot_of(st_dev, st_ino) and the slot count (which follows --max-entries), and
# since attack 42's fix the index's slot key, which only the index's readers
# learn: the attacker guesses it (0). It makes files, keeps those whose first
# slot would be the victim's, unlinks the rest once it has enough (a number
# unlinked at once would come back at its next file), and has the daemon cache
# MAX_PROBE of the kept ones.
INDEX_FLOOD = """
import os
from shadowd.index import MAX_PROBE, slot_of
from shadowd_client import Client
def home(st):
    try:
        return slot_of(st.st_dev, st.st_ino, {slots}, 0)  # the key it cannot read, guessed
    except TypeError:
        return slot_of(st.st_dev, st.st_ino, {slots})  # an unkeyed placement: no guess needed
target = home(os.stat({victim!r}))
kept, rest = [], []
while len(kept) < MAX_PROBE:
    name = os.path.join({where!r}, f"m{{len(kept) + len(rest)}}")
    with open(name, "wb") as f:
        f.write(b"m" * 100)
    (kept if home(os.stat(name)) == target else rest).append(name)
for name in rest:
    os.unlink(name)
made = len(kept) + len(rest)
with Client({path!r}, timeout=10) as c:
    for name in kept:
        os.close(c.open(name))
out([made, len(kept)])
"""


async def test_42_another_uid_cannot_keep_a_file_out_of_the_index(
    start_daemon: Any, shared_dir: Path
) -> None:
    """A file of the daemon's uid, cached after another uid filled its probe run
    (MAX_PROBE slots from slot_of(dev, ino), as far as it can compute it) with 16 of
    its own cached files, must still be found through the index: else every open of it
    by its own clients costs a round trip, for as long as the attacker keeps its files
    cached. Before the slot key (an unkeyed placement), it was not: 16 of 17 indexed."""
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0", "--max-entries", "64"
    )
    victim = make_file(shared_dir / "libvictim.so", b"v" * 5000)
    where = shared_dir / "mallory"
    where.mkdir()
    os.chown(where, MALLORY, MALLORY)
    from shadowd.index import slots_for

    code = INDEX_FLOOD.format(
        victim=str(victim), slots=slots_for(64), where=str(where), path=str(d.socket_path)
    )
    with trio.fail_after(120):
        made, kept = await trio.to_thread.run_sync(run_as, MALLORY, code)

        def victim_opens() -> tuple[bool, int, int]:
            from shadowd_client import Client

            with Client(d.socket_path, timeout=10) as c:
                os.close(c.open(victim))  # a miss: copied and cached
                os.close(c.open(victim))  # a hit through the socket
                view = c.index()
                require(view is not None, "the daemon gave its own uid no index")
                assert view is not None
                try:
                    fd = view.open(os.stat(victim))
                finally:
                    view.close()
                s = c.stats()
            if fd is not None:
                os.close(fd)
            return fd is not None, s["entries"], s["index_entries"]

        indexed, entries, index_entries = await trio.to_thread.run_sync(victim_opens)
    print(f"made {made} files, kept {kept}; {entries} entries, {index_entries} indexed")
    require(entries == kept + 1, f"{entries} entries cached, not the attacker's {kept} and one")
    assert indexed, f"the victim's file is not in the index ({index_entries} of {entries})"


def test_43_a_copy_stuck_on_a_hung_mount_leaves_the_events_kept_bounded() -> None:
    """The daemon's own Watches, on a real inotify fd: a copy begun and never ended
    (its read hangs on a FUSE mount, and it holds the floor of what events are kept
    for copies under way), then 40,000 memfds watched and freed, one round of the
    loop (a drain) every 100: what the rounds' prunes go through, and what is kept,
    stay bounded, where they grew with every event read since the copy began; the
    stuck copy is then taken as changed (never cached), and a copy begun after it
    that saw no event of its own is not."""
    from shadowd.watches import MAX_UNDECIDED_EVENTS, Watches

    w = Watches(on_event=lambda wd: None, on_overflow=lambda: None)
    w.open()
    scanned = [0]
    prune = Watches._prune

    def counted(self: Watches) -> None:
        scanned[0] += len(self._last)
        prune(self)

    try:
        Watches._prune = counted  # type: ignore[method-assign]
        hung = w.begin()
        fd = os.memfd_create("source")
        source = w.add_memfd(fd)  # the stuck copy's own watch: no event of it comes
        events = 40_000
        for i in range(events):
            m = os.memfd_create("m")
            w.add_memfd(m)
            os.close(m)  # freed: an IN_IGNORED of a watch number never seen before
            if i % 100 == 99:
                w.drain()
        w.drain()
        later = w.begin()
        kept = len(w._last)
        print(f"{events} events: prunes went through {scanned[0]}, {kept} kept")
        assert scanned[0] <= 8 * events, scanned[0]
        assert kept <= 3 * MAX_UNDECIDED_EVENTS, kept
        assert w.changed_since(source, hung)
        assert not w.changed_since(source, later)
        os.close(fd)
    finally:
        Watches._prune = prune  # type: ignore[method-assign]
        w.close()


def test_44_stats_asked_by_many_uids_rank_the_cache_once_a_refresh() -> None:
    """The stats each unprivileged uid is answered list the top files its own uid
    named, ranked on the loop once a refresh (1 s) per viewer: every new viewer made
    the loop go through every entry twice, so that whoever has many uids (a
    subordinate range) freezes the loop by asking stats from each in turn. The
    daemon's own Server, 10,000 labelled cached entries of 50 uids, then 300 other
    uids asking stats within one refresh: the entries gone through must not grow with
    the viewers (before: twice the cache a viewer, 6,000,000), and each viewer still
    sees its own labels only."""
    from collections import OrderedDict

    from shadowd.cache import HostKey
    from shadowd.memfd import sealed_from_bytes
    from shadowd.server import Server, ServerConfig

    class Counting(OrderedDict[Any, Any]):
        visited = 0

        def values(self) -> Any:
            for value in super().values():
                Counting.visited += 1
                yield value

    server = Server(ServerConfig(socket_path="", stats_refresh=3600.0))
    entries = 10_000
    sealed = sealed_from_bytes(b"x" * 100)
    try:
        for i in range(entries):
            server.cache.insert(
                HostKey(1, i), (100, 1, 1), sealed, label=f"/f{i}", ctime_ns=1, label_uid=i % 50
            )
            server.cache.lookup(HostKey(1, i), (100, 1, 1))
        server.cache._entries = Counting(server.cache._entries)  # type: ignore[assignment]
        assert server.stats(None).entries == entries
        Counting.visited = 0
        for viewer in range(1000, 1300):
            assert server.stats(viewer).top_by_hits == ()
        seen = server.stats(7)
        visited = Counting.visited
        print(f"300 viewers of no entries and one of 200: {visited} entries gone through")
        assert {t.label for t in seen.top_by_hits} <= {f"/f{i}" for i in range(7, entries, 50)}
        assert len(seen.top_by_hits) == len(seen.top_by_bytes) == 10
        assert visited <= 2 * entries, visited
    finally:
        sealed.release()
        server.cache.clear()


# A hostile daemon of another uid (one that took the socket's name, attack 11's
# remains): its index is a real one (IndexedCache), of one file of its own,
# whose slot names a file of a FUSE mount where the memfd should be, held O_PATH
# at that number; the header's memfd device is that mount's. Every field a root
# client's checks compare (device, inode, size, mode, ctime) is the FUSE file's.
HOSTILE_INDEX = """
import os, socket, struct, threading
from pathlib import Path
from shadowd.index import LIVE
from tests.indexed import IndexedCache, serve_as_daemon
args = recv()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
listener.bind(args["socket"])
listener.listen(16)
cache = IndexedCache(Path(args["dir"]), 1)
f, st = cache.files[0]
planted = os.open(args["plant"], os.O_PATH | os.O_CLOEXEC)
fst = os.stat(planted)
index = cache.index
struct.pack_into("<Q", index._map, 24, fst.st_dev)  # the header's memfd device
index._write(
    cache.slot_number(st), LIVE, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
    st.st_ctime_ns, planted, fst.st_mode, fst.st_ino, fst.st_ctime_ns,
)
threading.Thread(target=serve_as_daemon, args=(cache, listener), daemon=True).start()
out({"file": str(f), "size": st.st_size})
recv()
"""


@pytest.mark.parametrize("path_kind", ["c", "python"])
async def test_45_a_hostile_daemons_index_cannot_make_a_root_client_wait_on_its_mount(
    shared_dir: Path, path_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root client (a supervisor) that takes the index of a daemon of another uid
    reopens what a slot names O_PATH first and checks it against the slot, the
    device against the header's memfd device: a header the daemon wrote. Naming a
    file of its own FUSE mount (whose every stat field its server chooses) at the
    device, inode, size, mode and ctime the slot says, it passes every check; the
    client then opens it for real, finds it unsealed and closes it, and that close
    waited for a flush the server never answered. The open must end, refused: the
    index itself is, since the header's memfd device is not the kernel's (a memfd of
    the client's own says which that is)."""
    import shadowd_client.index as index_module

    from .conftest import NOBODY, spawn_as
    from .fusefs import FuseFile, mounted

    if path_kind == "python":
        monkeypatch.setattr(index_module, "C_CALLS", None)
    elif index_module.C_CALLS is None:
        pytest.skip("the C extension is not built")

    work = shared_dir / "hostile"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    size = 3000  # IndexedCache's first file
    fake = FuseFile(data=b"f" * size, ino=4242, mode=0o444, hang_flush=True)
    with mounted(shared_dir / "fuse", files={"fake": fake}, hanging=0) as fs:
        child = spawn_as(NOBODY, HOSTILE_INDEX)
        try:
            sock = work / "stand.sock"
            child.send(
                {"dir": str(work), "plant": str(fs.mountpoint / "fake"), "socket": str(sock)}
            )
            said = await trio.to_thread.run_sync(child.recv)
            require(said["size"] == size, f"the stand-in's file is not {size} bytes: {said}")

            def take() -> bool:
                from shadowd_client import Client

                with Client(sock, timeout=5) as c:
                    view = c.index()
                    if view is None:
                        return False  # refused: the header's memfd device is not a memfd's
                    require(not view.direct, "root took another uid's range at its word")
                    try:
                        fd = view.open(os.stat(said["file"]))
                    finally:
                        view.close()
                if fd is not None:
                    os.close(fd)
                return fd is not None

            try:
                with trio.fail_after(10):
                    served = await trio.to_thread.run_sync(take, abandon_on_cancel=True)
            except trio.TooSlowError:
                raise AssertionError(
                    f"the client waited on the hostile daemon's FUSE file ({fs.hung_flushes} "
                    "flushes unanswered)"
                ) from None
            assert not served
        finally:
            fs.close()  # the flush fails: a client thread left waiting ends
            child.close()


# Another uid that may read a cached file publishes the descriptor the daemon
# served it, as a private file of its own: the daemon then sets the mode of its
# own memfd (a chmod to the mode it has), which moves the memfd's ctime.
REPUBLISH = """
import os
from shadowd_client import Client
from tests.wire import Raw, key_map
with Client({path!r}, timeout=10) as c:
    served = c.open({name!r})
st = os.fstat(served)
key = key_map(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
with Raw({path!r}, timeout=10) as raw:
    reply, fds = raw.call({{"op": "publish", "id": 1, "namespace": "n", "key": key}}, [served])
for fd in fds:
    os.close(fd)
os.close(served)
out(reply.get("ok"))
"""


async def test_46_a_served_descriptor_published_back_does_not_drop_the_entry(
    start_daemon: Any, shared_dir: Path
) -> None:
    """A file cached, its copy a hit; another uid (which may read it) publishes the fd
    it was served as a private file of its own, each time it likes: the daemon seals it
    in place (sealed already) and sets its mode, which moves the memfd's ctime, so the
    entry's next hit finds its memfd "changed by a holder", drops it and copies the
    file again. The owner's next open must still be a hit."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "libshared.so", b"s" * 50_000)

    def owner_opens() -> dict[str, int]:
        from shadowd_client import Client

        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                os.close(c.open(f))
            s = c.stats()
        return {k: s[k] for k in ("hits", "misses", "copies", "tampered")}

    with trio.fail_after(60):
        before = await trio.to_thread.run_sync(owner_opens)
        code = REPUBLISH.format(path=str(d.socket_path), name=str(f))
        rounds = 5
        published = [await trio.to_thread.run_sync(run_as, MALLORY, code) for _ in range(rounds)]
        after = await trio.to_thread.run_sync(owner_opens)
    print(f"published {published}; before {before}; after {after}")
    assert after["tampered"] == before["tampered"], (before, after)
    # No host copy made again: the owner's opens all hits. (The first publish is
    # copied itself since attack 49: a memfd of the daemon's own is never kept.)
    assert after["misses"] == before["misses"], (before, after)
    assert after["copies"] <= before["copies"] + 1, (before, after)
