/*
 * shadowd-supervise: a small seccomp user-notification supervisor that runs
 * a program with its read-only opens of regular files shadowed: it traps
 * open, openat and openat2, opens the file itself, and injects a sealed,
 * read-only memfd in place of the host file (SECCOMP_IOCTL_NOTIF_ADDFD).
 * Three ways to make that fd: "copy" (a fresh sealed memfd per open, the
 * status quo of sandbox supervisors), "shadowd" (client/c's routed open:
 * the process-local tier, the daemon's index (no round trip; fetched while
 * the program execs, before its first open), local copies of small and
 * young files, the daemon without waiting for its copy, a local copy
 * whenever it cannot serve; or,
 * with --open-fd, shadowd_open_fd for every file as before: an index hit
 * where the index has the file, else a request) and
 * "passthrough" (trap, then let every open go on: the cost of the trap
 * alone). --preload FILE fills the tier in one batch before the program
 * starts. It counts what it did and writes one JSON object to --stats at
 * the end.
 *
 * A demonstration and a measuring instrument, NOT a sandbox: continuing a
 * syscall is racy (the tracee may change the path after we read it), and
 * files are opened with the supervisor's rights (in the routed open, a file
 * a tier serves is not opened at all: client/c proves the supervisor may
 * read it with faccessat2, which is not all of open). See README.md.
 *
 * Must never: hand the tracee a shadow for anything but a read-only open of
 * a regular file on a real file system; open a path through a /proc magic
 * link (it would name the supervisor's fds, not the tracee's); open a
 * FIFO, device or pseudo file system's file for reading; hold an fd on the
 * tracee's file systems once the tracee has its answer (it may unmount one
 * at once), or keep one it made after the notification it was made for is
 * answered; write anything to stdout; leave the tracee without an answer
 * (every notification is answered, or was withdrawn by the kernel).
 *
 * Build: cc -O2 -Iclient/c -o shadowd-supervise \
 *            contrib/supervisor/shadowd-supervise.c client/c/shadowd.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shadowd.h"

/* -- the architecture ------------------------------------------------------ */

/* The filter traps only this architecture's native calls: a tracee's calls
 * under another ABI (i386 int 0x80, x32) are not trapped and open host
 * files. */
#if defined(__x86_64__)
#define NATIVE_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NATIVE_ARCH AUDIT_ARCH_AARCH64
#elif defined(__riscv) && __riscv_xlen == 64
#define NATIVE_ARCH AUDIT_ARCH_RISCV64
#else
#error "shadowd-supervise: add this architecture's AUDIT_ARCH_ constant"
#endif

#ifndef __NR_openat2
#define __NR_openat2 437 /* the same on every architecture */
#endif
#ifndef __NR_close_range
#define __NR_close_range 436 /* Linux 5.9; called directly: glibc has it from 2.34 */
#endif
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif
#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif
#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif
#ifndef SECCOMP_ADDFD_FLAG_SEND
#error "shadowd-supervise needs the headers of Linux 5.14 or later (SECCOMP_ADDFD_FLAG_SEND)"
#endif
/* Linux 6.6: the listener wakes the supervisor on the trapping task's CPU,
 * and the answer wakes the task on the supervisor's (an older kernel says
 * EINVAL and wakes them as before). */
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1UL
#endif
/* Linux 6.8: a mount's 64-bit id, never used again while the system runs
 * (an older kernel leaves it out of stx_mask). */
#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE 0x00004000U
#endif

#define REQUIRED_SEALS (F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)
/* Files above this are not shadowed in any mode (a copy would pin that
 * much memory per open); the tracee opens them itself. */
#define SHADOW_MAX ((off_t)256 << 20)
/* Mounts whose pseudo-or-not judgement is kept (a program's files are on a
 * handful); past that, the oldest judgement is made again when needed. */
#define MOUNTS_KEPT 64
/* Per-file records kept for --stats; the rest are only counted. */
#define MAX_RECORDS 200000
/* The open flags the kernel knows; openat2 refuses others, so a request
 * with others is left to the kernel to refuse. */
#define KNOWN_OPEN_FLAGS                                                                   \
    (O_ACCMODE | O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_APPEND | O_NONBLOCK | O_DSYNC | \
     FASYNC | O_DIRECT | O_LARGEFILE | O_DIRECTORY | O_NOFOLLOW | O_NOATIME | O_CLOEXEC |  \
     O_SYNC | O_PATH | O_TMPFILE)

/* -- state --------------------------------------------------------------- */

enum mode { PASSTHROUGH, COPY, SHADOWD };
static const char *const mode_names[] = {"passthrough", "copy", "shadowd"};

/* Why a notification was continued (the tracee made the call itself). */
enum reason {
    R_PASSTHROUGH,  /* passthrough mode */
    R_FLAGS,        /* not a plain read-only open */
    R_PATH,         /* the path could not be read from the tracee */
    R_ROOT,         /* a relative path with "..", and the tracee has another root */
    R_OPEN,         /* the supervisor's own open failed: the tracee gets its errno */
    R_NOT_REGULAR,  /* a directory, FIFO, socket or device */
    R_PSEUDO_FS,    /* procfs, sysfs and the like: contents depend on the reader */
    R_TOO_LARGE,    /* above SHADOW_MAX */
    R_SHADOW,       /* making the shadow fd failed */
    R_INJECT,       /* ADDFD failed (say EMFILE in the tracee) */
    N_REASONS
};
static const char *const reason_names[] = {
    "passthrough", "flags", "path", "root", "open", "not_regular",
    "pseudo_fs", "too_large", "shadow", "inject",
};

/* How a shadow was made: copy mode's copy; in shadowd mode the daemon's hit
 * or miss (a miss it served after its copy, with --open-fd; one it answered
 * without an fd while we copied, routed), the tier, a local copy by the
 * routing rules (small, young), a local copy done before the daemon's
 * answer came (routed, --race), a local copy without asking while the
 * daemon was cold (it missed several times in a row; routed), a local copy
 * because the daemon failed. */
enum how { H_COPY, H_HIT, H_MISS, H_FALLBACK, H_HELD, H_LOCAL, H_RACED, H_COLD, H_INDEX, N_HOWS };
static const char *const how_names[] = {"copy", "hit", "miss", "fallback", "held", "local",
                                        "raced", "cold", "index"};

struct record {
    char *path;
    uint64_t ns, wall_ns, size;
    enum how how;
};

static struct {
    enum mode mode;
    int listener;
    int verbose;
    int open_fd;         /* shadowd mode: shadowd_open_fd instead of the routed open */
    int race;            /* routed: copy while waiting for the daemon's answer */
    int read_open;       /* routed: open every source for reading first (--read-open) */
    struct shadowd client;
    int connected;       /* the first connect to the daemon worked */
    char last_error[256];
    struct stat root;    /* ours, to compare a tracee's with */
    uint64_t notifications, shadowed, continued, gone, hits, misses, fallbacks, held, local, raced;
    uint64_t cold, indexed;
    int sync_wakeup;     /* ask for synchronous wake-ups (--no-sync-wakeup: not) */
    int synced;          /* the kernel took that */
    uint64_t statfs_calls; /* fstatfs made to judge a file system */
    uint64_t task_dirs_opened; /* /proc/TID directories opened (and kept) */
    int index;           /* the routed open uses the daemon's index (--no-index: not) */
    int index_keep;      /* index hits also go into the tier (--keep-index-hits) */
    int index_ready;     /* it held one before the program started */
    uint64_t preload_files, preload_held, preload_ns;
    uint64_t reasons[N_REASONS];
    uint64_t shadow_ns, shadow_wall_ns, shadow_bytes;
    /* Where shadow_ns goes: the source opened and checked; the fd made by
     * the mode's means; the injection (its CPU time). */
    uint64_t source_ns, make_ns, inject_ns;
    struct record *records;
    size_t nrecords, cap_records;
    uint64_t records_dropped;
    int memfd_exec_flags; /* -1 unknown, 0 the kernel has no MFD_EXEC, 1 it has */
} S = {.listener = -1, .memfd_exec_flags = -1, .index = 1, .sync_wakeup = 1};

