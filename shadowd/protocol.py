# The shadowd wire protocol, sans-I/O (in the style of h11).
#
# Datagram bytes and the fds that came with them go in; typed events come out.
# Events go in; bytes and the fds to attach come out. Both roles live here
# (ServerConnection, ClientConnection), so the daemon and the client library
# cannot disagree about the format. The spec is docs/protocol.md; its example
# bytes are checked against this module by tests/test_protocol_doc.py.
#
# Must never: do I/O, import trio, or close an fd. Every fd handed to
# `receive` comes back out, either inside the returned event or in the
# `fds` of the ProtocolError that is raised, so the caller can account for
# all of them. Any exception other than ProtocolError escaping `receive` is
# a bug.
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, TypeAlias

import attrs
import msgpack

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

MAX_ID = 2**64 - 1
MAX_LABEL_BYTES = 4096
#: The smallest max_request a daemon may set (its hello reply says its own).
MIN_MAX_REQUEST = 512
MAX_CLIENT_NAME = 256
# Largest batch the format allows; a server may advertise a smaller one.
MAX_BATCH_LIMIT = 250
#: The most descriptors the kernel passes in one datagram (SCM_MAX_FD): a
#: server receives them all, however many a request may carry, so that none
#: is closed by the kernel in the receiving thread (the last close of a large
#: file frees it, which can take the kernel milliseconds and more).
SCM_MAX_FD = 253
# A private namespace names an image (a digest, say), not its contents.
MAX_NAMESPACE_BYTES = 255
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1


class ErrorCode(enum.StrEnum):
    """Stable error codes. Never renamed or reused; new ones may be added."""

    BAD_REQUEST = "bad-request"
    REQUEST_TOO_LARGE = "request-too-large"
    UNSUPPORTED_VERSION = "unsupported-version"
    HELLO_REQUIRED = "hello-required"
    UNKNOWN_OP = "unknown-op"
    BAD_FDS = "bad-fds"
    NOT_REGULAR = "not-regular"
    NOT_READABLE = "not-readable"
    FILE_TOO_LARGE = "file-too-large"
    UNSTABLE = "unstable"
    IO_ERROR = "io-error"
    NOT_PERMITTED = "not-permitted"
    SIZE_MISMATCH = "size-mismatch"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal"
    NO_INDEX = "no-index"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ProtocolError(Exception):
    """A datagram that breaks the protocol.

    ``fds`` are the descriptors that arrived with it: the caller owns them and
    must close them. ``id`` is the request id when it could be read, so the
    error can be answered. ``fatal`` means the connection cannot go on.
    """

    code: ClassVar[ErrorCode] = ErrorCode.BAD_REQUEST
    default_fatal: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        id: int | None = None,
        fds: Sequence[int] = (),
        fatal: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.id = id
        self.fds: tuple[int, ...] = tuple(fds)
        self.fatal = self.default_fatal if fatal is None else fatal


