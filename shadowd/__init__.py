"""shadowd: a per-host cache of sealed memfds for sandbox supervisors.

The daemon keeps one sealed memfd per file version and hands each caller its
own read-only descriptor of it over a Unix socket. The client library is the
separate import package ``shadowd_client``.
"""

__version__ = "0.1.0"