/* The pseudo-or-not judgement of the mounts seen, by unique mount id. */
static struct {
    uint64_t id;
    int pseudo;
} mounts[MOUNTS_KEPT];
static unsigned mounts_used, mounts_next;

static pid_t child_pid = -1;

static void
say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
say(const char *fmt, ...)
{
    va_list ap;
    char line[512];
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "shadowd-supervise: %s\n", line);
}

static uint64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static uint64_t
thread_cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static int
count_open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    if (d == NULL)
        return -1;
    while (readdir(d) != NULL)
        n++;
    closedir(d);
    return n - 3; /* ".", ".." and the directory's own fd */
}

/* -- the child: filter, listener, exec ----------------------------------- */

static int
install_filter(void)
{
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NATIVE_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
#ifdef __NR_open
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_open, 3, 0),
#else
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat, 3, 0), /* keeps the offsets */
#endif
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_openat2, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -1;
    return (int)syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                        &prog);
}

static int
send_fd(int sock, int fd)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int))];
    } control;
    char byte = 'L';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.bytes, .msg_controllen = sizeof control.bytes,
    };
    memset(control.bytes, 0, sizeof control.bytes);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == 1 ? 0 : -1;
}

/* -1, or the fd that came with one byte on *sock* (EOF: the child failed). */
static int
recv_fd(int sock)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * 4)];
    } control;
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.bytes, .msg_controllen = sizeof control.bytes,
    };
    ssize_t n;
    int fd = -1;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0)
        return -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(cm) + i * sizeof(int), sizeof got);
            if (fd < 0)
                fd = got;
            else
                close(got);
        }
    }
    return fd;
}

/* -- reading the tracee --------------------------------------------------- */

/* The NUL-terminated string at *addr* in *pid*, read a page at a time (a
 * read across into an unmapped page would fail as a whole). 0 or -1. */
static int
read_string(pid_t pid, uint64_t addr, char *buf, size_t len)
{
    size_t got = 0;
    long page = sysconf(_SC_PAGESIZE);
    while (got < len) {
        uint64_t at = addr + got;
        size_t chunk = (size_t)page - (size_t)(at % (uint64_t)page);
        if (chunk > len - got)
            chunk = len - got;
        struct iovec local = {.iov_base = buf + got, .iov_len = chunk};
        struct iovec remote = {.iov_base = (void *)(uintptr_t)at, .iov_len = chunk};
        ssize_t n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (n <= 0)
            return -1;
        if (memchr(buf + got, '\0', (size_t)n) != NULL)
            return 0;
        got += (size_t)n;
    }
    return -1; /* longer than PATH_MAX: the kernel says ENAMETOOLONG */
}