class MalformedMessage(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class MessageTooLarge(ProtocolError):
    code = ErrorCode.REQUEST_TOO_LARGE
    default_fatal = True


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION
    default_fatal = True


class HelloRequired(ProtocolError):
    code = ErrorCode.HELLO_REQUIRED
    default_fatal = True


class UnknownOp(ProtocolError):
    code = ErrorCode.UNKNOWN_OP


class BadFds(ProtocolError):
    code = ErrorCode.BAD_FDS


# ---------------------------------------------------------------------------
# Events: requests (client -> server)
# ---------------------------------------------------------------------------


@attrs.frozen
class Hello:
    """First message on every connection: the protocol version spoken."""

    id: int
    version: int = PROTOCOL_VERSION
    client: str | None = None


@attrs.frozen
class Open:
    """Serve the file behind ``fd``. ``label`` names it in stats, never for access.

    ``wait`` False (version 2): a miss is answered at once, without an fd
    (:class:`Missed`), while the daemon copies in the background.
    """

    id: int
    fd: int
    label: str | None = None
    wait: bool = True


@attrs.frozen
class OpenBatch:
    """Serve several files in one round trip; ``labels`` is empty or one per fd.

    ``serve`` False (version 2, implies ``wait`` False): the client only tells of
    files it has; no item is answered with an fd (:class:`MissedItem`, ``hit``
    saying whether the daemon holds that version).
    """

    id: int
    fds: tuple[int, ...]
    labels: tuple[str | None, ...] = ()
    wait: bool = True
    serve: bool = True


@attrs.frozen
class StatsRequest:
    id: int


@attrs.frozen
class FileKey:
    """What a private file's owner read from its own fstat: identity and version.

    ``ctime_ns`` is None when the owner's filesystem has no ctime it trusts;
    the version is then (size, mtime_ns) alone.
    """

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int | None = None

    @property
    def version(self) -> tuple[int, int, int | None]:
        return (self.size, self.mtime_ns, self.ctime_ns)


@attrs.frozen
class Lookup:
    """Ask for a private file by namespace and key; a miss carries no fd."""

    id: int
    namespace: str
    key: FileKey


@attrs.frozen
class Publish:
    """Offer the bytes of a private file as ``fd`` (a memfd) after a miss."""

    id: int
    namespace: str
    key: FileKey
    fd: int


@attrs.frozen
class IndexRequest:
    """Ask for the index of the cache (a read-only memfd; docs/protocol.md, "The index")."""

    id: int


#: Most (dev, ino, hits) triples one report may carry.
MAX_REPORT = 4096


@attrs.frozen
class Report:
    """Hits a client served itself through the index, per file: (dev, ino, hits)."""

    id: int
    hits: tuple[tuple[int, int, int], ...]


Request: TypeAlias = (
    Hello | Open | OpenBatch | StatsRequest | Lookup | Publish | IndexRequest | Report
)


# ---------------------------------------------------------------------------
# Events: replies (server -> client)
# ---------------------------------------------------------------------------


@attrs.frozen
class HelloReply:
    id: int
    version: int
    server: str
    limits: Mapping[str, int] = attrs.field(factory=dict)


#: (size, mtime_ns, ctime_ns): the version of a host file whose bytes were served.
Version: TypeAlias = tuple[int, int, int]


@attrs.frozen
class Opened:
    """A served descriptor (attached) for an `Open` request.

    Version 2 adds ``version`` (whose bytes the fd holds) and ``cached``
    (whether that version is in the daemon's cache now).
    """

    id: int
    fd: int
    size: int
    hit: bool
    version: Version | None = None
    cached: bool | None = None


@attrs.frozen
class OpenedItem:
    """One served descriptor inside a `BatchOpened`."""

    fd: int
    size: int
    hit: bool
    version: Version | None = None
    cached: bool | None = None


@attrs.frozen
class Missed:
    """Version 2: a miss of an ``Open`` with ``wait`` False, answered without an fd.

    ``filling``: the daemon is copying that version into its cache now.
    """

    id: int
    filling: bool


@attrs.frozen
class MissedItem:
    """Version 2: an item of a batch with ``wait`` False answered without an fd: a
    miss, or (``hit``) a version the daemon holds, in a batch with ``serve`` False."""

    filling: bool
    hit: bool = False


@attrs.frozen
class Refusal:
    """One refused item inside a `BatchOpened`."""

    code: str
    message: str


@attrs.frozen
class BatchOpened:
    id: int
    results: tuple[OpenedItem | MissedItem | Refusal, ...]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(r.fd for r in self.results if isinstance(r, OpenedItem))


@attrs.frozen
class StatsReply:
    id: int
    stats: Mapping[str, Any]


@attrs.frozen
class IndexReply:
    """The index (attached, read-only), and what the client needs to read it."""

    id: int
    fd: int
    pid: int
    slots: int


@attrs.frozen
class Reported:
    """A report was counted."""

    id: int


@attrs.frozen
class LookupMiss:
    """A `Lookup` found nothing: publish the file to share it."""

    id: int


@attrs.frozen
class ErrorReply:
    """A refused request. ``id`` is None when the request's id was unreadable."""

    id: int | None
    code: str
    message: str


Reply: TypeAlias = (
    HelloReply
    | Opened
    | Missed
    | BatchOpened
    | StatsReply
    | LookupMiss
    | ErrorReply
    | IndexReply
    | Reported
)


# ---------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not used by this protocol")


def _unpack(data: bytes | memoryview, fds: Sequence[int]) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            timestamp=0,
        )
    except Exception as exc:
        # The parser boundary: whatever msgpack thinks of these bytes, it is
        # a malformed datagram to us.
        raise MalformedMessage(
            f"datagram is not one msgpack object ({type(exc).__name__})", fds=fds, fatal=True
        ) from None
    if not isinstance(obj, dict):
        raise MalformedMessage(
            f"datagram must be a msgpack map, got {type(obj).__name__}", fds=fds, fatal=True
        )
    # Keys that are not strings cannot match any field name; like unknown
    # keys, they are ignored.
    return obj


def _read_id(msg: Mapping[str, Any], fds: Sequence[int]) -> int:
    value = msg.get("id")
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise MalformedMessage("'id' must be an unsigned integer below 2**64", fds=fds, fatal=True)
    return value


