# A write() that stalls half way, on purpose: its source buffer's later pages
# are registered with userfaultfd, so the kernel copies the first pages into
# the file, then waits in the page fault until the test resolves it. The
# file's timestamps change once, at the start of the write. Dirty-page
# throttling or a source buffer backed by a slow FUSE file does the same in
# real life; userfaultfd makes it deterministic. Needs root (or
# vm.unprivileged_userfaultfd=1).
#
# Must never: leave the writing thread blocked when the test ends (finish()
# resolves the fault; close() does so too, and then closes the userfaultfd).
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct
import threading

import pytest

PAGE = mmap.PAGESIZE
_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364}
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
_REGISTER_MODE_MISSING = 1
_EVENT_PAGEFAULT = 0x12
_MSG = struct.Struct("<B7xQQ8x")  # event, then pagefault.flags, pagefault.address

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.pwrite.restype = ctypes.c_ssize_t
_libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _ioctl(fd: int, request: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.ioctl(fd, request, ctypes.addressof(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd ioctl {request:#x}: {os.strerror(err)}")


def userfaultfd() -> int:
    """A new userfaultfd (O_CLOEXEC | O_NONBLOCK), its API handshake done; skips if none."""
    nr = _NR_USERFAULTFD.get(platform.machine())
    if nr is None:
        pytest.skip(f"no userfaultfd syscall number known for {platform.machine()}")
    fd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        pytest.skip(f"userfaultfd: {os.strerror(err)} (needs root or vm.unprivileged_userfaultfd)")
    api = ctypes.create_string_buffer(struct.pack("<QQQ", _UFFD_API, 0, 0), 24)
    try:
        _ioctl(fd, _UFFDIO_API, api)
    except OSError:
        os.close(fd)
        raise
    return int(fd)


class StalledWrite:
    """``pwrite(fd, data, offset)`` in a thread, stalled before byte *stall_at* of *data*.

    *stall_at* is rounded down to a page. :meth:`wait_stalled` returns once
    the kernel waits for that page of the source buffer (the file then
    holds the bytes before it, or none of them where the kernel faults the
    whole source in before copying); :meth:`finish` supplies the page and
    joins the write.
    """

    def __init__(self, fd: int, data: bytes, *, stall_at: int, offset: int = 0) -> None:
        self.fd = fd
        self.data = data
        self.offset = offset
        self.length = -(-len(data) // PAGE) * PAGE
        self.stall_at = stall_at // PAGE * PAGE
        if not 0 < self.stall_at < len(data):
            raise ValueError("stall_at must fall inside data, after its first page")
        self.uffd = userfaultfd()
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.addr: int = _libc.mmap(None, self.length, prot, flags, -1, 0)
        if self.addr in (None, ctypes.c_void_p(-1).value):
            os.close(self.uffd)
            raise OSError(ctypes.get_errno(), "mmap")
        # The pages before the stall are touched now; the rest stay missing.
        ctypes.memmove(self.addr, data[: self.stall_at], self.stall_at)
        register = ctypes.create_string_buffer(
            struct.pack(
                "<QQQQ",
                self.addr + self.stall_at,
                self.length - self.stall_at,
                _REGISTER_MODE_MISSING,
                0,
            ),
            32,
        )
        _ioctl(self.uffd, _UFFDIO_REGISTER, register)
        self.written: int | None = None
        self.error: int | None = None
        self._resolved = False
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        n = _libc.pwrite(self.fd, self.addr, len(self.data), self.offset)
        if n < 0:
            self.error = ctypes.get_errno()
        else:
            self.written = n

    def wait_stalled(self, timeout: float = 5.0) -> int:
        """Wait until the write faults on the missing page; return the faulting address offset."""
        if not select.select([self.uffd], [], [], timeout)[0]:
            raise TimeoutError("the write never reached the missing page")
        event, _flags, address = _MSG.unpack(os.read(self.uffd, _MSG.size))
        assert event == _EVENT_PAGEFAULT, event
        return int(address - self.addr)

    def finish(self, timeout: float = 5.0) -> int:
        """Supply the missing pages, let the write complete; return the bytes it wrote."""
        if not self._resolved:
            self._resolved = True
            rest = self.data[self.stall_at :].ljust(self.length - self.stall_at, b"\0")
            src = ctypes.create_string_buffer(rest, len(rest))
            copy = ctypes.create_string_buffer(
                struct.pack(
                    "<QQQQq", self.addr + self.stall_at, ctypes.addressof(src), len(rest), 0, 0
                ),
                40,
            )
            _ioctl(self.uffd, _UFFDIO_COPY, copy)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the stalled write did not complete")
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        assert self.written is not None
        return self.written

    def close(self) -> None:
        """Resolve the fault if the test did not, then release everything. Idempotent."""
        if self.uffd < 0:
            return
        try:
            if not self._resolved:
                self.finish()
        finally:
            os.close(self.uffd)  # a write still waiting would now fail with EFAULT
            self.uffd = -1
            self._thread.join(5)
            if not self._thread.is_alive():
                _libc.munmap(self.addr, self.length)
