/*
 * source_step: what each system call of the reference supervisor's source
 * step costs (contrib/supervisor/shadowd-supervise.c, handle()), in a loop
 * over the paths a real program opened, resolved as the supervisor resolves
 * them: from the /proc/PID/root of another process (a child that sleeps),
 * with RESOLVE_IN_ROOT and RESOLVE_NO_MAGICLINKS.
 *
 * Sequences, each timed call by call (us per file, mean over every file of
 * every round):
 *   before  the supervisor until 2026-11-28: open /proc/PID/root; openat2
 *           O_PATH; fstat; reopen through /proc/self/fd; close the O_PATH fd;
 *           fstatfs; close the source; close the directory
 *   after   the root looked up in an O_PATH fd of /proc/PID kept open;
 *           statx (STATX_MNT_ID_UNIQUE) instead of fstat, fstatfs once per
 *           mount, before the reopen; the three fds closed by one close_range
 *   opath   "after" for a file a tier serves, as the routed open of the
 *           O_PATH fd makes it (shadowd_open_routed_opath, 2026-11-29): no
 *           reopen; faccessat2(R_OK, AT_EMPTY_PATH | AT_EACCESS) on the
 *           O_PATH fd instead (the client's proof of access); two fds
 *           closed by one close_range
 *   root    ways to reach the program's root, each on its own: open
 *           /proc/PID/root (and close it); openat "root" in an O_PATH fd of
 *           /proc/PID kept open (and close); statx of "root" in that fd (no
 *           fd made)
 *
 * Between two files it can write over THRASH_KIB of memory, as the program
 * between two of its opens would evict the kernel's data from the caches
 * (in a tight loop they stay hot, and every call is several times cheaper
 * than under a real program).
 *
 * A measuring instrument for docs/performance.md; run by
 * benchmarks/source_step.py. Must never: write anything but its report,
 * or open a path for reading that is not a regular file (it looks O_PATH
 * first, as the supervisor does).
 *
 *   source_step PATHS_FILE ROUNDS [THRASH_KIB]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef STATX_MNT_ID_UNIQUE
#define STATX_MNT_ID_UNIQUE 0x00004000U
#endif
#define MAX_PATHS 20000
#define MAX_STEPS 16

static uint64_t
now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static int
openat2_path(int dir, const char *path)
{
    struct open_how how = {.flags = O_PATH | O_CLOEXEC,
                           .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS};
    return (int)syscall(SYS_openat2, dir, path, &how, sizeof how);
}

/* One sequence's steps: names, and each call's ns (a file's calls are
 * kept only once the file is known to be a regular one: done()). */
struct steps {
    const char *name[MAX_STEPS];
    uint32_t *ns[MAX_STEPS];
    uint32_t pending[MAX_STEPS];
    int n;
    size_t files, cap;
};

static uint64_t mark;

static void
step(struct steps *s, int i, const char *name)
{
    uint64_t t = now_ns();
    if (i >= s->n) {
        s->name[i] = name;
        s->n = i + 1;
    }
    s->pending[i] = (uint32_t)(t - mark);
    mark = now_ns();
}

static void
done(struct steps *s)
{
    if (s->files == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 4096;
        for (int i = 0; i < MAX_STEPS; i++) {
            s->ns[i] = realloc(s->ns[i], s->cap * sizeof(uint32_t));
            if (s->ns[i] == NULL)
                abort();
        }
    }
    for (int i = 0; i < s->n; i++)
        s->ns[i][s->files] = s->pending[i];
    s->files++;
}

static char *thrash_buf;
static size_t thrash_len;

static void
thrash(void)
{
    for (size_t i = 0; i < thrash_len; i += 64)
        thrash_buf[i]++;
}

static int self_fd_dir = -1;