static int
read_bytes(pid_t pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec local = {.iov_base = buf, .iov_len = len};
    struct iovec remote = {.iov_base = (void *)(uintptr_t)addr, .iov_len = len};
    return process_vm_readv(pid, &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

/* The /proc/TID directories of the threads that trapped last, O_PATH, kept
 * open: a thread's root, cwd and fds are then looked up in its directory
 * (one name) instead of through /proc and TID for every open (0.1-0.3 us of
 * 0.9-2.7 in benchmarks/source_step.c's loop, 1.0 us of 4.8 under pip:
 * docs/performance.md, "The source step").
 * Such a directory stands for the thread itself (its struct pid), not for a
 * number: once the thread has ended, every lookup in it fails, even when
 * its number has been given to a new thread, and the entry is then made
 * again. Nothing read through it is kept: the root, cwd or fd is looked up
 * afresh for every open, so a chroot, setns, unshare or pivot_root is
 * followed at once, and no thread is ever given another's. */
#define TASK_DIRS 16
static struct {
    pid_t tid;
    int fd;
} task_dirs[TASK_DIRS];
static unsigned task_dirs_used, task_dirs_next;

/* The kept directory of *tid* (opened and kept when there is none, or when
 * *fresh*: the kept one may be that of an ended thread of that number), or
 * -1; *kept*: whether it was there already. */
static int
task_dir(pid_t tid, int fresh, int *kept)
{
    char path[32];
    unsigned i;
    for (i = 0; i < task_dirs_used && task_dirs[i].tid != tid; i++) {
    }
    *kept = i < task_dirs_used && !fresh;
    if (*kept)
        return task_dirs[i].fd;
    snprintf(path, sizeof path, "/proc/%d", tid);
    int fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    S.task_dirs_opened++;
    if (i < task_dirs_used) {               /* its entry, made again */
        close(task_dirs[i].fd);
    } else if (task_dirs_used < TASK_DIRS) { /* a free slot */
        i = task_dirs_used++;
    } else {                                 /* the slots in turn */
        i = task_dirs_next++ % TASK_DIRS;
        close(task_dirs[i].fd);
    }
    task_dirs[i].tid = tid;
    task_dirs[i].fd = fd;
    return fd;
}

static void
close_task_dirs(void)
{
    for (unsigned i = 0; i < task_dirs_used; i++)
        close(task_dirs[i].fd);
    task_dirs_used = task_dirs_next = 0;
}

/* openat or fstatat (*st* not NULL) of *name* in *tid*'s /proc directory:
 * an O_PATH fd, 0, or -1 with errno. A failure in a kept directory is tried
 * again in a fresh one (the kept one may be an ended thread's). */
static int
in_task_dir(pid_t tid, const char *name, struct stat *st)
{
    for (int fresh = 0;; fresh = 1) {
        int kept;
        int dir = task_dir(tid, fresh, &kept);
        if (dir < 0)
            return -1;
        int r = st ? fstatat(dir, name, st, 0) : openat(dir, name, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (r >= 0 || !kept)
            return r;
    }
}

/* Whether the thread's root is the same object as ours. */
static int
same_root_as_ours(pid_t tid, const struct stat *ours)
{
    struct stat st;
    return in_task_dir(tid, "root", &st) == 0 && st.st_dev == ours->st_dev &&
           st.st_ino == ours->st_ino;
}

/* An O_PATH fd of the thread's directory *dirfd* (AT_FDCWD: its cwd), -1. */
static int
open_tracee_dir(pid_t tid, int dirfd)
{
    char name[32];
    if (dirfd == AT_FDCWD)
        return in_task_dir(tid, "cwd", NULL);
    snprintf(name, sizeof name, "fd/%d", dirfd);
    return in_task_dir(tid, name, NULL);
}

/* openat2: there on every kernel with SECCOMP_ADDFD_FLAG_SEND (5.14). */
static int
open_source(int dirfd, const char *path, int flags, uint64_t resolve)
{
    struct open_how how = {.flags = (uint64_t)flags, .resolve = resolve};
    return (int)syscall(__NR_openat2, dirfd, path, &how, sizeof how);
}

/* File systems whose files are made up per reader or per read: never
 * shadowed (and /proc/self would name the supervisor, not the tracee). */
static int
pseudo_fs(long type)
{
    switch ((unsigned long)type) {
    case 0x9fa0:     /* proc */
    case 0x62656572: /* sysfs */
    case 0x64626720: /* debugfs */
    case 0x74726163: /* tracefs */
    case 0x27e0eb:   /* cgroup */
    case 0x63677270: /* cgroup2 */
    case 0x73636673: /* securityfs */
    case 0xcafe4a11: /* bpf */
    case 0x6165676c: /* pstore */
    case 0xde5e81e4: /* efivarfs */
    case 0x62656570: /* configfs */
    case 0xf97cff8c: /* selinuxfs */
    case 0x43415d53: /* smackfs */
    case 0x1cd1:     /* devpts */
    case 0x65735543: /* fusectl */
    case 0x6e736673: /* nsfs */
    case 0x42494e4d: /* binfmt_misc */
    case 0x7655821:  /* resctrl */
        return 1;
    }
    return 0;
}

/* Whether the file system of the file the O_PATH fd *at* names (statx'd
 * into *sx*) is a pseudo one: 1, 0, or -1 when fstatfs fails. A mount's file
 * system never changes, so the judgement is kept by the mount's unique id
 * (never reused); without one (before Linux 6.8) it is made for every file.
 * Never kept by st_dev or a plain mount id: both are used again after an
 * unmount, say by a procfs mounted where a tmpfs was. */
static int
pseudo_mount(int at, const struct statx *sx)
{
    const int keep = (sx->stx_mask & STATX_MNT_ID_UNIQUE) != 0;
    struct statfs sfs;
    if (keep) {
        for (unsigned i = 0; i < mounts_used; i++) {
            if (mounts[i].id == sx->stx_mnt_id)
                return mounts[i].pseudo;
        }
    }
    S.statfs_calls++;
    if (fstatfs(at, &sfs) < 0)
        return -1;
    int pseudo = pseudo_fs((long)sfs.f_type);
    if (keep) {
        unsigned slot = mounts_used < MOUNTS_KEPT ? mounts_used++ : mounts_next++ % MOUNTS_KEPT;
        mounts[slot].id = sx->stx_mnt_id;
        mounts[slot].pseudo = pseudo;
    }
    return pseudo;
}

/* What the O_PATH fd *at* names, in *st* as fstat says it (one statx, which
 * also names the mount); *pseudo*: whether it is on a pseudo file system
 * (judged only for a regular file; -1 when that failed). 0, or -1. */
static int
look_at(int at, struct stat *st, int *pseudo)
{
    struct statx sx;
    if (statx(at, "", AT_EMPTY_PATH, STATX_BASIC_STATS | STATX_MNT_ID_UNIQUE, &sx) < 0)
        return -1;
    memset(st, 0, sizeof *st);
    st->st_dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
    st->st_ino = (ino_t)sx.stx_ino;
    st->st_mode = sx.stx_mode;
    st->st_nlink = (nlink_t)sx.stx_nlink;
    st->st_uid = sx.stx_uid;
    st->st_gid = sx.stx_gid;
    st->st_rdev = makedev(sx.stx_rdev_major, sx.stx_rdev_minor);
    st->st_size = (off_t)sx.stx_size;
    st->st_blksize = (blksize_t)sx.stx_blksize;
    st->st_blocks = (blkcnt_t)sx.stx_blocks;
    st->st_atim.tv_sec = sx.stx_atime.tv_sec;
    st->st_atim.tv_nsec = sx.stx_atime.tv_nsec;
    st->st_mtim.tv_sec = sx.stx_mtime.tv_sec;
    st->st_mtim.tv_nsec = sx.stx_mtime.tv_nsec;
    st->st_ctim.tv_sec = sx.stx_ctime.tv_sec;
    st->st_ctim.tv_nsec = sx.stx_ctime.tv_nsec;
    *pseudo = S_ISREG(st->st_mode) ? pseudo_mount(at, &sx) : 0;
    return 0;
}

/* -- making a shadow fd ---------------------------------------------------- */

static int
new_memfd(int executable)
{
    unsigned base = MFD_CLOEXEC | MFD_ALLOW_SEALING;
    /* Named like the daemon's, never after the host path (the tracee can
     * readlink it), so a tracee cannot tell a copy from a hit. */
    if (S.memfd_exec_flags != 0) {
        int fd = memfd_create("shadowd", base | (executable ? MFD_EXEC : MFD_NOEXEC_SEAL));
        if (fd >= 0) {
            S.memfd_exec_flags = 1;
            return fd;
        }
        if (errno != EINVAL || S.memfd_exec_flags == 1)
            return -1;
        S.memfd_exec_flags = 0; /* before Linux 6.3 */
    }
    return memfd_create("shadowd", base);
}

static int
copy_bytes(int dst, int src)
{
    off_t total = 0;
    int use_read = 0;
    char buf[65536];
    for (;;) {
        ssize_t n;
        if (!use_read) {
            n = sendfile(dst, src, NULL, 1 << 30);
            if (n < 0 && (errno == EINVAL || errno == ENOSYS) && total == 0) {
                use_read = 1; /* a file system without splice */
                continue;
            }
        } else {
            n = read(src, buf, sizeof buf);
            if (n > 0) {
                for (ssize_t done = 0; done < n;) {
                    ssize_t w = write(dst, buf + done, (size_t)(n - done));
                    if (w < 0 && errno == EINTR)
                        continue;
                    if (w <= 0)
                        return -1;
                    done += w;
                }
            }
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 0;
        total += n;
        if (total > SHADOW_MAX)
            return -1; /* it grew while we copied */
    }
}

/* Our /proc/self/fd, O_PATH, opened before the program starts (a low fd
 * then, not one between a notification's: close_sources) and closed before
 * the last count of our fds: a reopen then walks one name, not /proc and
 * self (about 0.7 us of a reopen in client/c's loop). */
static int self_fd_dir = -1;

/* A new open file description of what our *fd* is, opened with *flags*
 * (through /proc/self/fd: the very inode, not a path that may have changed). */
static int
reopen(int fd, int flags)
{
    char name[32];
    if (self_fd_dir < 0)
        self_fd_dir = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (self_fd_dir >= 0) {
        snprintf(name, sizeof name, "%d", fd);
        return openat(self_fd_dir, name, flags);
    }
    snprintf(name, sizeof name, "/proc/self/fd/%d", fd);
    return open(name, flags);
}

/* A fresh sealed memfd with the bytes of *src*, reopened read-only: the
 * status quo of sandbox supervisors. -1 with errno. */
static int
local_copy(int src, const struct stat *st)
{
    int executable = (st->st_mode & 0111) != 0;
    int fd = new_memfd(executable);
    int ro = -1;
    if (fd < 0)
        return -1;
    if (copy_bytes(fd, src) < 0 || fchmod(fd, executable ? 0555 : 0444) < 0)
        goto out;
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_EXEC) < 0 && errno != EINVAL)
        goto out;
    for (int attempt = 0;; attempt++) {
        if (fcntl(fd, F_ADD_SEALS, REQUIRED_SEALS) == 0)
            break;
        /* EBUSY: pages still pinned right after the copy; it passes. */
        if (errno != EBUSY || attempt == 3)
            goto out;
        struct timespec pause = {.tv_nsec = 10000000L << attempt};
        nanosleep(&pause, NULL);
    }
    /* A new open file description, read-only, as the daemon hands out. */
    ro = reopen(fd, O_RDONLY | O_CLOEXEC);
out:
    {
        int err = errno;
        close(fd);
        errno = err;
    }
    return ro;
}

static void
note_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* shadowd_set_log's sink: the client's breaker lines, kept like our errors. */
static void
client_log(void *arg, const char *line)
{
    (void)arg;
    note_error("%s", line);
}

/* Keep the last thing that went wrong for the stats; say it with -v. */
static void
note_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(S.last_error, sizeof S.last_error, fmt, ap);
    va_end(ap);
    if (S.verbose)
        say("%s", S.last_error);
}

/* The shadow of the file by the mode's means; -1 with errno. *src* is our
 * read-only fd of it, or -1 in the routed open of the O_PATH fd *at*
 * (shadowd_open_routed_opath: the client opens it for reading only when
 * no tier serves it). */
static int
make_shadow(int at, int src, const struct stat *st, const char *label, enum how *how)
{
    if (S.mode == COPY) {
        *how = H_COPY;
        return local_copy(src, st);
    }
    if (S.open_fd) {
        int fd = shadowd_open_fd(&S.client, src, label);
        if (fd >= 0) {
            *how = S.client.route == SHADOWD_ROUTE_INDEX ? H_INDEX
                   : S.client.hit                        ? H_HIT
                                                         : H_MISS;
            return fd;
        }
        /* The daemon could not answer (down, refused, timed out): the
         * program must run all same, with a copy of our own. */
        note_error("shadowd: %s", S.client.error);
        *how = H_FALLBACK;
        return local_copy(src, st);
    }
    /* The routed open never fails because of the daemon: -1 only when the
     * file cannot be read (the tracee's own open will say why). */
    int fd = src >= 0 ? shadowd_open_routed_stat(&S.client, src, st, label)
                      : shadowd_open_routed_opath(&S.client, at, st, label);
    if (fd < 0) {
        errno = S.client.errnum ? S.client.errnum : EIO;
        return -1;
    }
    switch (S.client.route) {
    case SHADOWD_ROUTE_HELD:
        *how = H_HELD;
        break;
    case SHADOWD_ROUTE_INDEX:
        *how = H_INDEX;
        break;
    case SHADOWD_ROUTE_DAEMON:
        *how = S.client.hit ? H_HIT : H_MISS;
        break;
    default:
        if (S.client.copied_why == SHADOWD_COPIED_MISS) {
            *how = H_MISS;
        } else if (S.client.copied_why == SHADOWD_COPIED_RULE) {
            *how = H_LOCAL;
        } else if (S.client.copied_why == SHADOWD_COPIED_FIRST) {
            *how = H_RACED;
        } else if (S.client.copied_why == SHADOWD_COPIED_COLD) {
            *how = H_COLD;
        } else {
            if (S.client.error[0])
                note_error("shadowd: %s", S.client.error);
            *how = H_FALLBACK;
        }
    }
    return fd;
}

static void
keep_record(const char *path, uint64_t ns, uint64_t wall, uint64_t size, enum how how)
{
    if (S.nrecords == MAX_RECORDS) {
        S.records_dropped++;
        return;
    }
    if (S.nrecords == S.cap_records) {
        size_t cap = S.cap_records ? 2 * S.cap_records : 256;
        struct record *r = realloc(S.records, cap * sizeof *r);
        if (r == NULL) {
            S.records_dropped++;
            return;
        }
        S.records = r;
        S.cap_records = cap;
    }
    char *copy = strdup(path);
    if (copy == NULL) {
        S.records_dropped++;
        return;
    }
    S.records[S.nrecords++] = (struct record){copy, ns, wall, size, how};
}

/* -- answering a notification --------------------------------------------- */

static void
respond_continue(uint64_t id, enum reason why)
{
    struct seccomp_notif_resp resp = {
        .id = id, .val = 0, .error = 0, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE,
    };
    if (ioctl(S.listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) < 0) {
        if (errno == ENOENT) { /* the call was interrupted or the tracee died */
            S.gone++;
            return;
        }
        say("SECCOMP_IOCTL_NOTIF_SEND: %s", strerror(errno));
    }
    S.continued++;
    S.reasons[why]++;
}

/* Whether *path* has a ".." component (which could climb above a
 * chrooted tracee's root when we resolve it from its cwd). */
static int
has_dotdot(const char *path)
{
    for (const char *p = path; (p = strstr(p, "..")) != NULL; p += 2) {
        if ((p == path || p[-1] == '/') && (p[2] == '\0' || p[2] == '/'))
            return 1;
    }
    return 0;
}

/* Close the fds a notification opened on the program's file systems (the
 * directory it resolves from, the file's O_PATH and O_RDONLY fds); each
 * set to -1. They were opened one after the other, so their numbers are
 * most often consecutive: then one close_range closes them all. */
static void
close_sources(int *dir, int *at, int *src)
{
    int *fds[] = {dir, at, src};
    int lo = -1, hi = -1, n = 0;
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] < 0)
            continue;
        lo = lo < 0 || *fds[i] < lo ? *fds[i] : lo;
        hi = *fds[i] > hi ? *fds[i] : hi;
        n++;
    }
    if (n > 1 && hi - lo + 1 == n && syscall(__NR_close_range, (unsigned)lo, (unsigned)hi, 0) == 0) {
        *dir = *at = *src = -1;
        return;
    }
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static void
handle(const struct seccomp_notif *req)
{
    const pid_t pid = (pid_t)req->pid; /* the thread's id: its own cwd and fd table */
    uint64_t id = req->id, path_addr, resolve = 0;
    int dirfd = AT_FDCWD, flags;
    char path[PATH_MAX];
    int dir = -1, at = -1, src = -1, shadow = -1;
    enum reason why;

    S.notifications++;
    if (S.mode == PASSTHROUGH) {
        respond_continue(id, R_PASSTHROUGH);
        return;
    }
#ifdef __NR_open
    if (req->data.nr == __NR_open) {
        path_addr = req->data.args[0];
        flags = (int)req->data.args[1];
    } else
#endif
    if (req->data.nr == __NR_openat) {
        dirfd = (int)req->data.args[0];
        path_addr = req->data.args[1];
        flags = (int)req->data.args[2];
    } else { /* openat2(dirfd, path, how, size) */
        struct open_how how;
        dirfd = (int)req->data.args[0];
        path_addr = req->data.args[1];
        /* Only the struct's first version; a larger one is the kernel's to
         * check, and so are unknown flags and a mode without O_CREAT. */
        if (req->data.args[3] != sizeof how) {
            respond_continue(id, R_FLAGS);
            return;
        }
        if (read_bytes(pid, req->data.args[2], &how, sizeof how) < 0) {
            respond_continue(id, R_PATH);
            return;
        }
        if (how.mode != 0 || (how.flags & ~(uint64_t)KNOWN_OPEN_FLAGS) != 0) {
            respond_continue(id, R_FLAGS);
            return;
        }
        flags = (int)how.flags;
        resolve = how.resolve;
    }
    if ((flags & O_ACCMODE) != O_RDONLY ||
        (flags & (O_CREAT | O_TRUNC | O_TMPFILE | O_PATH | O_DIRECTORY)) != 0) {
        respond_continue(id, R_FLAGS);
        return;
    }
    if (read_string(pid, path_addr, path, sizeof path) < 0) {
        respond_continue(id, R_PATH); /* the tracee gets EFAULT or ENAMETOOLONG */
        return;
    }
    /* What we read belongs to the task that is waiting only if the
     * notification still is: otherwise the tid may be another's by now. */
    if (ioctl(S.listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
        S.gone++;
        return;
    }

    /* Resolve as the tracee would: from its cwd or dirfd, or for an
     * absolute path from its root (RESOLVE_IN_ROOT on /proc/TID/root keeps
     * a chroot and its mount namespace). Never through a magic link:
     * /proc/self/fd/N here would be the supervisor's fd N. */
    int scoped = (resolve & (RESOLVE_IN_ROOT | RESOLVE_BENEATH)) != 0;
    if (path[0] == '/' && !scoped) {
        dir = in_task_dir(pid, "root", NULL);
        resolve |= RESOLVE_IN_ROOT;
    } else {
        dir = open_tracee_dir(pid, dirfd);
        if (dir >= 0 && !scoped && has_dotdot(path) && !same_root_as_ours(pid, &S.root)) {
            why = R_ROOT;
            goto cont;
        }
    }
    if (dir < 0) {
        why = R_OPEN; /* say EBADF or ENOTDIR: the tracee's own call will tell */
        goto cont;
    }

    uint64_t start = now_ns();
    /* O_PATH first: opening a FIFO for reading, even O_NONBLOCK, lets a
     * writer's open return, and our close then leaves it writing to no
     * reader; a device's driver would run. Only a regular file of a real
     * file system (and not too large) is then opened for reading, through
     * the descriptor we hold (the very inode that was checked). */
    struct stat st;
    int pseudo;
    at = open_source(dir, path, O_PATH | O_CLOEXEC | (flags & O_NOFOLLOW),
                     resolve | RESOLVE_NO_MAGICLINKS);
    if (at < 0) {
        why = R_OPEN;
        goto cont;
    }
    if (look_at(at, &st, &pseudo) < 0 || !S_ISREG(st.st_mode)) {
        why = R_NOT_REGULAR;
        goto cont;
    }
    if (pseudo != 0) {
        why = R_PSEUDO_FS;
        goto cont;
    }
    if (st.st_size > SHADOW_MAX) {
        why = R_TOO_LARGE;
        goto cont;
    }
    /* The routed open takes the O_PATH fd: a file its tiers serve needs
     * no read-open (client/c proves access with faccessat2 instead), and
     * it opens the others through /proc/self/fd as we would. */
    if (S.mode != SHADOWD || S.open_fd || S.read_open) {
        src = reopen(at, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (src < 0) {
            why = R_OPEN; /* (EACCES: the program's own open will say so) */
            goto cont;
        }
    }
    enum how how;
    uint64_t made = now_ns();
    shadow = make_shadow(at, src, &st, path[0] == '/' ? path : NULL, &how);
    if (shadow < 0) {
        if (src < 0 && (errno == EACCES || errno == EPERM)) {
            why = R_OPEN; /* the client's proof of access said no */
            goto cont;
        }
        note_error("making a shadow of %s: %s", path, strerror(errno));
        why = R_SHADOW;
        goto cont;
    }
    if ((flags & O_NONBLOCK) && fcntl(shadow, F_SETFL, O_NONBLOCK) < 0) {
        why = R_SHADOW;
        goto cont;
    }
    uint64_t shadowed_at = now_ns();
    /* Before the answer: the program may unmount the file's file system as
     * soon as it has closed its fd, and ours must not keep it busy then
     * (EBUSY). Counted with the source step. */
    close_sources(&dir, &at, &src);
    struct seccomp_notif_addfd addfd = {
        .id = id,
        .flags = SECCOMP_ADDFD_FLAG_SEND, /* install and answer at once */
        .srcfd = (uint32_t)shadow,
        .newfd = 0,
        .newfd_flags = (flags & O_CLOEXEC) ? O_CLOEXEC : 0,
    };
    /* The injection answers the tracee, which the kernel may run on this
     * CPU before the call returns to us: that is the tracee's time. So our
     * time is the wall time up to the call plus the call's CPU time; the
     * wall time to its return is kept too. */
    uint64_t before_inject = now_ns(), cpu = thread_cpu_ns();
    if (ioctl(S.listener, SECCOMP_IOCTL_NOTIF_ADDFD, &addfd) < 0) {
        if (errno == ENOENT) { /* interrupted: the tracee will call again */
            S.gone++;
            goto done;
        }
        why = R_INJECT;
        goto cont;
    }
    cpu = thread_cpu_ns() - cpu;
    uint64_t wall = now_ns() - start;
    uint64_t ns = before_inject - start + cpu;
    S.shadowed++;
    S.shadow_ns += ns;
    S.source_ns += made - start + (before_inject - shadowed_at);
    S.make_ns += shadowed_at - made;
    S.inject_ns += cpu;
    S.shadow_wall_ns += wall;
    S.shadow_bytes += (uint64_t)st.st_size;
    S.hits += how == H_HIT;
    S.misses += how == H_MISS;
    S.fallbacks += how == H_FALLBACK;
    S.held += how == H_HELD;
    S.local += how == H_LOCAL;
    S.raced += how == H_RACED;
    S.cold += how == H_COLD;
    S.indexed += how == H_INDEX;
    keep_record(path, ns, wall, (uint64_t)st.st_size, how);
    if (S.mode == SHADOWD)
        shadowd_idle(&S.client); /* the program runs again: the daemon's turn */
    goto done;
cont:
    close_sources(&dir, &at, &src); /* (before the program's own open: as above) */
    respond_continue(id, why);
done:
    close_sources(&dir, &at, &src);
    if (shadow >= 0)
        close(shadow); /* a memfd's: it keeps no file system of the program's busy */
}

/* -- the stats ------------------------------------------------------------ */

/* The length of the valid UTF-8 sequence at *p*, 0 when it is not one. */
static size_t
utf8_len(const unsigned char *p)
{
    unsigned char b = p[0], lo = 0x80, hi = 0xbf;
    size_t k;
    if (b >= 0xc2 && b <= 0xdf)
        k = 1;
    else if (b >= 0xe0 && b <= 0xef) {
        k = 2;
        lo = b == 0xe0 ? 0xa0 : 0x80;
        hi = b == 0xed ? 0x9f : 0xbf;
    } else if (b >= 0xf0 && b <= 0xf4) {
        k = 3;
        lo = b == 0xf0 ? 0x90 : 0x80;
        hi = b == 0xf4 ? 0x8f : 0xbf;
    } else
        return 0;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (size_t j = 2; j <= k; j++)
        if ((p[j] & 0xc0) != 0x80)
            return 0;
    return k + 1;
}

/* *s* as a JSON string; bytes that are not UTF-8 become U+FFFD. */
static void
json_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    fputc('"', f);
    while (*p) {
        if (*p == '"' || *p == '\\') {
            fputc('\\', f);
            fputc(*p++, f);
        } else if (*p < 0x20 || *p == 0x7f) {
            fprintf(f, "\\u%04x", *p++);
        } else if (*p < 0x80) {
            fputc(*p++, f);
        } else {
            size_t k = utf8_len(p);
            if (k) {
                fwrite(p, 1, k, f);
                p += k;
            } else {
                fputs("\\ufffd", f);
                p++;
            }
        }
    }
    fputc('"', f);
}

static void
write_stats(int fd, int exit_status, int fds_before, int fds_after)
{
    FILE *f = fdopen(fd, "w");
    if (f == NULL) {
        close(fd);
        return;
    }
    fprintf(f, "{\"mode\": \"%s\", \"exit_status\": %d", mode_names[S.mode], exit_status);
    fprintf(f, ", \"open\": \"%s\"",
            S.mode != SHADOWD ? ""
            : S.open_fd       ? "shadowd_open_fd"
            : S.read_open     ? "shadowd_open_routed_stat"
                              : "shadowd_open_routed_opath");
    fprintf(f, ", \"notifications\": %llu, \"shadowed\": %llu, \"continued\": %llu",
            (unsigned long long)S.notifications, (unsigned long long)S.shadowed,
            (unsigned long long)S.continued);
    fprintf(f, ", \"gone\": %llu, \"hits\": %llu, \"misses\": %llu, \"fallbacks\": %llu",
            (unsigned long long)S.gone, (unsigned long long)S.hits,
            (unsigned long long)S.misses, (unsigned long long)S.fallbacks);
    fprintf(f, ", \"held\": %llu, \"local\": %llu, \"raced\": %llu, \"cold\": %llu",
            (unsigned long long)S.held, (unsigned long long)S.local, (unsigned long long)S.raced,
            (unsigned long long)S.cold);
    fprintf(f, ", \"index\": %llu, \"index_ready\": %s", (unsigned long long)S.indexed,
            S.index_ready ? "true" : "false");
    fprintf(f, ", \"preload_files\": %llu, \"preload_held\": %llu, \"preload_ns\": %llu",
            (unsigned long long)S.preload_files, (unsigned long long)S.preload_held,
            (unsigned long long)S.preload_ns);
    fprintf(f, ", \"protocol\": %d", S.client.protocol);
    fprintf(f, ", \"client\": {\"daemon\": %llu, \"held\": %llu, \"copied\": %llu, "
               "\"fast\": %llu, \"missed\": %llu, \"preloaded\": %llu, \"index\": %llu, "
               "\"index_refused\": %llu, \"reported\": %llu, \"read_opens\": %llu, "
               "\"unopened\": %llu}",
            (unsigned long long)S.client.counts.daemon, (unsigned long long)S.client.counts.held,
            (unsigned long long)S.client.counts.copied, (unsigned long long)S.client.counts.fast,
            (unsigned long long)S.client.counts.missed,
            (unsigned long long)S.client.counts.preloaded,
            (unsigned long long)S.client.counts.index,
            (unsigned long long)S.client.counts.index_refused,
            (unsigned long long)S.client.counts.reported,
            (unsigned long long)S.client.counts.read_opens,
            (unsigned long long)S.client.counts.unopened);
    fprintf(f, ", \"shadow_ns\": %llu, \"shadow_wall_ns\": %llu, \"shadow_bytes\": %llu",
            (unsigned long long)S.shadow_ns, (unsigned long long)S.shadow_wall_ns,
            (unsigned long long)S.shadow_bytes);
    fprintf(f, ", \"source_ns\": %llu, \"make_ns\": %llu, \"inject_ns\": %llu",
            (unsigned long long)S.source_ns, (unsigned long long)S.make_ns,
            (unsigned long long)S.inject_ns);
    fprintf(f, ", \"statfs_calls\": %llu, \"task_dirs_opened\": %llu, \"sync_wakeup\": %s",
            (unsigned long long)S.statfs_calls, (unsigned long long)S.task_dirs_opened,
            S.synced ? "true" : "false");
    /* All the CPU time the supervisor used (user and system), the time
     * outside the per-file window too (reading the path, the program's
     * root, continues, start-up): what it costs, not only what a file
     * waits for; and, unlike a wall time, not grown by other processes
     * taking the CPU. */
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        fprintf(f, ", \"cpu_ns\": %llu",
                (unsigned long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ULL +
                    (unsigned long long)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ULL);
    fprintf(f, ", \"fds_before\": %d, \"fds_after\": %d", fds_before, fds_after);
    fprintf(f, ", \"shadowd_connected\": %s, \"last_error\": ",
            S.connected ? "true" : "false");
    json_string(f, S.last_error);
    fputs(", \"continued_by_reason\": {", f);
    for (int r = 0; r < N_REASONS; r++)
        fprintf(f, "%s\"%s\": %llu", r ? ", " : "", reason_names[r],
                (unsigned long long)S.reasons[r]);
    fprintf(f, "}, \"files_dropped\": %llu, \"files\": [", (unsigned long long)S.records_dropped);
    for (size_t i = 0; i < S.nrecords; i++) {
        fputs(i ? ",\n  {\"path\": " : "\n  {\"path\": ", f);
        json_string(f, S.records[i].path);
        fprintf(f, ", \"ns\": %llu, \"wall_ns\": %llu, \"size\": %llu, \"how\": \"%s\"}",
                (unsigned long long)S.records[i].ns, (unsigned long long)S.records[i].wall_ns,
                (unsigned long long)S.records[i].size, how_names[S.records[i].how]);
    }
    fputs("]}\n", f);
    if (fclose(f) != 0)
        say("writing the stats: %s", strerror(errno));
}

/* -- main ---------------------------------------------------------------- */

static void
usage(FILE *f)
{
    fputs("usage: shadowd-supervise [--mode passthrough|copy|shadowd] [--socket PATH]\n"
          "                         [--open-fd | --race] [--no-index | --keep-index-hits]\n"
          "                         [--read-open]\n"
          "                         [--preload FILE]\n"
          "                         [--backoff MS[,MAX]] [--timeouts MS[,MS]]\n"
          "                         [--held N[,BYTES]] [--cold N[,MS]] [--stats FILE]\n"
          "                         [--no-sync-wakeup] [--verbose]\n"
          "                         [--] PROGRAM [ARGS...]\n"
          "\n"
          "Runs PROGRAM with its read-only opens of regular files shadowed by sealed,\n"
          "read-only memfds (seccomp user notification). A measuring instrument, not a\n"
          "sandbox.\n"
          "\n"
          "  --mode shadowd      the routed open of client/c: the files this supervisor\n"
          "                      holds, shadowd's index (no round trip), local copies\n"
          "                      of small and young files, shadowd without waiting for\n"
          "                      its copy, a local copy whenever it cannot serve (the\n"
          "                      default)\n"
          "  --mode copy         a fresh sealed memfd per open (the status quo)\n"
          "  --mode passthrough  trap every open, then let the program make it\n"
          "  --socket PATH       shadowd's socket (default: $SHADOWD_SOCKET, the user's,\n"
          "                      the host's: the socket rule of client/c)\n"
          "  --race              shadowd mode: the routed open copies while it waits for\n"
          "                      shadowd's answer and takes whichever is done first\n"
          "  --no-index          shadowd mode: never use shadowd's index\n"
          "  --keep-index-hits   shadowd mode: index hits also go into the files held\n"
          "  --read-open         shadowd mode: open every file for reading before the\n"
          "                      routed open (as before shadowd_open_routed_opath, which\n"
          "                      opens only the files no tier serves)\n"
          "  --open-fd           shadowd mode: ask shadowd for every file with\n"
          "                      shadowd_open_fd (an index hit, else a request; a\n"
          "                      miss waits for its copy), a local copy when it\n"
          "                      cannot answer; the index is not fetched beforehand\n"
          "  --preload FILE      shadowd mode: paths, one per line, asked of shadowd in\n"
          "                      one batch before its first open; those it has are held\n"
          "  --backoff MS[,MAX]  the client's breaker: first window and cap (1000,30000)\n"
          "  --timeouts MS[,MS]  the client's connect+hello and reply timeouts (250,250;\n"
          "                      at most 30000)\n"
          "  --held N[,BYTES]    bounds of the files held (default 1024 or half the fd\n"
          "                      limit, and 512 MiB)\n"
          "  --cold N[,MS]       after misses of N files in a row, copy without asking\n"
          "                      for MS (default 1,1000; 0: never)\n"
          "  --stats FILE        write the counters there as one JSON object at the end\n"
          "  --no-sync-wakeup    let the kernel wake the program and the supervisor on\n"
          "                      any CPU (by default each wakes on the CPU of the one\n"
          "                      that waits for it, where the kernel can: Linux 6.6)\n"
          "  --verbose           say on stderr why the daemon could not answer\n"
          "\n"
          "Exits with PROGRAM's status (128+N when a signal N ended it); 125 when the\n"
          "supervisor itself failed, 126/127 when PROGRAM could not be run.\n",
          f);
}

static void
forward(int sig)
{
    if (child_pid > 0)
        kill(child_pid, sig);
}

/* Reap every child that has ended: the tracee's status in *status* when it
 * was one; whether children remain in *others*. */
static void
reap(int *status, int *main_done, int *others)
{
    for (;;) {
        int st;
        pid_t r = waitpid(-1, &st, WNOHANG);
        if (r > 0) {
            if (r == child_pid) {
                *status = st;
                *main_done = 1;
            }
            continue;
        }
        *others = !(r < 0 && errno == ECHILD);
        return;
    }
}

static int
serve(int *status)
{
    struct seccomp_notif_sizes sizes;
    sigset_t chld;
    int main_done = 0, others = 1, failed = 0;

    if (syscall(__NR_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0) {
        say("SECCOMP_GET_NOTIF_SIZES: %s", strerror(errno));
        return -1;
    }
    size_t req_size = sizes.seccomp_notif > sizeof(struct seccomp_notif)
                          ? sizes.seccomp_notif
                          : sizeof(struct seccomp_notif);
    struct seccomp_notif *req = malloc(req_size);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (req == NULL || sfd < 0) {
        say("setting up: %s", strerror(errno));
        free(req);
        if (sfd >= 0)
            close(sfd);
        return -1;
    }
    struct pollfd p[2] = {{.fd = S.listener, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
    /* Until the tracee and every process it left behind (they come to us:
     * we are their subreaper) have ended, as strace -f does. */
    while (!(main_done && !others)) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            say("poll: %s", strerror(errno));
            failed = 1;
            break;
        }
        if (p[1].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
            }
            reap(status, &main_done, &others);
        }
        if (p[0].revents & POLLIN) {
            memset(req, 0, req_size);
            if (ioctl(S.listener, SECCOMP_IOCTL_NOTIF_RECV, req) == 0)
                handle(req);
            else if (errno != EINTR && errno != ENOENT) {
                say("SECCOMP_IOCTL_NOTIF_RECV: %s", strerror(errno));
                failed = 1;
                break;
            }
        } else if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            p[0].fd = -1; /* no task uses the filter any more */
        }
    }
    free(req);
    close(sfd);
    return failed ? -1 : 0;
}

/* A whole number, or -1 when *s* is not one. */
static long long
number(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    return errno || end == s || *end || v < 0 ? -1 : v;
}

/* "A" or "A,B" into *a* and *b* (b untouched when absent): 0, or -1. */
static int
pair(const char *value, long long *a, long long *b)
{
    char first[32];
    const char *comma = strchr(value, ',');
    size_t n = comma ? (size_t)(comma - value) : strlen(value);
    if (n >= sizeof first)
        return -1;
    memcpy(first, value, n);
    first[n] = '\0';
    *a = number(first);
    if (comma)
        *b = number(comma + 1);
    return *a < 0 || (comma && *b < 0) ? -1 : 0;
}

/* Ask shadowd for the paths listed in *path* (one per line), in one batch. */
static int
preload(const char *path)
{
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        say("--preload %s: %s", path, strerror(errno));
        return -1;
    }
    char **paths = NULL, *line = NULL;
    size_t cap = 0, n = 0, len = 0;
    ssize_t got;
    int failed = 0;
    while ((got = getline(&line, &len, f)) >= 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
            line[--got] = '\0';
        if (got == 0)
            continue;
        if (n == cap) {
            size_t more = cap ? 2 * cap : 256;
            char **grown = realloc(paths, more * sizeof *paths);
            if (grown == NULL) {
                failed = 1;
                break;
            }
            paths = grown;
            cap = more;
        }
        if ((paths[n] = strdup(line)) == NULL) {
            failed = 1;
            break;
        }
        n++;
    }
    free(line);
    fclose(f);
    if (failed || n > INT32_MAX) {
        say("--preload %s: out of memory", path);
    } else {
        uint64_t start = now_ns();
        int held = shadowd_preload(&S.client, (const char *const *)paths, (int)n);
        S.preload_ns = now_ns() - start;
        S.preload_files = n;
        S.preload_held = held > 0 ? (uint64_t)held : 0;
    }
    for (size_t k = 0; k < n; k++)
        free(paths[k]);
    free(paths);
    return failed ? -1 : 0;
}