def _field(
    msg: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    *,
    id: int | None,
    fds: Sequence[int],
    required: bool = True,
) -> Any:
    if key not in msg or msg[key] is None:
        if required:
            raise MalformedMessage(f"missing field {key!r}", id=id, fds=fds)
        return None
    value = msg[key]
    # bool is an int subclass; a field that wants an int must not take True.
    if not isinstance(value, kind) or (kind is int and type(value) is bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise MalformedMessage(
            f"field {key!r} must be {names}, got {type(value).__name__}", id=id, fds=fds
        )
    return value


def _uint(msg: Mapping[str, Any], key: str, *, id: int | None, fds: Sequence[int]) -> int:
    value: int = _field(msg, key, int, id=id, fds=fds)
    if not 0 <= value <= MAX_ID:
        raise MalformedMessage(f"field {key!r} out of range", id=id, fds=fds)
    return value


def _label(value: Any, *, id: int | None, fds: Sequence[int]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedMessage("a path label must be a string", id=id, fds=fds)
    # A code point takes at most 4 bytes in UTF-8: most labels need no encoding.
    if len(value) * 4 > MAX_LABEL_BYTES and len(value.encode("utf-8", "surrogatepass")) > (
        MAX_LABEL_BYTES
    ):
        raise MalformedMessage(
            f"a path label must be at most {MAX_LABEL_BYTES} bytes", id=id, fds=fds
        )
    return value


def _int64(msg: Mapping[str, Any], key: str, *, id: int | None, fds: Sequence[int]) -> int:
    value: int = _field(msg, key, int, id=id, fds=fds)
    if not MIN_INT64 <= value <= MAX_INT64:
        raise MalformedMessage(f"field {key!r} out of range", id=id, fds=fds)
    return value


def _namespace(msg: Mapping[str, Any], *, id: int, fds: Sequence[int]) -> str:
    value: str = _field(msg, "namespace", str, id=id, fds=fds)
    # As with labels: most namespaces need no encoding to be measured.
    if not value or (
        len(value) * 4 > MAX_NAMESPACE_BYTES
        and len(value.encode("utf-8", "surrogatepass")) > MAX_NAMESPACE_BYTES
    ):
        raise MalformedMessage(
            f"'namespace' must be 1 to {MAX_NAMESPACE_BYTES} bytes", id=id, fds=fds
        )
    return value


def _file_key(msg: Mapping[str, Any], *, id: int, fds: Sequence[int]) -> FileKey:
    raw = _field(msg, "key", dict, id=id, fds=fds)
    ctime_ns = None
    if raw.get("ctime_ns") is not None:
        ctime_ns = _int64(raw, "ctime_ns", id=id, fds=fds)
    return FileKey(
        ino=_uint(raw, "ino", id=id, fds=fds),
        size=_uint(raw, "size", id=id, fds=fds),
        mtime_ns=_int64(raw, "mtime_ns", id=id, fds=fds),
        ctime_ns=ctime_ns,
    )


def _report_hits(
    msg: Mapping[str, Any], id: int, fds: Sequence[int]
) -> tuple[tuple[int, int, int], ...]:
    raw = _field(msg, "hits", list, id=id, fds=fds)
    if len(raw) > MAX_REPORT:
        raise MalformedMessage(f"'hits' has more than {MAX_REPORT} files", id=id, fds=fds)
    out: list[tuple[int, int, int]] = []
    append = out.append
    for item in raw:
        # Any peer may send 4096 of these, and they are parsed before the daemon
        # knows whether it may report: the checks of _uint, inline, in the fewest
        # steps; _bad_hit says what is wrong with one that fails them.
        if type(item) is list and len(item) == 3:
            dev, ino, n = item
            if (
                type(dev) is int
                and type(ino) is int
                and type(n) is int
                and 0 <= dev <= MAX_ID
                and 0 <= ino <= MAX_ID
                and 0 <= n <= MAX_ID
            ):
                append((dev, ino, n))
                continue
        _bad_hit(item, id, fds)
    return tuple(out)


def _bad_hit(item: object, id: int, fds: Sequence[int]) -> NoReturn:
    """Raise the refusal that names what is wrong with a report's *item*."""
    if type(item) is list and len(item) == 3:
        parts = {"dev": item[0], "ino": item[1], "hits": item[2]}
        for name in parts:
            _uint(parts, name, id=id, fds=fds)
    raise MalformedMessage("each of 'hits' must be [dev, ino, hits]", id=id, fds=fds)


def _sayable(version: Version | None) -> bool:
    """Whether a reply can say *version*: its times must fit the wire's int64
    (a file dated past 2262 has none; its fd is served without a version)."""
    return version is not None and all(MIN_INT64 <= v <= MAX_INT64 for v in version)


def _served_version(
    msg: Mapping[str, Any], id: int | None, fds: Sequence[int]
) -> tuple[Version | None, bool | None]:
    """A served reply's ``version`` and ``cached`` (version 2), or (None, None)."""
    raw = msg.get("version")
    if raw is None:
        return None, None
    if type(raw) is not list or len(raw) != 3:
        raise MalformedMessage("'version' must be [size, mtime_ns, ctime_ns]", id=id, fds=fds)
    parts = {"size": raw[0], "mtime_ns": raw[1], "ctime_ns": raw[2]}
    version = (
        _uint(parts, "size", id=id, fds=fds),
        _int64(parts, "mtime_ns", id=id, fds=fds),
        _int64(parts, "ctime_ns", id=id, fds=fds),
    )
    return version, _field(msg, "cached", bool, id=id, fds=fds)


def _key_map(key: FileKey) -> dict[str, Any]:
    return {"ino": key.ino, "size": key.size, "mtime_ns": key.mtime_ns, "ctime_ns": key.ctime_ns}


def _text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def new_packer() -> Callable[[Mapping[str, Any]], bytes]:
    """A reusable packer (cheaper than packb per message); not thread-safe."""
    return msgpack.Packer(use_bin_type=True).pack


# ---------------------------------------------------------------------------
# Encoding of events (fixed key order, so example bytes are stable)
# ---------------------------------------------------------------------------


def encode_request(
    event: Request, _pack: Callable[[Mapping[str, Any]], bytes] = _pack
) -> tuple[bytes, list[int]]:
    """Bytes and fds of a request datagram."""
    if isinstance(event, Hello):
        msg: dict[str, Any] = {"op": "hello", "id": event.id, "version": event.version}
        if event.client is not None:
            msg["client"] = event.client
        return _pack(msg), []
    if isinstance(event, Open):
        msg = {"op": "open", "id": event.id}
        if event.label is not None:
            msg["path"] = event.label
        if not event.wait:
            msg["wait"] = False
        return _pack(msg), [event.fd]
    if isinstance(event, OpenBatch):
        msg = {"op": "open_batch", "id": event.id}
        if event.labels:
            msg["paths"] = list(event.labels)
        if not event.wait:
            msg["wait"] = False
        if not event.serve:
            msg["serve"] = False
        return _pack(msg), list(event.fds)
    if isinstance(event, StatsRequest):
        return _pack({"op": "stats", "id": event.id}), []
    if isinstance(event, Lookup):
        msg = {"op": "lookup", "id": event.id, "namespace": event.namespace}
        msg["key"] = _key_map(event.key)
        return _pack(msg), []
    if isinstance(event, Publish):
        msg = {"op": "publish", "id": event.id, "namespace": event.namespace}
        msg["key"] = _key_map(event.key)
        return _pack(msg), [event.fd]
    if isinstance(event, IndexRequest):
        return _pack({"op": "index", "id": event.id}), []
    if isinstance(event, Report):
        return _pack({"op": "report", "id": event.id, "hits": [list(h) for h in event.hits]}), []
    raise TypeError(f"not a request event: {event!r}")


def encode_reply(
    event: Reply, _pack: Callable[[Mapping[str, Any]], bytes] = _pack
) -> tuple[bytes, list[int]]:
    """Bytes and fds of a reply datagram."""
    if isinstance(event, Opened):
        msg: dict[str, Any] = {"id": event.id, "ok": True, "size": event.size, "hit": event.hit}
        if _sayable(event.version):
            msg["version"] = list(event.version)  # type: ignore[arg-type]
            msg["cached"] = bool(event.cached)
        return _pack(msg), [event.fd]
    if isinstance(event, Missed):
        return _pack(
            {"id": event.id, "ok": True, "hit": False, "miss": True, "filling": event.filling}
        ), []
    if isinstance(event, ErrorReply):
        return _pack(
            {"id": event.id, "ok": False, "code": str(event.code), "message": event.message}
        ), []
    if isinstance(event, BatchOpened):
        results: list[dict[str, Any]] = []
        for item in event.results:
            if isinstance(item, OpenedItem):
                served: dict[str, Any] = {"ok": True, "size": item.size, "hit": item.hit}
                if _sayable(item.version):
                    served["version"] = list(item.version)  # type: ignore[arg-type]
                    served["cached"] = bool(item.cached)
                results.append(served)
            elif isinstance(item, MissedItem):
                results.append({"ok": True, "hit": item.hit, "miss": True, "filling": item.filling})
            else:
                results.append({"ok": False, "code": str(item.code), "message": item.message})
        return _pack({"id": event.id, "ok": True, "results": results}), list(event.fds)
    if isinstance(event, HelloReply):
        return _pack(
            {
                "id": event.id,
                "ok": True,
                "version": event.version,
                "server": event.server,
                "limits": dict(event.limits),
            }
        ), []
    if isinstance(event, StatsReply):
        return _pack({"id": event.id, "ok": True, "stats": dict(event.stats)}), []
    if isinstance(event, LookupMiss):
        return _pack({"id": event.id, "ok": True, "hit": False}), []
    if isinstance(event, IndexReply):
        return _pack({"id": event.id, "ok": True, "pid": event.pid, "slots": event.slots}), [
            event.fd
        ]
    if isinstance(event, Reported):
        return _pack({"id": event.id, "ok": True}), []
    raise TypeError(f"not a reply event: {event!r}")


# ---------------------------------------------------------------------------
# Server role
# ---------------------------------------------------------------------------


@attrs.frozen
class WireLimits:
    """Bounds on what a server accepts from one datagram."""

    max_request: int = 65536
    max_batch: int = 64

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH_LIMIT:
            raise ValueError(f"max_batch must be between 1 and {MAX_BATCH_LIMIT}")
        if self.max_request < MIN_MAX_REQUEST:
            raise ValueError(f"max_request must be at least {MIN_MAX_REQUEST} bytes")

    @property
    def max_fds(self) -> int:
        """Most fds one request may carry (a server receives up to SCM_MAX_FD and
        refuses a request with more than this)."""
        return self.max_batch


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    READY = "ready"
    CLOSED = "closed"


class ServerConnection:
    """The server's side of one connection.

    Call :meth:`receive` with each datagram; it returns a request event or
    raises :class:`ProtocolError`. Call :meth:`send` with each reply.
    """

    def __init__(self, limits: WireLimits | None = None, *, reports: bool = True) -> None:
        """*reports*: whether the peer may report index hits. When it may not, a
        report's hits are not read: the daemon refuses it whatever they say, and
        checking 4096 of them would cost its loop more than any other datagram."""
        self.limits = limits or WireLimits()
        self.reports = reports
        self.state = ConnectionState.AWAIT_HELLO
        self.version: int | None = None
        self._pack = new_packer()

    def receive(
        self,
        data: bytes | memoryview,
        fds: Sequence[int] = (),
        *,
        data_truncated: bool = False,
        fds_truncated: bool = False,
    ) -> Request:
        if (
            len(fds) == 1
            and self.state is ConnectionState.READY
            and not data_truncated
            and not fds_truncated
        ):
            fast = self._parse_open(data, fds[0])
            if fast is not None:
                return fast
        fds = tuple(fds)
        try:
            event = self._parse(data, fds, data_truncated, fds_truncated)
        except ProtocolError as exc:
            if exc.fatal:
                self.state = ConnectionState.CLOSED
            raise
        if isinstance(event, Hello):
            self.state = ConnectionState.READY
            self.version = event.version
        return event

    def _parse_open(self, data: bytes | memoryview, fd: int) -> Open | None:
        """The common case, a well-formed `open`, with the fewest steps.

        None means "not that case": the full parser then decides, so both
        paths accept and refuse exactly the same datagrams.
        """
        if len(data) > self.limits.max_request:
            return None
        try:
            # msgpack's defaults (str keys only, extension types as objects
            # that no check below accepts) make this accept exactly what the
            # full parser accepts; passing no options keeps the call cheap.
            msg = msgpack.unpackb(data)
        except Exception:
            return None
        if type(msg) is not dict or msg.get("op") != "open":
            return None
        id = msg.get("id")
        if type(id) is not int or not 0 <= id <= MAX_ID:
            return None
        label = msg.get("path")
        if label is not None and (type(label) is not str or len(label) * 4 > MAX_LABEL_BYTES):
            return None
        wait = msg.get("wait", True)
        if type(wait) is not bool:
            return None
        return Open(id=id, fd=fd, label=label, wait=wait or self.version != 2)

    def _parse(
        self,
        data: bytes | memoryview,
        fds: tuple[int, ...],
        data_truncated: bool,
        fds_truncated: bool,
    ) -> Request:
        if self.state is ConnectionState.CLOSED:
            raise MalformedMessage("connection is closed", fds=fds, fatal=True)
        if data_truncated or len(data) > self.limits.max_request:
            raise MessageTooLarge(f"request larger than {self.limits.max_request} bytes", fds=fds)
        msg = _unpack(data, fds)
        id = _read_id(msg, fds)
        op = msg.get("op")
        if not isinstance(op, str):
            raise MalformedMessage("missing field 'op'", id=id, fds=fds)
        if fds_truncated or len(fds) > self.limits.max_fds:
            raise BadFds(
                f"too many fds with one request (at most {self.limits.max_fds})", id=id, fds=fds
            )
        if self.state is ConnectionState.AWAIT_HELLO and op != "hello":
            raise HelloRequired(f"the first request must be 'hello', got {op!r}", id=id, fds=fds)
        if op == "open":
            self._expect_fds(op, fds, 1, id)
            label = _label(msg.get("path"), id=id, fds=fds)
            return Open(id=id, fd=fds[0], label=label, wait=self._wait(msg, id, fds))
        if op == "open_batch":
            return self._parse_batch(msg, fds, id)
        if op == "stats":
            self._expect_fds(op, fds, 0, id)
            return StatsRequest(id=id)
        if op == "lookup":
            self._expect_fds(op, fds, 0, id)
            return Lookup(
                id=id, namespace=_namespace(msg, id=id, fds=fds), key=_file_key(msg, id=id, fds=fds)
            )
        if op == "publish":
            self._expect_fds(op, fds, 1, id)
            return Publish(
                id=id,
                namespace=_namespace(msg, id=id, fds=fds),
                key=_file_key(msg, id=id, fds=fds),
                fd=fds[0],
            )
        if op == "index":
            self._expect_fds(op, fds, 0, id)
            return IndexRequest(id=id)
        if op == "report":
            self._expect_fds(op, fds, 0, id)
            return Report(id=id, hits=_report_hits(msg, id, fds) if self.reports else ())
        if op == "hello":
            self._expect_fds(op, fds, 0, id)
            if self.state is not ConnectionState.AWAIT_HELLO:
                raise MalformedMessage(
                    "'hello' was already sent on this connection", id=id, fds=fds
                )
            version = _field(msg, "version", int, id=id, fds=fds)
            client = _field(msg, "client", str, id=id, fds=fds, required=False)
            if version not in SUPPORTED_VERSIONS:
                raise UnsupportedVersion(
                    f"protocol version {version} is not supported; this server speaks "
                    + ", ".join(str(v) for v in SUPPORTED_VERSIONS),
                    id=id,
                )
            return Hello(
                id=id,
                version=version,
                client=None if client is None else _text(client, MAX_CLIENT_NAME),
            )
        raise UnknownOp(f"unknown op {_text(op, 64)!r}", id=id, fds=fds)

    def _expect_fds(self, op: str, fds: tuple[int, ...], want: int, id: int) -> None:
        if len(fds) != want:
            raise BadFds(
                f"{op!r} takes {want} fd{'s' if want != 1 else ''}, got {len(fds)}",
                id=id,
                fds=fds,
            )

    def _parse_batch(self, msg: Mapping[str, Any], fds: tuple[int, ...], id: int) -> OpenBatch:
        if not 1 <= len(fds) <= self.limits.max_batch:
            raise BadFds(
                f"'open_batch' takes 1 to {self.limits.max_batch} fds, got {len(fds)}",
                id=id,
                fds=fds,
            )
        raw = _field(msg, "paths", list, id=id, fds=fds, required=False)
        labels: tuple[str | None, ...] = ()
        if raw is not None:
            if len(raw) != len(fds):
                raise MalformedMessage(
                    f"'paths' has {len(raw)} entries for {len(fds)} fds", id=id, fds=fds
                )
            labels = tuple(_label(v, id=id, fds=fds) for v in raw)
        serve = _field(msg, "serve", bool, id=id, fds=fds, required=False)
        serve = serve is not False or self.version != 2  # version 1 ignores the key
        wait = self._wait(msg, id, fds) and serve
        return OpenBatch(id=id, fds=fds, labels=labels, wait=wait, serve=serve)

    def _wait(self, msg: Mapping[str, Any], id: int, fds: tuple[int, ...]) -> bool:
        """A request's ``wait`` (version 2; version 1 ignores the key, as any unknown one)."""
        wait = _field(msg, "wait", bool, id=id, fds=fds, required=False)
        return wait is not False or self.version != 2

    def send(self, event: Reply) -> tuple[bytes, list[int]]:
        """Bytes and fds for a reply; the caller still owns the fds."""
        return encode_reply(event, self._pack)

    def send_opened(
        self,
        id: int,
        size: int,
        hit: bool,
        version: Version | None = None,
        cached: bool = True,
    ) -> bytes:
        """The bytes of ``send(Opened(id, fd, size, hit, version, cached))`` (the fd
        goes alongside); *version* and *cached* only on a version 2 connection.

        The hit path's shortcut: no event object, the same bytes.
        """
        if self.version != 2 or not _sayable(version):
            return self._pack({"id": id, "ok": True, "size": size, "hit": hit})
        return self._pack(
            {
                "id": id,
                "ok": True,
                "size": size,
                "hit": hit,
                "version": list(version),  # type: ignore[arg-type]
                "cached": cached,
            }
        )

    def error_for(self, exc: ProtocolError) -> ErrorReply:
        """The reply that answers a protocol error."""
        return ErrorReply(id=exc.id, code=exc.code, message=exc.message)


# ---------------------------------------------------------------------------
# Client role
# ---------------------------------------------------------------------------

_REQUEST_KINDS: dict[type, str] = {
    Hello: "hello",
    Open: "open",
    OpenBatch: "open_batch",
    StatsRequest: "stats",
    Lookup: "lookup",
    Publish: "publish",
    IndexRequest: "index",
    Report: "report",
}


def sendable_label(label: str) -> bool:
    """Whether the daemon takes *label* as a path label: at most MAX_LABEL_BYTES of UTF-8.

    A path of bytes that are not UTF-8, decoded with ``surrogateescape``, is
    no UTF-8 at all; one decoded with ``replace`` takes 3 bytes per bad byte.
    """
    if label.isascii():
        return len(label) <= MAX_LABEL_BYTES
    try:
        return len(label.encode("utf-8")) <= MAX_LABEL_BYTES
    except UnicodeEncodeError:
        return False


class ClientConnection:
    """The client's side of one connection: numbers requests, checks replies."""

    def __init__(self) -> None:
        self._next_id = 0
        self._pending: dict[int, str] = {}
        self.server_version: int | None = None
        self.server_limits: Mapping[str, int] = {}
        self._pack = new_packer()

    def next_id(self) -> int:
        id = self._next_id
        self._next_id = (self._next_id + 1) % (MAX_ID + 1)
        return id

    @property
    def pending(self) -> int:
        return len(self._pending)

    def send(self, event: Request) -> tuple[bytes, list[int]]:
        """Bytes and fds of a request; the reply is then expected.

        Path labels the daemon would refuse (not UTF-8, longer than
        ``MAX_LABEL_BYTES``) or that would take the request past its
        ``max_request`` are left out: they only name files in its stats.
        """
        if event.id in self._pending:
            raise ValueError(f"request id {event.id} is already in flight")
        if isinstance(event, Open) and event.label is not None and not sendable_label(event.label):
            event = attrs.evolve(event, label=None)
        elif isinstance(event, OpenBatch) and not all(
            label is None or sendable_label(label) for label in event.labels
        ):
            labels = tuple(x if x is None or sendable_label(x) else None for x in event.labels)
            event = attrs.evolve(event, labels=labels)
        data, fds = encode_request(event, self._pack)
        if len(data) > self._max_request:
            if isinstance(event, Open) and event.label is not None:
                data, fds = encode_request(attrs.evolve(event, label=None), self._pack)
            elif isinstance(event, OpenBatch) and event.labels:
                data, fds = encode_request(attrs.evolve(event, labels=()), self._pack)
        self._pending[event.id] = _REQUEST_KINDS[type(event)]
        return data, fds

    @property
    def _max_request(self) -> int:
        # Until the hello reply says, the least any daemon accepts.
        return self.server_limits.get("max_request", MIN_MAX_REQUEST)

    def send_open(
        self, fd: int, label: str | None = None, *, wait: bool = True
    ) -> tuple[int, bytes, list[int]]:
        """Number and encode an `open` request: the bytes of ``send(Open(...))``.

        The client's hot path, without an event object. Returns the id, the
        bytes and the fds to attach.
        """
        id = self.next_id()
        msg: dict[str, Any] = {"op": "open", "id": id}
        if label is not None and sendable_label(label):
            msg["path"] = label
        if not wait:
            msg["wait"] = False
        data = self._pack(msg)
        if len(data) > self._max_request:  # as send() does
            msg.pop("path", None)
            data = self._pack(msg)
        self._pending[id] = "open"
        return id, data, [fd]

    def forget(self, id: int) -> None:
        """Stop expecting a reply (its request was abandoned)."""
        self._pending.pop(id, None)

    def receive(
        self,
        data: bytes | memoryview,
        fds: Sequence[int] = (),
        *,
        data_truncated: bool = False,
        fds_truncated: bool = False,
    ) -> Reply:
        if len(fds) == 1 and not data_truncated and not fds_truncated:
            fast = self._parse_opened(data, fds[0])
            if fast is not None:
                return fast
        fds = tuple(fds)
        if data_truncated:
            raise MessageTooLarge("reply was truncated", fds=fds)
        msg = _unpack(data, fds)
        id = None if msg.get("id") is None else _read_id(msg, fds)
        kind = None if id is None else self._pending.get(id)
        if id is not None and kind is None:
            raise MalformedMessage(f"reply to unknown request id {id}", fds=fds)
        ok = msg.get("ok")
        if type(ok) is not bool:
            raise MalformedMessage("reply field 'ok' must be a boolean", id=id, fds=fds)
        if id is not None:
            del self._pending[id]
        if fds_truncated:
            raise BadFds("reply fds were truncated", id=id, fds=fds)
        if not ok or id is None:
            if fds:
                raise BadFds("an error reply carried fds", id=id, fds=fds)
            code = _field(msg, "code", str, id=id, fds=fds)
            message = _field(msg, "message", str, id=id, fds=fds)
            return ErrorReply(id=id, code=code, message=message)
        if kind == "lookup" and msg.get("hit") is False:
            if fds:
                raise BadFds("a lookup miss carried fds", id=id, fds=fds)
            return LookupMiss(id=id)
        if kind == "open" and msg.get("miss") is True:
            if fds:
                raise BadFds("a miss carried fds", id=id, fds=fds)
            return Missed(id=id, filling=_field(msg, "filling", bool, id=id, fds=fds))
        if kind in ("open", "lookup", "publish"):
            if len(fds) != 1:
                raise BadFds(f"{kind!r} reply carried {len(fds)} fds", id=id, fds=fds)
            size = _uint(msg, "size", id=id, fds=fds)
            hit = _field(msg, "hit", bool, id=id, fds=fds)
            version, cached = _served_version(msg, id, fds)
            return Opened(id=id, fd=fds[0], size=size, hit=hit, version=version, cached=cached)
        if kind == "open_batch":
            return self._parse_batch(msg, fds, id)
        if kind == "stats":
            if fds:
                raise BadFds("'stats' reply carried fds", id=id, fds=fds)
            stats = _field(msg, "stats", dict, id=id, fds=fds)
            return StatsReply(id=id, stats=stats)
        if kind == "index":
            if len(fds) != 1:
                raise BadFds(f"'index' reply carried {len(fds)} fds", id=id, fds=fds)
            return IndexReply(
                id=id,
                fd=fds[0],
                pid=_uint(msg, "pid", id=id, fds=fds),
                slots=_uint(msg, "slots", id=id, fds=fds),
            )
        if kind == "report":
            if fds:
                raise BadFds("'report' reply carried fds", id=id, fds=fds)
            return Reported(id=id)
        # kind == "hello"
        if fds:
            raise BadFds("'hello' reply carried fds", id=id, fds=fds)
        version = _field(msg, "version", int, id=id, fds=fds)
        server = _field(msg, "server", str, id=id, fds=fds)
        limits = _field(msg, "limits", dict, id=id, fds=fds, required=False) or {}
        clean = {k: v for k, v in limits.items() if type(v) is int}
        self.server_version = version
        self.server_limits = clean
        return HelloReply(id=id, version=version, server=server, limits=clean)

    def _parse_opened(self, data: bytes | memoryview, fd: int) -> Opened | None:
        """The common reply, a served fd for an `open`, with the fewest steps.

        None means "not that case": the full parser then decides.
        """
        try:
            msg = msgpack.unpackb(data)
        except Exception:
            return None
        if type(msg) is not dict or msg.get("ok") is not True:
            return None
        id = msg.get("id")
        if type(id) is not int or self._pending.get(id) != "open":
            return None
        size = msg.get("size")
        hit = msg.get("hit")
        if type(size) is not int or not 0 <= size <= MAX_ID or type(hit) is not bool:
            return None
        version = msg.get("version")
        cached = msg.get("cached")
        if version is not None:
            if (
                type(version) is not list
                or len(version) != 3
                or not all(type(v) is int and MIN_INT64 <= v <= MAX_INT64 for v in version)
                or version[0] < 0
                or type(cached) is not bool
            ):
                return None  # the full parser says what is wrong
            version = (version[0], version[1], version[2])
        del self._pending[id]
        return Opened(id=id, fd=fd, size=size, hit=hit, version=version, cached=cached)

    def _parse_batch(self, msg: Mapping[str, Any], fds: tuple[int, ...], id: int) -> BatchOpened:
        raw = _field(msg, "results", list, id=id, fds=fds)
        results: list[OpenedItem | MissedItem | Refusal] = []
        next_fd = 0
        for item in raw:
            if not isinstance(item, dict) or type(item.get("ok")) is not bool:
                raise MalformedMessage("malformed batch result", id=id, fds=fds)
            if item["ok"] and item.get("miss") is True:
                filling = _field(item, "filling", bool, id=id, fds=fds)
                results.append(MissedItem(filling=filling, hit=item.get("hit") is True))
            elif item["ok"]:
                if next_fd >= len(fds):
                    raise BadFds("batch reply carried too few fds", id=id, fds=fds)
                size = _uint(item, "size", id=id, fds=fds)
                hit = _field(item, "hit", bool, id=id, fds=fds)
                version, cached = _served_version(item, id, fds)
                results.append(
                    OpenedItem(fd=fds[next_fd], size=size, hit=hit, version=version, cached=cached)
                )
                next_fd += 1
            else:
                code = _field(item, "code", str, id=id, fds=fds)
                message = _field(item, "message", str, id=id, fds=fds)
                results.append(Refusal(code=code, message=message))
        if next_fd != len(fds):
            raise BadFds("batch reply carried too many fds", id=id, fds=fds)
        return BatchOpened(id=id, results=tuple(results))
