# The C client (client/c) as a benchmark and test instrument: finding a
# compiler, building `shadowd-open`, and running many of them at once.
#
# Must never: leave a C client process running, or report a count it did
# not read from every process.
from __future__ import annotations

import os
import shutil
import subprocess

#: The C client's sources, next to the Python client's in the source tree.
C_CLIENT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "client", "c"
)


def c_compiler() -> str | None:
    """$CC, else cc or gcc from $PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_c_client(workdir: str, *flags: str) -> tuple[str | None, str]:
    """Compile client/c's shadowd-open into *workdir*: (its path, "") or (None, why not).

    *flags* go to the compiler (the tests shorten the client's timeout).
    """
    sources = [os.path.join(C_CLIENT_DIR, name) for name in ("shadowd-open.c", "shadowd.c")]
    if not all(os.path.exists(src) for src in sources):
        return None, f"no C client sources at {C_CLIENT_DIR} (not a source checkout)"
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or $CC)"
    binary = os.path.join(workdir, "shadowd-open")
    done = subprocess.run(
        [cc, "-O2", *flags, "-o", binary, *sources], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return None, f"the C client did not compile: {done.stderr.strip()[:200]}"
    return binary, ""


def run_c_clients(binary: str, n: int, args: list[str], seconds: float) -> int:
    """*n* shadowd-open processes looping for *seconds*, started together; total opens."""
    command = [binary, "-g", "-l", str(seconds), *args]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a C client process did not start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        total = 0
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"a C client process failed (status {proc.returncode})")
            total += int(out)
        return total
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
