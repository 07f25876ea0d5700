# The listening socket's neighbourhood: nothing created next to the socket
# follows a link someone planted, and a directory others could write to is
# refused unless it is sticky.
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from shadowd.errors import ConfigError
from shadowd.listener import Listener

from .conftest import NOBODY, requires_root


def _secret(tmp_path: Path) -> Path:
    target = tmp_path / "secret"
    target.write_bytes(b"root's own bytes\n")
    target.chmod(0o600)
    return target


def _sticky_dir(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def test_a_planted_symlink_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = _secret(tmp_path)
    shared = _sticky_dir(tmp_path)
    (shared / "s.sock.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        Listener.bind(str(shared / "s.sock"))
    assert target.read_bytes() == b"root's own bytes\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert not (shared / "s.sock").exists()


def test_a_planted_hard_link_lock_file_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    target = _secret(tmp_path)
    shared = _sticky_dir(tmp_path)
    os.link(target, shared / "s.sock.lock")
    with pytest.raises(ConfigError, match="one link"):
        Listener.bind(str(shared / "s.sock"))
    assert target.read_bytes() == b"root's own bytes\n"


@requires_root
def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    shared = _sticky_dir(tmp_path)
    lock = shared / "s.sock.lock"
    lock.write_bytes(b"theirs\n")
    os.chown(lock, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="not a file of this user's"):
        Listener.bind(str(shared / "s.sock"))
    assert lock.read_bytes() == b"theirs\n"


def test_a_directory_others_may_write_to_is_refused_unless_sticky(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        Listener.bind(str(open_dir / "s.sock"))
    assert list(open_dir.iterdir()) == []  # not even the lock file
    shared = _sticky_dir(tmp_path)
    listener = Listener.bind(str(shared / "s.sock"))
    try:
        assert (shared / "s.sock").is_socket()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(shared / "s.sock"))
        finally:
            probe.close()
    finally:
        listener.close()
    assert not (shared / "s.sock").exists()


@requires_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="belongs to uid"):
        Listener.bind(str(theirs / "s.sock"))
    assert list(theirs.iterdir()) == []
