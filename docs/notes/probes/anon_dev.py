# Anonymous device numbers (0:N, of tmpfs, FUSE, overlayfs, ...): is a freed
# number given to the next mount, lowest first, whatever its type?
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _fs import fuse, kernel, show

from tests.mounts import mount_tmpfs, umount


def dev(path: Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def main() -> None:
    show("kernel", kernel())
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        base = Path(tmp)
        a, b, c = base / "a", base / "b", base / "c"
        mount_tmpfs(a)
        mount_tmpfs(b)
        show("tmpfs a, then tmpfs b", (dev(a), dev(b)))
        first = dev(a)
        umount(a)
        mount_tmpfs(c)
        show("after umount a, a new tmpfs c gets", f"{dev(c)} (a had {first}, b has {dev(b)})")
        umount(c)
        with fuse(base) as (mnt, _fs):
            show("after umount c, a FUSE mount gets", f"{dev(mnt)} (c had {first})")
        umount(b)
        for i in range(5):
            d = base / f"loop{i}"
            mount_tmpfs(d)
            n = dev(d)
            umount(d)
            show(f"mount/umount cycle {i}: tmpfs got", n)


if __name__ == "__main__":
    main()
