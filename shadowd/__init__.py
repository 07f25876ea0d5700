"""shadowd: a per-host cache of sealed memfds for sandbox supervisors.

The daemon keeps one sealed memfd per file version and hands each caller its
own read-only descriptor of it over a Unix socket. The client library is the
separate import package ``shadowd_client``.

Must never import anything: every ``import shadowd.x`` (the client's of
``shadowd.paths`` and ``shadowd.protocol`` among them) runs this first.
"""

__version__ = "0.1.0"
