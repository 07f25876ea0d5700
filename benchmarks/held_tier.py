"""The process-local tier's hit, as of a git revision and as in this tree, side by side.

The held hit is the cheapest tier (a reopen of a memfd this process holds);
since the tier checks that the daemon still serves what it holds, a hit
also reads the file's slot in the daemon's index (a peer of the daemon's
uid, or root) or the clock (any other peer). This measures what that costs:
one private daemon, one 4 KiB file, and for each client (the Python
`Opener`, the C client's routed open) and each kind of peer (with the
index; without it, as a peer of another uid is), a process that holds the
file and times N opens of it one by one, each as a supervisor makes it (its
own open of the source, the client's call, both closes). The client code of
the revision ("before": `git archive` of its client/ into a temporary
directory) and of this tree ("after") take turns, in a new random order each
round, so that load on the machine falls on both.

With "after" it also times opens with the tier's bound at 0 (every open asks
the daemon again): the cost of one re-check, which a held file pays once per
bound (1 s by default) in a peer without the index.

Prints, per series, the median over the rounds of each round's p50 and mean
per open, in microseconds (the mean includes the occasional re-check).
A plain timing benchmark (not a test):
`.venv/bin/python benchmarks/held_tier.py [--before REV] [--rounds R] [--opens N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from shadowd.bench import c_compiler, daemon_command, wait_for_socket

REPO = Path(__file__).resolve().parent.parent

PY_CHILD = r"""
import json, os, sys, time
from shadowd_client import Opener
sock, path, use_index = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
n, recheck = int(sys.argv[4]), sys.argv[5]
opener = Opener(sock, local_below=0, use_index=use_index)
if recheck != "-":
    opener.held_recheck = float(recheck)
deadline = time.monotonic() + 10
while opener.preload([path]) < 1:
    if time.monotonic() > deadline:
        sys.exit("never held")
    time.sleep(0.01)
for _ in range(200):  # warm
    os.close(opener.open(path))
held = opener.held_opens
clock = time.perf_counter_ns
times = []
for _ in range(n):
    t0 = clock()
    os.close(opener.open(path))
    times.append(clock() - t0)
times.sort()
print(json.dumps({"p50": times[n // 2] / 1e3, "mean": sum(times) / n / 1e3,
                  "held": opener.held_opens - held}))
opener.close()
"""

C_CHILD = r"""
#define _GNU_SOURCE
#include "shadowd.h"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    static struct shadowd c;
    const char *path = argv[2];
    int use_index = atoi(argv[3]), n = atoi(argv[4]);
    shadowd_set_socket(&c, argv[1]);
    shadowd_set_routing(&c, 0, -1);
    shadowd_set_index(&c, use_index, 0);
#ifdef RECHECK
    if (argv[5][0] != '-')
        shadowd_set_held_recheck(&c, atoi(argv[5]));
#endif
    if (use_index && !shadowd_index_ready(&c))
        return 2;
    long long deadline = ns() + 10000000000LL;
    while (shadowd_preload(&c, &path, 1) < 1) {
        if (ns() > deadline)
            return 3;
        usleep(10000);
    }
    long long *t = malloc(sizeof *t * (size_t)n), sum = 0;
    unsigned long long held = 0;
    for (int i = 0; i < n + 200; i++) {
        long long t0 = ns();
        int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        int fd = shadowd_open_routed_fd(&c, src, NULL);
        close(src);
        close(fd);
        if (i >= 200) {
            t[i - 200] = ns() - t0;
            sum += t[i - 200];
            held += c.route == SHADOWD_ROUTE_HELD;
        }
    }
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("{\"p50\": %.3f, \"mean\": %.3f, \"held\": %llu}\n", t[n / 2] / 1e3,
           (double)sum / n / 1e3, held);
    shadowd_close(&c);
    return 0;
}
"""


def extract(rev: str, into: Path) -> Path:
    """client/ of *rev* under *into* (git archive); the directory holding it."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "client.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "client"], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def build_c(side: Path, out: Path, recheck: bool) -> Path:
    cc = c_compiler()
    if cc is None:
        raise SystemExit("no C compiler")
    src = out.with_suffix(".c")
    src.write_text(C_CHILD)
    flags = ["-DRECHECK"] if recheck else []
    subprocess.run(
        [cc, "-O2", *flags, "-I", str(side / "client" / "c"), "-o", str(out), str(src),
         str(side / "client" / "c" / "shadowd.c")],
        check=True,
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="HEAD", help="git revision of the client before")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--opens", type=int, default=20000, help="timed opens per process")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shadowd-held-") as tmp:
        work = Path(tmp)
        before = extract(args.before, work / "before")
        after = REPO
        sock = str(work / "d.sock")
        f = work / "lib.so"
        f.write_bytes(os.urandom(4096))
        binaries = {
            "before": build_c(before, work / "c-before", recheck=False),
            "after": build_c(after, work / "c-after", recheck=True),
        }
        env = dict(os.environ)
        daemon = subprocess.Popen(daemon_command(sock), env=env)
        try:
            wait_for_socket(sock, daemon, "the daemon")
            time.sleep(0.05)
            series = [
                (lang, peer, side, recheck)
                for lang in ("python", "c")
                for peer in ("index", "no-index")
                for side, recheck in (("before", "-"), ("after", "-"), ("after", "0"))
                if not (recheck == "0" and peer == "index")
            ]
            got: dict[tuple[str, str, str, str], list[dict[str, float]]] = {s: [] for s in series}
            rng = random.Random(1)
            for r in range(args.rounds):
                rng.shuffle(series)
                for lang, peer, side, recheck in series:
                    use = "1" if peer == "index" else "0"
                    opens = str(args.opens if recheck == "-" else max(args.opens // 10, 500))
                    if lang == "python":
                        top = before if side == "before" else after
                        path = os.pathsep.join([str(top / "client"), str(REPO)])
                        cmd = [sys.executable, "-c", PY_CHILD, sock, str(f), use, opens, recheck]
                        child_env = dict(env, PYTHONPATH=path)
                    else:
                        ms = "0" if recheck == "0" else "-"
                        cmd = [str(binaries[side]), sock, str(f), use, opens, ms]
                        child_env = env
                    done = subprocess.run(
                        cmd, env=child_env, capture_output=True, text=True, check=False
                    )
                    if done.returncode != 0:
                        raise SystemExit(f"{lang} {peer} {side}: {done.returncode} {done.stderr}")
                    got[(lang, peer, side, recheck)].append(json.loads(done.stdout))
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        finally:
            daemon.terminate()
            daemon.wait(15)
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.before],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        print(f"held hit per open, us (median of {args.rounds} rounds of {args.opens} opens; "
              f"before: {rev}, after: this tree)")  # fmt: skip
        print(f"{'client':8} {'peer':9} {'side':7} {'bound':6} {'p50':>8} {'mean':>8} {'held':>7}")
        for key in sorted(got):
            lang, peer, side, recheck = key
            runs = got[key]
            p50 = statistics.median(x["p50"] for x in runs)
            mean = statistics.median(x["mean"] for x in runs)
            held = statistics.median(x["held"] for x in runs)
            bound = "0" if recheck == "0" else "dflt"
            print(f"{lang:8} {peer:9} {side:7} {bound:6} {p50:8.2f} {mean:8.2f} {held:7.0f}")
        shutil.rmtree(work / "before", ignore_errors=True)


if __name__ == "__main__":
    main()