int
main(int argc, char **argv)
{
    const char *socket_path = NULL, *stats_path = NULL, *preload_path = NULL;
    int i, sv[2], stats_fd = -1, status = 0;
    long long backoff = -1, backoff_max = -1, held = -1, held_bytes = 512LL << 20;
    long long cold = -1, cold_ms = -1, connect_ms = -1, reply_ms = -1;
    sigset_t chld, old_mask;
    struct rlimit nofile = {0, 0};

    S.mode = SHADOWD;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *value = NULL;
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-')
            break;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            S.verbose = 1;
            continue;
        }
        if (strcmp(a, "--open-fd") == 0) {
            S.open_fd = 1;
            continue;
        }
        if (strcmp(a, "--race") == 0) {
            S.race = 1;
            continue;
        }
        if (strcmp(a, "--read-open") == 0) {
            S.read_open = 1;
            continue;
        }
        if (strcmp(a, "--no-index") == 0) {
            S.index = 0;
            continue;
        }
        if (strcmp(a, "--keep-index-hits") == 0) {
            S.index_keep = 1;
            continue;
        }
        if (strcmp(a, "--no-sync-wakeup") == 0) {
            S.sync_wakeup = 0;
            continue;
        }
        const char *names[] = {"--mode",    "--socket", "--stats", "--preload",
                               "--backoff", "--held",   "--cold",   "--timeouts"};
        int which = -1;
        for (int n = 0; n < 8; n++) {
            size_t len = strlen(names[n]);
            if (strncmp(a, names[n], len) == 0 && (a[len] == '\0' || a[len] == '=')) {
                which = n;
                value = a[len] == '=' ? a + len + 1 : (i + 1 < argc ? argv[++i] : NULL);
            }
        }
        if (which < 0 || value == NULL) {
            fprintf(stderr, "shadowd-supervise: %s: %s\n", a,
                    which < 0 ? "unknown option" : "needs a value");
            usage(stderr);
            return 2;
        }
        if (which == 0) {
            int m;
            for (m = 0; m < 3 && strcmp(value, mode_names[m]) != 0; m++) {
            }
            if (m == 3) {
                fprintf(stderr, "shadowd-supervise: --mode %s: not passthrough, copy or shadowd\n",
                        value);
                return 2;
            }
            S.mode = (enum mode)m;
        } else if (which == 1) {
            socket_path = value;
        } else if (which == 2) {
            stats_path = value;
        } else if (which == 3) {
            preload_path = value;
        } else if ((which == 4   ? pair(value, &backoff, &backoff_max)
                    : which == 5 ? pair(value, &held, &held_bytes)
                    : which == 6 ? pair(value, &cold, &cold_ms)
                                 : pair(value, &connect_ms, &reply_ms)) < 0 ||
                   backoff > INT32_MAX || backoff_max > INT32_MAX || held > INT32_MAX ||
                   cold > INT32_MAX || cold_ms > INT32_MAX || connect_ms > INT32_MAX ||
                   reply_ms > INT32_MAX) {
            fprintf(stderr, "shadowd-supervise: %s %s: not a number (or two, with a comma)\n",
                    names[which], value);
            return 2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    if (preload_path && (S.mode != SHADOWD || S.open_fd)) {
        fprintf(stderr, "shadowd-supervise: --preload fills the routed open's tier: shadowd mode"
                        " without --open-fd\n");
        return 2;
    }
    char **program = argv + i;

    if (stats_path) {
        stats_fd = open(stats_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (stats_fd < 0) {
            say("%s: %s", stats_path, strerror(errno));
            return 125;
        }
    }
    int fds_before = count_open_fds();
    if (stat("/", &S.root) < 0 || fds_before < 0) {
        say("/proc is needed: %s", strerror(errno));
        return 125;
    }
    if (S.mode == SHADOWD) {
        /* The client's "daemon gone / back" lines: in the stats always,
         * on stderr with -v (never mixed with the program's stderr else). */
        shadowd_init(&S.client);
        shadowd_set_log(&S.client, client_log, NULL);
        shadowd_set_backoff(&S.client, (int)backoff, (int)backoff_max);
        shadowd_set_timeouts(&S.client, (int)connect_ms, (int)reply_ms, -1);
        shadowd_set_race(&S.client, S.race);
        shadowd_set_cold(&S.client, (int)cold, (int)cold_ms);
        /* The tier: every file of a program run (pip opens about 500) and
         * then some, each an fd of ours: at most half our fd limit. */
        if (held < 0) {
            held = SHADOWD_HELD_SLOTS;
            if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY &&
                (long long)nofile.rlim_cur / 2 - 32 < held)
                held = (long long)nofile.rlim_cur / 2 - 32 > 0 ? (long long)nofile.rlim_cur / 2 - 32 : 0;
        }
        shadowd_set_held(&S.client, (int)held, held_bytes);
        shadowd_set_index(&S.client, S.index, S.index_keep ? 1 : -1);
        if (preload_path && access(preload_path, R_OK) < 0) {
            say("--preload %s: %s", preload_path, strerror(errno));
            return 125;
        }
    }

    /* The routed open's hello and index request go out before the fork:
     * the daemon answers them while we fork and the tracee installs its
     * filter (a fresh daemon's answers took as long as all of that). The
     * other modes connect after the fork, as a supervisor written before
     * the routed open does. */
    const int early_hello = S.mode == SHADOWD && S.index && !S.open_fd;
    int early = -1;
    if (early_hello && (early = shadowd_connect_start(&S.client, socket_path)) < 0)
        note_error("shadowd: %s", S.client.error);

    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, &old_mask);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        say("socketpair: %s", strerror(errno));
        return 125;
    }
    /* Processes the tracee leaves behind come to us, so we see them end. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    child_pid = fork();
    if (child_pid < 0) {
        say("fork: %s", strerror(errno));
        return 125;
    }
    if (child_pid == 0) {
        close(sv[0]);
        sigprocmask(SIG_SETMASK, &old_mask, NULL);
        int listener = install_filter();
        if (listener < 0) {
            say("installing the seccomp filter: %s", strerror(errno));
            _exit(125);
        }
        if (send_fd(sv[1], listener) < 0)
            _exit(125);
        close(listener);
        close(sv[1]);
        execvp(program[0], program);
        int err = errno;
        say("%s: %s", program[0], strerror(err));
        _exit(err == ENOENT ? 127 : 126);
    }
    close(sv[1]);
    S.listener = recv_fd(sv[0]);
    close(sv[0]);
    /* The program waits for every answer, so it and we run in turn: woken
     * on the CPU of the one that waits, neither waits for another CPU to
     * wake up or pays for a cross-CPU wake-up (measured: the injection's
     * CPU time, and the source step, shorter in every mode). */
    if (S.listener >= 0 && S.sync_wakeup &&
        ioctl(S.listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) == 0)
        S.synced = 1;
    if (S.mode == SHADOWD && S.listener >= 0) {
        /* The hello's answer, and the index, while the tracee execs (its
         * first open waits for us), so that no open pays for them. A daemon
         * that is not there is no reason not to run the program. */
        int connected = early_hello ? early == 0 && shadowd_connect_wait(&S.client) == 0
                                    : shadowd_connect(&S.client, socket_path) == 0;
        if (connected) {
            S.connected = 1;
            /* The index too (the daemon's uid or root only): then the
             * program's first open needs no round trip either. */
            if (early_hello)
                S.index_ready = shadowd_index_ready(&S.client);
        } else if (!early_hello || early == 0) { /* (a failed start said why) */
            note_error("shadowd: %s", S.client.error);
        }
        if (preload_path)
            preload(preload_path); /* (unreadable since checked: said, and run without) */
    }

    /* A terminal's ^C and ^\ reach the tracee itself; we stay to answer
     * its opens until it ends. SIGTERM and SIGHUP sent to us go on to it. */
    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    struct sigaction fwd = {.sa_handler = forward};
    sigemptyset(&fwd.sa_mask);
    sigaction(SIGTERM, &fwd, NULL);
    sigaction(SIGHUP, &fwd, NULL);

    if (self_fd_dir < 0)
        self_fd_dir = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    int failed = S.listener < 0 || serve(&status) < 0;
    if (S.listener >= 0)
        close(S.listener);
    S.listener = -1;
    if (failed) {
        /* The tracee's opens fail with ENOSYS once the listener is gone. */
        while (waitpid(child_pid, &status, 0) < 0 && errno == EINTR) {
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
    }
    if (S.mode == SHADOWD)
        shadowd_close(&S.client);
    if (self_fd_dir >= 0)
        close(self_fd_dir);
    self_fd_dir = -1;
    close_task_dirs();
    int exit_status = WIFEXITED(status) ? WEXITSTATUS(status)
                      : WIFSIGNALED(status) ? 128 + WTERMSIG(status)
                                            : 125;
    int fds_after = count_open_fds();
    if (stats_fd >= 0)
        write_stats(stats_fd, exit_status, fds_before, fds_after);
    for (size_t r = 0; r < S.nrecords; r++)
        free(S.records[r].path);
    free(S.records);
    return exit_status;
}
