# A tiny FUSE file system for tests, spoken directly over /dev/fuse (needs
# root): a few read-only regular files, where reading any file named hang*
# never gets an answer, as on a hung network mount. Everything else (lookup,
# getattr, open, flush, release) is answered at once.
#
# Attack tests add files of their own (FuseFile): any inode number, size,
# times, mode, owner and bytes the kernel will report as stat of that file,
# and a flush (the close of each descriptor) that is never answered.
#
# Must never: answer for files it was not given; leave the mount behind
# (close() aborts the connection, so nothing waiting on it hangs for good).
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import pytest

_IN = struct.Struct("<IIQQIIIHH")
_OUT = struct.Struct("<IiQ")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
_READ_IN = struct.Struct("<QQI")

LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, INTERRUPT = (
    1,
    2,
    3,
    14,
    15,
    18,
    25,
    26,
    36,
)
BATCH_FORGET = 42
ROOT = 1
VALID = 3600  # seconds the kernel may trust our attributes: no getattr while we hang


@attrs.frozen
class FuseFile:
    """A file the test chooses every stat field and byte of."""

    data: bytes
    ino: int
    mtime_ns: int = 1_000_000_000
    ctime_ns: int = 1_000_000_000
    mode: int = 0o444
    uid: int = 0
    gid: int = 0
    #: Never answer a flush of it: closing any descriptor of it waits until
    #: the connection is aborted.
    hang_flush: bool = False
    #: Fail every getattr of it with this errno (0: answer it): its attributes
    #: are never cached, so each fstat asks and fails, while open still works.
    getattr_errno: int = 0


#: Node ids of FuseFiles start here (the built-in files use 2..99).
_FILE_NODES = 100


class HangingFS:
    """Mount at *mountpoint*; files ``ok`` (answered) and ``hang0``..``hangN`` (never).

    *files* adds files by name, each reported and read as its FuseFile says.
    """

    def __init__(
        self,
        mountpoint: Path,
        *,
        hanging: int = 8,
        size: int = 4096,
        files: Mapping[str, FuseFile] | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.size = size
        self.names = {"ok": 2, **{f"hang{i}": 10 + i for i in range(hanging)}}
        self.files: dict[int, FuseFile] = {}
        for i, (name, file) in enumerate((files or {}).items()):
            self.names[name] = _FILE_NODES + i
            self.files[_FILE_NODES + i] = file
        self.content = b"k" * size
        self.hung_reads: set[int] = set()  # nodeids whose read is left unanswered
        self.hung_flushes = 0  # flushes left unanswered (a close that waits)
        self.seen: list[tuple[int, int]] = []  # (opcode, nodeid) of every request, in order
        self.lock = threading.Lock()
        self._stop = False
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"shadowd-test", os.fsencode(mountpoint), b"fuse", 0x2 | 0x4, opts):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"mount fuse: {os.strerror(err)}")
        self._libc = libc
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def hung(self) -> int:
        with self.lock:
            return len(self.hung_reads)

    @property
    def st_dev(self) -> int:
        """The device number the kernel gave this mount."""
        return os.stat(self.mountpoint).st_dev

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == ROOT:
            return _ATTR.pack(ROOT, 0, 0, 1, 1, 1, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        f = self.files.get(nodeid)
        if f is not None:
            m_sec, m_nsec = divmod(f.mtime_ns, 1_000_000_000)
            c_sec, c_nsec = divmod(f.ctime_ns, 1_000_000_000)
            blocks = -(-len(f.data) // 512)
            mode = 0o100000 | f.mode
            return _ATTR.pack(
                f.ino, len(f.data), blocks, m_sec, m_sec, c_sec, m_nsec, m_nsec, c_nsec,
                mode, 1, f.uid, f.gid, 0, 4096, 0,
            )  # fmt: skip
        return _ATTR.pack(nodeid, self.size, 8, 1, 1, 1, 0, 0, 0, 0o100444, 1, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self.fd, _OUT.pack(_OUT.size + len(payload), error, unique) + payload)
        except OSError:
            pass  # the request was interrupted meanwhile

    def _serve(self) -> None:
        while not self._stop:
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            try:
                msg = os.read(self.fd, 1 << 20)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                return  # unmounted or aborted
            self._handle(msg)

    def _handle(self, msg: bytes) -> None:
        _len, opcode, unique, nodeid, *_ = _IN.unpack_from(msg)
        body = msg[_IN.size :]
        with self.lock:
            self.seen.append((opcode, nodeid))
        if opcode == INIT:
            _major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            out = _INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, 131072, 1, 32, 0, 0, 0, 0)
            self._reply(unique, out)
        elif opcode == LOOKUP:
            name = body.split(b"\0", 1)[0].decode()
            node = self.names.get(name) if nodeid == ROOT else None
            if node is None:
                self._reply(unique, error=-errno.ENOENT)
            else:
                failing = node in self.files and self.files[node].getattr_errno
                head = struct.pack("<QQQQII", node, 0, VALID, 0 if failing else VALID, 0, 0)
                self._reply(unique, head + self._attr(node))
        elif opcode == GETATTR and nodeid in self.files and self.files[nodeid].getattr_errno:
            self._reply(unique, error=-self.files[nodeid].getattr_errno)
        elif opcode == GETATTR:
            self._reply(unique, struct.pack("<QII", VALID, 0, 0) + self._attr(nodeid))
        elif opcode == OPEN:
            self._reply(unique, struct.pack("<QII", nodeid, 0, 0))
        elif opcode == READ:
            _fh, offset, size = _READ_IN.unpack_from(body)
            f = self.files.get(nodeid)
            if f is not None:
                self._reply(unique, f.data[offset : offset + size])
            elif nodeid == self.names["ok"]:
                self._reply(unique, self.content[offset : offset + size])
            else:
                with self.lock:
                    self.hung_reads.add(nodeid)  # and never answered
        elif opcode == FLUSH and nodeid in self.files and self.files[nodeid].hang_flush:
            with self.lock:
                self.hung_flushes += 1  # and never answered
        elif opcode in (FLUSH, RELEASE):
            self._reply(unique)
        elif opcode in (FORGET, BATCH_FORGET, INTERRUPT):
            pass  # no answer expected
        else:
            self._reply(unique, error=-errno.ENOSYS)

    def close(self) -> None:
        """Abort the connection (every hung read fails at once) and unmount. Idempotent."""
        if self._stop:
            return
        self._stop = True
        self._thread.join(timeout=5)
        os.close(self.fd)  # the last fd of the connection: the kernel aborts it
        self._libc.umount2(os.fsencode(self.mountpoint), 2)  # MNT_DETACH


@contextlib.contextmanager
def mounted(
    mountpoint: Path, *, files: Mapping[str, FuseFile] | None = None, hanging: int = 8
) -> Iterator[HangingFS]:
    """A HangingFS on *mountpoint* (made here), with *hanging* files whose reads never
    end; the test is skipped where FUSE cannot mount."""
    mountpoint.mkdir()
    try:
        fs = HangingFS(mountpoint, files=files, hanging=hanging)
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot mount a FUSE file system here: {exc}")
    try:
        yield fs
    finally:
        fs.close()