static int
reopen(int fd)
{
    char name[16];
    snprintf(name, sizeof name, "%d", fd);
    return openat(self_fd_dir, name, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
}

static void
before(struct steps *s, const char *root, const char *path)
{
    struct stat st;
    struct statfs sfs;
    mark = now_ns();
    int dir = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    step(s, 0, "open /proc/PID/root");
    int at = openat2_path(dir, path);
    step(s, 1, "openat2 O_PATH");
    if (at < 0 || fstat(at, &st) < 0 || !S_ISREG(st.st_mode)) {
        if (at >= 0)
            close(at);
        close(dir);
        return;
    }
    step(s, 2, "fstat");
    int src = reopen(at);
    step(s, 3, "reopen /proc/self/fd/N");
    close(at);
    step(s, 4, "close O_PATH fd");
    fstatfs(src, &sfs);
    step(s, 5, "fstatfs");
    close(src);
    step(s, 6, "close source");
    close(dir);
    step(s, 7, "close directory");
    done(s);
}

static struct {
    uint64_t id;
    int pseudo;
} mounts[64];
static unsigned mounts_used;

/* Steps 0-3 of both sequences: the tracee's root, the O_PATH look, its statx
 * and the pseudo-fs judgement once per mount (kept only if *remember*: "after"
 * keeps the mounts it saw, "opath" only reads them). The O_PATH fd, its root's
 * in *dir*; -1 (nothing left open) when it is not a regular file. */
static int
look(struct steps *s, int piddir, const char *path, int remember, int *dir)
{
    struct statx sx;
    struct statfs sfs;
    mark = now_ns();
    *dir = openat(piddir, "root", O_PATH | O_DIRECTORY | O_CLOEXEC);
    step(s, 0, "openat(/proc/PID fd, root)");
    int at = openat2_path(*dir, path);
    step(s, 1, "openat2 O_PATH");
    if (at < 0 || statx(at, "", AT_EMPTY_PATH, STATX_BASIC_STATS | STATX_MNT_ID_UNIQUE, &sx) < 0 ||
        !S_ISREG(sx.stx_mode)) {
        if (at >= 0)
            close(at);
        close(*dir);
        return -1;
    }
    step(s, 2, "statx");
    unsigned i = 0;
    int known = (sx.stx_mask & STATX_MNT_ID_UNIQUE) != 0;
    while (known && i < mounts_used && mounts[i].id != sx.stx_mnt_id)
        i++;
    if (!known || i == mounts_used) {
        fstatfs(at, &sfs);
        if (remember && known && mounts_used < 64)
            mounts[mounts_used++].id = sx.stx_mnt_id;
    }
    step(s, 3, "fstatfs (once per mount)");
    return at;
}

static void
after(struct steps *s, int piddir, const char *path)
{
    int dir;
    int at = look(s, piddir, path, 1, &dir);
    if (at < 0)
        return;
    int src = reopen(at);
    step(s, 4, "reopen /proc/self/fd/N");
    int lo = dir < at ? dir : at, hi = dir > at ? dir : at;
    lo = src < lo ? src : lo;
    hi = src > hi ? src : hi;
    if (hi - lo != 2 || close_range((unsigned)lo, (unsigned)hi, 0) < 0) {
        close(src);
        close(at);
        close(dir);
    }
    step(s, 5, "close_range (3 fds)");
    done(s);
}

static void
opath(struct steps *s, int piddir, const char *path)
{
    int dir;
    int at = look(s, piddir, path, 0, &dir);
    if (at < 0)
        return;
    syscall(SYS_faccessat2, at, "", R_OK, AT_EMPTY_PATH | AT_EACCESS);
    step(s, 4, "faccessat2 (no reopen)");
    int lo = dir < at ? dir : at, hi = dir > at ? dir : at;
    if (hi - lo != 1 || close_range((unsigned)lo, (unsigned)hi, 0) < 0) {
        close(at);
        close(dir);
    }
    step(s, 5, "close_range (2 fds)");
    done(s);
}

static void
root_ways(struct steps *s, const char *root, int piddir)
{
    struct statx sx;
    mark = now_ns();
    int dir = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    step(s, 0, "open /proc/PID/root");
    close(dir);
    step(s, 1, "  its close");
    dir = openat(piddir, "root", O_PATH | O_DIRECTORY | O_CLOEXEC);
    step(s, 2, "openat(/proc/PID fd, root)");
    close(dir);
    step(s, 3, "  its close");
    statx(piddir, "root", 0, STATX_INO | STATX_MNT_ID_UNIQUE, &sx);
    step(s, 4, "statx(/proc/PID fd, root)");
    done(s);
}

static int
by_value(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Per step: the median call and the mean (a call the scheduler cut into
 * counts whole in the mean, hardly in the median). */
static void
report(const char *title, struct steps *s)
{
    double median_total = 0, mean_total = 0;
    printf("%s (%zu files): median, mean us\n", title, s->files);
    for (int i = 0; i < s->n && s->files; i++) {
        double sum = 0;
        for (size_t k = 0; k < s->files; k++)
            sum += s->ns[i][k];
        qsort(s->ns[i], s->files, sizeof(uint32_t), by_value);
        double median = s->ns[i][s->files / 2] / 1000.0, mean = sum / 1000.0 / (double)s->files;
        median_total += median;
        mean_total += mean;
        printf("  %-28s %6.2f %6.2f\n", s->name[i], median, mean);
    }
    printf("  %-28s %6.2f %6.2f\n", "sum", median_total, mean_total);
}

int
main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: source_step PATHS_FILE ROUNDS [THRASH_KIB]\n");
        return 2;
    }
    int rounds = atoi(argv[2]);
    thrash_len = argc > 3 ? (size_t)atol(argv[3]) * 1024 : 0;
    if (thrash_len && (thrash_buf = calloc(1, thrash_len)) == NULL)
        return 1;
    static char *paths[MAX_PATHS];
    int n = 0;
    char line[4096];
    FILE *f = fopen(argv[1], "re");
    if (f == NULL) {
        perror(argv[1]);
        return 1;
    }
    while (n < MAX_PATHS && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '/')
            paths[n++] = strdup(line);
    }
    fclose(f);
    pid_t child = fork();
    if (child == 0) {
        pause();
        _exit(0);
    }
    char root[64], pid_dir[64];
    snprintf(root, sizeof root, "/proc/%d/root", child);
    snprintf(pid_dir, sizeof pid_dir, "/proc/%d", child);
    int piddir = open(pid_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    self_fd_dir = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    struct steps b = {0}, a = {0}, o = {0}, r = {0};
    /* Interleaved, file by file, so that both see the same caches; which
     * goes first alternates (the second walk of a path finds more of it in
     * the caches). */
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < n; i++) {
            thrash();
            if ((i + round) % 2)
                before(&b, root, paths[i]);
            thrash();
            if ((i + round) % 2) {
                after(&a, piddir, paths[i]);
                thrash();
                opath(&o, piddir, paths[i]);
            } else {
                opath(&o, piddir, paths[i]);
                thrash();
                after(&a, piddir, paths[i]);
            }
            thrash();
            if ((i + round) % 2 == 0)
                before(&b, root, paths[i]);
            thrash();
            root_ways(&r, root, piddir);
        }
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    printf("%d paths, %d rounds, %zu KiB written between files\n", n, rounds, thrash_len / 1024);
    report("before", &b);
    report("after", &a);
    report("opath", &o);
    report("root", &r);
    return 0;
}
