/*
 * The test driver of client/c (tests/test_c_client.py compiles it with
 * client/c/shadowd.c): reads one command per line on stdin, runs it through
 * the C client's API, and answers with one JSON object per line on stdout.
 * Every fd a command gets is described (seals, mode, access mode, whether
 * O_NONBLOCK is set, whether it is a memfd, its size, an FNV-1a hash of its
 * bytes) and closed, unless the command keeps it.
 *
 * Must never: keep an fd the command did not say it keeps (the tests count
 * this process's fds); print anything on stdout but the answers.
 */
#define _GNU_SOURCE
#include "shadowd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sched.h>
#include <signal.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <grp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
#endif

static struct shadowd c; /* zero-filled: the client sets it up on first use */
static char out[1 << 16];
static size_t used;

static void
emit(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
emit(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + used, sizeof out - used, fmt, ap);
    va_end(ap);
    if (n > 0)
        used += (size_t)n < sizeof out - used ? (size_t)n : sizeof out - used - 1;
}

static void
emit_str(const char *key, const char *s)
{
    emit("\"%s\": \"", key);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            emit("\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            emit("\\u%04x", ch);
        else
            emit("%c", ch);
    }
    emit("\", ");
}

static void
done(void)
{
    /* Drop the trailing ", " of the last field. */
    if (used >= 2 && out[used - 2] == ',')
        used -= 2;
    printf("{%.*s}\n", (int)used, out);
    fflush(stdout);
    used = 0;
}

static double
now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int
count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1; /* opendir's own */
}

/* Describe *fd* and, unless *keep*, close it. */
static void
describe(const char *prefix, int fd, int keep)
{
    struct stat st;
    char link[64], target[256];
    emit("\"%sfd\": %d, ", prefix, fd);
    if (fd < 0)
        return;
    fstat(fd, &st);
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    uint64_t hash = 14695981039346656037ULL;
    char buf[65536];
    off_t off = 0;
    ssize_t got;
    while ((got = pread(fd, buf, sizeof buf, off)) > 0) {
        for (ssize_t i = 0; i < got; i++)
            hash = (hash ^ (unsigned char)buf[i]) * 1099511628211ULL;
        off += got;
    }
    int fl = fcntl(fd, F_GETFL);
    emit("\"%sseals\": %d, \"%smode\": %d, \"%saccmode\": %d, \"%snonblock\": %s, "
         "\"%smemfd\": %s, \"%sfsize\": %lld, \"%shash\": \"%016llx\", \"%soffset\": %lld, ",
         prefix, fcntl(fd, F_GET_SEALS), prefix, (int)(st.st_mode & 07777), prefix,
         fl & O_ACCMODE, prefix, fl & O_NONBLOCK ? "true" : "false", prefix,
         strncmp(target, "/memfd:", 7) == 0 ? "true" : "false",
         prefix, (long long)st.st_size, prefix, (unsigned long long)hash, prefix,
         (long long)lseek(fd, 0, SEEK_CUR));
    if (!keep)
        close(fd);
}

static const char *
route_name(int route)
{
    switch (route) {
    case SHADOWD_ROUTE_DAEMON: return "daemon";
    case SHADOWD_ROUTE_HELD: return "held";
    case SHADOWD_ROUTE_COPY: return "copy";
    case SHADOWD_ROUTE_INDEX: return "index";
    default: return "none";
    }
}

static const char *
why_name(int why)
{
    switch (why) {
    case SHADOWD_COPIED_RULE: return "rule";
    case SHADOWD_COPIED_MISS: return "miss";
    case SHADOWD_COPIED_BREAKER: return "breaker";
    case SHADOWD_COPIED_FAILED: return "failed";
    case SHADOWD_COPIED_FIRST: return "first";
    case SHADOWD_COPIED_COLD: return "cold";
    default: return "";
    }
}

/* What a reply said in version 2 (the same fields in struct shadowd, items, results). */
static void
served(int copied_why, int miss, int filling, int cached, int has_version,
       const struct shadowd_version *v)
{
    emit("\"copied_why\": \"%s\", \"v2_miss\": %s, \"filling\": %s, \"cached\": %s, ",
         why_name(copied_why), miss ? "true" : "false", filling ? "true" : "false",
         cached ? "true" : "false");
    if (has_version)
        emit("\"version\": [%llu, %lld, %lld], ", (unsigned long long)v->size,
             (long long)v->mtime_ns, (long long)v->ctime_ns);
    else
        emit("\"version\": null, ");
}

static void
status(double started)
{
    emit("\"us\": %.1f, \"hit\": %s, \"size\": %llu, \"route\": \"%s\", \"errnum\": %d, ",
         now_us() - started, c.hit ? "true" : "false", (unsigned long long)c.size,
         route_name(c.route), c.errnum);
    served(c.copied_why, c.miss, c.filling, c.cached, c.has_version, &c.version);
    emit_str("code", c.code);
    emit_str("error", c.error);
}

static void
item(const struct shadowd_item *it)
{
    emit("{");
    describe("", it->fd, 0);
    emit("\"hit\": %s, \"route\": \"%s\", \"errnum\": %d, ", it->hit ? "true" : "false",
         route_name(it->route), it->errnum);
    served(it->copied_why, it->miss, it->filling, it->cached, it->has_version, &it->version);
    emit_str("code", it->code);
    if (used >= 2 && out[used - 2] == ',')
        used -= 2;
    emit("}, ");
}

struct fill_arg {
    const char *data;
    int ran;
};

static int
fill(void *arg, int memfd)
{
    struct fill_arg *a = arg;
    a->ran++;
    size_t n = strlen(a->data);
    return write(memfd, a->data, n) == (ssize_t)n ? 0 : -1;
}

static void
logged(void *arg, const char *line)
{
    (void)arg;
    fprintf(stderr, "LOG %s\n", line);
}

static int
open_src(const char *path)
{
    return open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
}

/* What the churn test's files hold: the 16 bytes (size, mtime_ns), little-endian,
 * over and over (tests/test_c_client.py writes them so): the version decides
 * every byte, so bytes of another version, or torn between two, show. */
static int
holds_version(int fd, const struct stat *st)
{
    unsigned char want[16], buf[65536];
    uint64_t size = (uint64_t)st->st_size;
    int64_t mtime = (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    for (int i = 0; i < 8; i++) {
        want[i] = (unsigned char)(size >> (8 * i));
        want[8 + i] = (unsigned char)((uint64_t)mtime >> (8 * i));
    }
    struct stat got;
    if (fstat(fd, &got) < 0 || got.st_size != st->st_size)
        return 0;
    off_t off = 0;
    ssize_t n;
    while ((n = pread(fd, buf, sizeof buf, off)) > 0) {
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] != want[(off + i) % 16])
                return 0;
        off += n;
    }
    return n == 0 && (uint64_t)off == size;
}

/* The daemon's descriptor of its index, as /proc/PID/fd shows it; -1. */
static int
daemon_index_fd(int pid)
{
    char dir[64], link[320], target[256];
    snprintf(dir, sizeof dir, "/proc/%d/fd", pid);
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && (e = readdir(d)) != NULL) {
        snprintf(link, sizeof link, "%s/%s", dir, e->d_name);
        ssize_t n = readlink(link, target, sizeof target - 1);
        target[n > 0 ? n : 0] = '\0';
        if (strncmp(target, "/memfd:shadowd-index", 20) == 0)
            found = atoi(e->d_name);
    }
    if (d)
        closedir(d);
    return found;
}

static void
result(const struct shadowd_result *r)
{
    emit("{\"id\": %lld, \"tag\": %ld, ", r->id, (long)(intptr_t)r->tag);
    describe("", r->fd, 0);
    emit("\"hit\": %s, \"route\": \"%s\", ", r->hit ? "true" : "false", route_name(r->route));
    served(r->copied_why, r->miss, r->filling, r->cached, r->has_version, &r->version);
    emit_str("code", r->code);
    emit_str("error", r->error);
    if (used >= 2 && out[used - 2] == ',')
        used -= 2;
    emit("}, ");
}

int
main(void)
{
    char line[8192];
    char *argv[300];
    while (fgets(line, sizeof line, stdin) != NULL) {
        int argc = 0;
        for (char *tok = strtok(line, " \n"); tok && argc < 300; tok = strtok(NULL, " \n"))
            argv[argc++] = tok;
        if (argc == 0)
            continue;
        const char *cmd = argv[0];
        double t = now_us();
        if (strcmp(cmd, "socket") == 0) {
            emit("\"rc\": %d, ", shadowd_set_socket(&c, argc > 1 ? argv[1] : NULL));
        } else if (strcmp(cmd, "connect") == 0) {
            emit("\"rc\": %d, ", shadowd_connect(&c, argc > 1 ? argv[1] : NULL));
            status(t);
            emit_str("socket_path", c.socket_path);
        } else if (strcmp(cmd, "connect_start") == 0 || strcmp(cmd, "connect_wait") == 0) {
            int rc = cmd[8] == 's' ? shadowd_connect_start(&c, argc > 1 ? argv[1] : NULL)
                                   : shadowd_connect_wait(&c);
            emit("\"rc\": %d, \"protocol\": %d, ", rc, c.protocol);
            status(t);
        } else if (strcmp(cmd, "timeouts") == 0) {
            shadowd_set_timeouts(&c, atoi(argv[1]), atoi(argv[2]), atoi(argv[3]));
        } else if (strcmp(cmd, "backoff") == 0) {
            shadowd_set_backoff(&c, atoi(argv[1]), atoi(argv[2]));
        } else if (strcmp(cmd, "slow") == 0) {
            shadowd_set_slow(&c, atoi(argv[1]), atoi(argv[2]));
        } else if (strcmp(cmd, "routing") == 0) {
            shadowd_set_routing(&c, atoll(argv[1]), atoi(argv[2]));
        } else if (strcmp(cmd, "cold") == 0) {
            shadowd_set_cold(&c, atoi(argv[1]), atoi(argv[2]));
        } else if (strcmp(cmd, "race") == 0) {
            shadowd_set_race(&c, atoi(argv[1]));
        } else if (strcmp(cmd, "index") == 0) {
            /* index USE KEEP */
            shadowd_set_index(&c, atoi(argv[1]), atoi(argv[2]));
        } else if (strcmp(cmd, "indexready") == 0) {
            /* and how many numbers of the daemon's range it opens at once, and the
             * daemon's pid the index came from */
            emit("\"ready\": %d, ", shadowd_index_ready(&c));
            emit("\"direct\": %u, ", (unsigned)c.priv_.index_range_count);
            emit("\"pid\": %d, ", c.priv_.index_map ? c.priv_.index_pid : 0); /* whose index */
            status(t);
        } else if (strcmp(cmd, "indexopen") == 0) {
            /* indexopen PATH [N]: the plain index hit, N times (the last one described) */
            int n = argc > 2 ? atoi(argv[2]) : 1, fd = -1, served = 0;
            for (int i = 0; i < n; i++) {
                if (fd >= 0)
                    close(fd);
                int src = open_src(argv[1]);
                fd = shadowd_index_open(&c, src, NULL);
                served += fd >= 0;
                close(src);
            }
            emit("\"served\": %d, ", served);
            status(t);
            describe("", fd, 0);
        } else if (strcmp(cmd, "indexround") == 0) {
            /* indexround N DIR K: N plain index hits of the files DIR/0 to
             * DIR/K-1 in turn */
            long n = atol(argv[1]), k = atol(argv[3]), served = 0;
            for (long i = 0; i < n; i++) {
                char path[4200];
                snprintf(path, sizeof path, "%s/%ld", argv[2], i % k);
                int src = open_src(path);
                int fd = shadowd_index_open(&c, src, NULL);
                served += fd >= 0;
                if (fd >= 0)
                    close(fd);
                close(src);
            }
            emit("\"served\": %ld, ", served);
            status(t);
        } else if (strcmp(cmd, "report") == 0) {
            shadowd_index_report(&c);
        } else if (strcmp(cmd, "indextamper") == 0) {
            /* What a client of the daemon's uid can try on the index: make its
             * own read-only mapping writable; open the daemon's index fd for
             * writing (root may) and write, grow, shrink, map it writable. */
            const struct shadowd_private_ *p = &c.priv_;
            int rc = p->index_map ? mprotect((void *)(uintptr_t)p->index_map, p->index_len,
                                              PROT_READ | PROT_WRITE)
                                  : -2;
            emit("\"mprotect\": %d, \"mprotect_errno\": %d, ", rc, rc == -1 ? errno : 0);
            int ifd = p->index_map ? daemon_index_fd(p->index_pid) : -1;
            char link[64];
            snprintf(link, sizeof link, "/proc/%d/fd/%d", p->index_pid, ifd);
            int rw = ifd >= 0 ? open(link, O_RDWR | O_CLOEXEC) : -1;
            emit("\"opened_rw\": %s, ", rw >= 0 ? "true" : "false");
            if (rw >= 0) {
                struct stat st;
                fstat(rw, &st);
                ssize_t w = pwrite(rw, "x", 1, 4096);
                emit("\"write\": %zd, \"write_errno\": %d, ", w, w < 0 ? errno : 0);
                int g = ftruncate(rw, st.st_size + (1 << 20));
                emit("\"grow\": %d, \"grow_errno\": %d, ", g, g < 0 ? errno : 0);
                int k = ftruncate(rw, 4096);
                emit("\"shrink\": %d, \"shrink_errno\": %d, ", k, k < 0 ? errno : 0);
                void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0);
                emit("\"mmap_rw\": %s, \"mmap_errno\": %d, ", m == MAP_FAILED ? "false" : "true",
                     m == MAP_FAILED ? errno : 0);
                if (m != MAP_FAILED)
                    munmap(m, 4096);
                struct stat after;
                fstat(rw, &after);
                emit("\"size_before\": %lld, \"size_after\": %lld, ", (long long)st.st_size,
                     (long long)after.st_size);
                close(rw);
            }
        } else if (strcmp(cmd, "churn") == 0) {
            /* churn N EVERY HOT COLD ASKS DONES PATH...: routed opens of the PATHs
             * until N came from the index, every fd checked to hold the version
             * the caller's fstat saw, sealed and read-only. The opens are of one
             * of the first HOT PATHs, but for one of a later one after every
             * COLD index hits (tests/churn.py's pick). After every EVERY index
             * hits one byte to the FIFO ASKS (the rewriter replaces a file for
             * it), once the byte on the FIFO DONES says the change asked before
             * is in place: the changes keep pace with the hits, on any host. */
            long want = atol(argv[1]), every = atol(argv[2]);
            unsigned hot = (unsigned)atoi(argv[3]), others = (unsigned)(argc - 7) - hot;
            long cold = atol(argv[4]), colds = 0;
            int asks = open(argv[5], O_WRONLY | O_CLOEXEC); /* the rewriter's order */
            int dones = asks < 0 ? -1 : open(argv[6], O_RDONLY | O_CLOEXEC);
            unsigned seed = 12345u;
            long served = 0, wrong = 0, unsealed = 0, failed = 0, asked = 0, routes[5] = {0};
            char byte = '.';
            uint64_t base = c.counts.index;
            /* A rewriter gone (or a FIFO not opened) ends the run: asked says so. */
            int pacing = dones >= 0;
            while ((long)(c.counts.index - base) < want && pacing) {
                seed = seed * 1103515245u + 12345u;
                unsigned r = seed >> 12; /* bits apart from the call's, below */
                int k = (int)(r % hot);
                if ((long)(c.counts.index - base) >= cold * (colds + 1)) {
                    k = (int)(hot + r % others);
                    colds++;
                }
                const char *path = argv[7 + k];
                int src = open_src(path);
                if (src < 0) {
                    failed++;
                    continue;
                }
                struct stat st;
                fstat(src, &st);
                /* Both calls, half each: the one taking our fstat serves the
                 * same version (the wrong count below holds it to that). */
                int fd = (seed & 0x100) ? shadowd_open_routed_stat(&c, src, &st, path)
                                        : shadowd_open_routed_fd(&c, src, path);
                close(src);
                if (fd < 0) {
                    failed++;
                    continue;
                }
                served++;
                routes[c.route >= 0 && c.route < 5 ? c.route : 0]++;
                wrong += !holds_version(fd, &st);
                unsealed += (fcntl(fd, F_GET_SEALS) & 15) != 15 ||
                            (fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY;
                close(fd);
                if ((long)(c.counts.index - base) >= every * (asked + 1)) {
                    pacing = (asked == 0 || read(dones, &byte, 1) == 1) &&
                             write(asks, &byte, 1) == 1;
                    asked += pacing;
                }
            }
            if (asked > 0 && pacing && read(dones, &byte, 1) != 1)
                asked = -asked; /* the last change was asked for, never done */
            if (dones >= 0)
                close(dones);
            if (asks >= 0)
                close(asks);
            emit("\"served\": %ld, \"wrong\": %ld, \"unsealed\": %ld, \"failed\": %ld, "
                 "\"asked\": %ld, \"index\": %llu, \"refused\": %llu, \"routes\": {\"daemon\": %ld, "
                 "\"held\": %ld, \"copy\": %ld, \"index\": %ld}, ",
                 served, wrong, unsealed, failed, asked, (unsigned long long)(c.counts.index - base),
                 (unsigned long long)c.counts.index_refused, routes[SHADOWD_ROUTE_DAEMON],
                 routes[SHADOWD_ROUTE_HELD], routes[SHADOWD_ROUTE_COPY], routes[SHADOWD_ROUTE_INDEX]);
        } else if (strcmp(cmd, "held") == 0) {
            shadowd_set_held(&c, atoi(argv[1]), atoll(argv[2]));
        } else if (strcmp(cmd, "heldrecheck") == 0) {
            shadowd_set_held_recheck(&c, atoi(argv[1]));
        } else if (strcmp(cmd, "log") == 0) {
            /* "log quiet": nowhere; "log capture": LOG lines; "log": stderr again is not possible */
            if (argc > 1 && strcmp(argv[1], "quiet") == 0)
                shadowd_set_log(&c, NULL, NULL);
            else
                shadowd_set_log(&c, logged, NULL);
        } else if (strcmp(cmd, "open") == 0 || strcmp(cmd, "routed") == 0) {
            int fd = cmd[0] == 'o' ? shadowd_open(&c, argv[1]) : shadowd_open_routed(&c, argv[1]);
            status(t);
            describe("", fd, 0);
        } else if (strcmp(cmd, "routedstat") == 0) {
            /* routedstat PATH [NS]: shadowd_open_routed_stat with our fstat of
             * PATH, its mtime moved by NS nanoseconds (a version we claim) */
            int src = open_src(argv[1]);
            struct stat st;
            fstat(src, &st);
            long long ns = (long long)st.st_mtim.tv_nsec + (argc > 2 ? atoll(argv[2]) : 0);
            st.st_mtim.tv_sec += ns / 1000000000LL;
            st.st_mtim.tv_nsec = ns % 1000000000LL;
            int fd = shadowd_open_routed_stat(&c, src, &st, argv[1]);
            status(t);
            close(src);
            describe("", fd, 0);
        } else if (strcmp(cmd, "routedopath") == 0) {
            /* routedopath PATH [stat]: shadowd_open_routed_opath with an O_PATH
             * fd of PATH (and, with "stat", our fstat of it) */
            int at = open(argv[1], O_PATH | O_CLOEXEC);
            struct stat st;
            int given = argc > 2 && strcmp(argv[2], "stat") == 0 && at >= 0 && fstat(at, &st) == 0;
            int fd = shadowd_open_routed_opath(&c, at, given ? &st : NULL, argv[1]);
            status(t);
            if (at >= 0)
                close(at);
            describe("", fd, 0);
        } else if (strcmp(cmd, "setfsuid") == 0) {
            /* setfsuid UID: file access as UID (and its gid), the rest as before */
            setfsgid((gid_t)atoi(argv[1]));
            setfsuid((uid_t)atoi(argv[1]));
            emit("\"fsuid\": %d, ", (int)setfsuid((uid_t)-1));
        } else if (strcmp(cmd, "dropuid") == 0) {
            /* dropuid UID: become UID (gid UID, no other groups) for good */
            gid_t gid = (gid_t)atoi(argv[1]);
            int rc = setgroups(0, NULL) | setresgid(gid, gid, gid) |
                     setresuid((uid_t)atoi(argv[1]), (uid_t)atoi(argv[1]), (uid_t)atoi(argv[1]));
            emit("\"rc\": %d, \"euid\": %d, ", rc, (int)geteuid());
        } else if (strcmp(cmd, "openfd") == 0 || strcmp(cmd, "requestfd") == 0) {
            int src = open_src(argv[1]);
            int fd = cmd[0] == 'o' ? shadowd_open_fd(&c, src, argc > 2 ? argv[2] : NULL)
                                   : shadowd_request_fd(&c, src, argc > 2 ? argv[2] : NULL);
            status(t);
            close(src);
            describe("", fd, 0);
        } else if (strcmp(cmd, "openat") == 0) {
            /* openat DIR PATH [nofollow|write] */
            int dirfd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            int flags = O_RDONLY;
            if (argc > 3 && strcmp(argv[3], "nofollow") == 0)
                flags |= O_NOFOLLOW;
            if (argc > 3 && strcmp(argv[3], "write") == 0)
                flags = O_RDWR;
            int fd = shadowd_openat(&c, dirfd, argv[2], flags);
            status(t);
            close(dirfd);
            describe("", fd, 0);
        } else if (strcmp(cmd, "copy") == 0) {
            int src = open_src(argv[1]);
            int fd = shadowd_copy_fd(argc > 2 ? NULL : &c, src);
            int err = errno;
            status(t);
            emit("\"errno\": %d, ", fd < 0 ? err : 0);
            /* Two copies of one file: each its own offset. */
            int other = fd >= 0 ? shadowd_copy_fd(&c, src) : -1;
            char b[3];
            if (other >= 0 && read(fd, b, sizeof b) >= 0)
                emit("\"other_offset\": %lld, ", (long long)lseek(other, 0, SEEK_CUR));
            if (other >= 0)
                close(other);
            /* A write must fail even through a read-write reopen (root may reopen it so). */
            if (fd >= 0) {
                char link[64];
                snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
                int rw = open(link, O_RDWR | O_CLOEXEC);
                emit("\"rw_write\": %d, ", rw >= 0 ? (int)write(rw, "x", 1) : -2);
                if (rw >= 0)
                    close(rw);
            }
            close(src);
            describe("", fd, 0);
        } else if (strcmp(cmd, "exec") == 0) {
            /* exec PATH: run a local copy of PATH (fexecve) and wait for it */
            int src = open_src(argv[1]);
            int fd = shadowd_copy_fd(&c, src);
            close(src);
            int pipefd[2];
            if (pipe2(pipefd, O_CLOEXEC) < 0)
                return 1;
            pid_t pid = fork();
            if (pid == 0) {
                char *args[] = {argv[1], NULL};
                char *env[] = {NULL};
                fexecve(fd, args, env);
                int err = errno;
                ssize_t w = write(pipefd[1], &err, sizeof err);
                (void)w;
                _exit(127);
            }
            close(pipefd[1]);
            int err = 0, wstatus = 0;
            ssize_t got = read(pipefd[0], &err, sizeof err);
            close(pipefd[0]);
            waitpid(pid, &wstatus, 0);
            close(fd);
            emit("\"errno\": %d, \"status\": %d, ", got == sizeof err ? err : 0,
                 WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
        } else if (strcmp(cmd, "forkopen") == 0) {
            /* forkopen PATH fork|_fork: a child, made by fork() or by _Fork()
             * (no atfork handlers), opens PATH through the same struct; then
             * the parent opens it again. */
            int pipefd[2];
            if (pipe2(pipefd, O_CLOEXEC) < 0)
                return 1;
            pid_t pid = strcmp(argv[2], "_fork") == 0 ? _Fork() : fork();
            if (pid == 0) {
                close(pipefd[0]);
                int fd = shadowd_open(&c, argv[1]);
                unsigned long long got[3] = {fd >= 0, 14695981039346656037ULL, (unsigned)c.hit};
                char buf[65536];
                ssize_t n;
                off_t off = 0;
                while (fd >= 0 && (n = pread(fd, buf, sizeof buf, off)) > 0) {
                    for (ssize_t i = 0; i < n; i++)
                        got[1] = (got[1] ^ (unsigned char)buf[i]) * 1099511628211ULL;
                    off += n;
                }
                shadowd_close(&c);
                ssize_t w = write(pipefd[1], got, sizeof got);
                _exit(w == (ssize_t)sizeof got ? 0 : 1);
            }
            close(pipefd[1]);
            unsigned long long child[3] = {0, 0, 0};
            ssize_t r = pid > 0 ? read(pipefd[0], child, sizeof child) : -1;
            close(pipefd[0]);
            int wstatus = 0;
            if (pid > 0)
                waitpid(pid, &wstatus, 0);
            emit("\"child_ok\": %d, \"child_hash\": \"%016llx\", \"child_hit\": %d, "
                 "\"child_status\": %d, ",
                 r == (ssize_t)sizeof child && child[0] ? 1 : 0, child[1], (int)child[2],
                 WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
            int fd = shadowd_open(&c, argv[1]);
            status(t);
            describe("", fd, 0);
        } else if (strcmp(cmd, "forkidle") == 0) {
            /* forkidle: a child's first call is shadowd_idle; it exits then. */
            pid_t pid = fork();
            if (pid == 0) {
                shadowd_idle(&c);
                _exit(0);
            }
            int wstatus = 0;
            if (pid > 0)
                waitpid(pid, &wstatus, 0);
            emit("\"child_status\": %d, ", WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
        } else if (strcmp(cmd, "forkindex") == 0) {
            /* forkindex USE KEEP: a child's first call is shadowd_set_index(USE,
             * KEEP); it exits then. */
            pid_t pid = fork();
            if (pid == 0) {
                shadowd_set_index(&c, atoi(argv[1]), atoi(argv[2]));
                _exit(0);
            }
            int wstatus = 0;
            if (pid > 0)
                waitpid(pid, &wstatus, 0);
            emit("\"child_status\": %d, ", WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
        } else if (strcmp(cmd, "nsfork") == 0) {
            /* nsfork copy|ask PATH DECOY: a child made by clone(CLONE_NEWPID),
             * so pid 1 in a pid namespace of its own (the pid this driver has
             * when it is the init of its namespace), serves PATH through the
             * same struct: "copy" with shadowd_copy_fd, after the parent
             * opened DECOY at the numbers the child's descriptors get next;
             * "ask" with shadowd_request_fd, after the parent submitted an
             * open of DECOY on its connection. */
            int ask = strcmp(argv[1], "ask") == 0;
            const char *path = argv[2], *decoy = argv[3];
            int go[2], res[2];
            if (pipe2(go, O_CLOEXEC) < 0 || pipe2(res, O_CLOEXEC) < 0)
                return 1;
            pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWPID | SIGCHLD, 0, 0, 0, 0);
            if (pid == 0) {
                char b;
                unsigned long long got[3] = {0, 14695981039346656037ULL, 0};
                if (read(go[0], &b, 1) == 1) {
                    int src = open(path, O_RDONLY | O_CLOEXEC);
                    int fd = ask ? shadowd_request_fd(&c, src, NULL) : shadowd_copy_fd(&c, src);
                    char buf[65536];
                    ssize_t n;
                    off_t off = 0;
                    got[0] = fd >= 0;
                    got[2] = (unsigned long long)getpid();
                    while (fd >= 0 && (n = pread(fd, buf, sizeof buf, off)) > 0) {
                        for (ssize_t i = 0; i < n; i++)
                            got[1] = (got[1] ^ (unsigned char)buf[i]) * 1099511628211ULL;
                        off += n;
                    }
                }
                ssize_t w = write(res[1], got, sizeof got);
                _exit(w == (ssize_t)sizeof got ? 0 : 1);
            }
            int decoys[8];
            long long asked = -1;
            for (int i = 0; i < 8; i++)
                decoys[i] = pid > 0 && (!ask || i == 0) ? open(decoy, O_RDONLY | O_CLOEXEC) : -1;
            if (ask && decoys[0] >= 0)
                asked = shadowd_submit_open(&c, decoys[0], NULL, NULL);
            unsigned long long child[3] = {0, 0, 0};
            ssize_t r = -1;
            if (pid > 0 && write(go[1], "x", 1) == 1)
                r = read(res[0], child, sizeof child);
            int wstatus = 0;
            if (pid > 0)
                waitpid(pid, &wstatus, 0);
            if (asked > 0)
                shadowd_cancel(&c, asked);
            for (int i = 0; i < 8; i++)
                if (decoys[i] >= 0)
                    close(decoys[i]);
            close(go[0]);
            close(go[1]);
            close(res[0]);
            close(res[1]);
            emit("\"pid\": %d, \"asked\": %lld, \"child_ok\": %d, \"child_hash\": \"%016llx\", "
                 "\"child_pid\": %llu, \"child_status\": %d, ",
                 (int)getpid(), asked, r == (ssize_t)sizeof child && child[0] ? 1 : 0, child[1],
                 child[2], WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
        } else if (strcmp(cmd, "twice") == 0) {
            /* Two routed opens of one file; read from the first, the second's offset. */
            int a = shadowd_open_routed(&c, argv[1]);
            int ra = c.route;
            int b = shadowd_open_routed(&c, argv[1]);
            char buf[3];
            ssize_t n = read(a, buf, sizeof buf);
            emit("\"read\": %zd, \"routes\": [\"%s\", \"%s\"], ", n, route_name(ra), route_name(c.route));
            describe("a_", a, 0);
            describe("b_", b, 0);
        } else if (strcmp(cmd, "batch") == 0 || strcmp(cmd, "rbatch") == 0) {
            int n = argc - 1, srcs[300];
            static struct shadowd_item items[300];
            for (int i = 0; i < n; i++)
                srcs[i] = open_src(argv[1 + i]);
            int served = cmd[0] == 'b'
                             ? shadowd_open_batch(&c, srcs, (const char *const *)argv + 1, n, items)
                             : shadowd_open_batch_routed(&c, srcs, (const char *const *)argv + 1, n,
                                                         items);
            for (int i = 0; i < n; i++)
                if (srcs[i] >= 0)
                    close(srcs[i]);
            emit("\"served\": %d, ", served);
            status(t);
            emit("\"items\": [");
            for (int i = 0; i < n; i++)
                item(&items[i]);
            if (used >= 2 && out[used - 2] == ',')
                used -= 2;
            emit("], ");
        } else if (strcmp(cmd, "private") == 0 || strcmp(cmd, "lookup") == 0) {
            /* private NS INO SIZE MTIME CTIME|none EXEC DATA ; lookup NS INO SIZE MTIME CTIME|none */
            struct shadowd_key key = {
                .ino = strtoull(argv[2], NULL, 10),
                .size = strtoull(argv[3], NULL, 10),
                .mtime_ns = strtoll(argv[4], NULL, 10),
                .ctime_ns = strcmp(argv[5], "none") ? strtoll(argv[5], NULL, 10) : 0,
                .has_ctime = strcmp(argv[5], "none") != 0,
            };
            int fd;
            if (cmd[0] == 'p') {
                struct fill_arg a = {.data = argv[7], .ran = 0};
                fd = shadowd_open_private(&c, argv[1], &key, atoi(argv[6]), fill, &a);
                emit("\"filled\": %d, ", a.ran);
            } else {
                fd = shadowd_lookup(&c, argv[1], &key);
                emit("\"miss\": %s, ", fd == SHADOWD_MISS ? "true" : "false");
                if (fd == SHADOWD_MISS)
                    fd = -1;
            }
            status(t);
            describe("", fd, 0);
        } else if (strcmp(cmd, "submit") == 0 || strcmp(cmd, "rsubmit") == 0) {
            /* submit PATH TAG */
            int src = open_src(argv[1]), now = -1;
            long long id = cmd[0] == 's'
                               ? shadowd_submit_open(&c, src, argv[1], (void *)(intptr_t)atol(argv[2]))
                               : shadowd_submit_routed(&c, src, argv[1],
                                                       (void *)(intptr_t)atol(argv[2]), &now);
            close(src); /* the request holds its own reference */
            emit("\"id\": %lld, \"pollfd\": %d, \"poll_timeout\": %d, ", id, shadowd_fd(&c),
                 shadowd_poll_timeout(&c));
            status(t);
            describe("now_", now, 0);
        } else if (strcmp(cmd, "collect") == 0) {
            /* collect N TIMEOUT_MS: poll and collect until N results or the time is up */
            int want = atoi(argv[1]), got = 0;
            double until = t + 1000.0 * atoi(argv[2]);
            struct shadowd_result r;
            emit("\"results\": [");
            while (got < want) {
                while (got < want && shadowd_collect(&c, &r) == 1) {
                    result(&r);
                    got++;
                }
                if (got >= want || now_us() >= until)
                    break;
                int ms = shadowd_poll_timeout(&c), left = (int)((until - now_us()) / 1000) + 1;
                struct pollfd p = {.fd = shadowd_fd(&c), .events = POLLIN};
                poll(&p, p.fd >= 0 ? 1 : 0, ms < 0 || ms > left ? left : ms);
            }
            if (used >= 2 && out[used - 2] == ',')
                used -= 2;
            emit("], \"pending\": %d, ", shadowd_pending(&c));
        } else if (strcmp(cmd, "preload") == 0 || strcmp(cmd, "preloadfds") == 0) {
            /* preload PATH...: shadowd_preload; preloadfds PATH...: the fds variant */
            int n = argc - 1, held;
            if (cmd[7] == '\0') {
                held = shadowd_preload(&c, (const char *const *)argv + 1, n);
            } else {
                int srcs[300];
                for (int i = 0; i < n; i++)
                    srcs[i] = open_src(argv[1 + i]);
                held = shadowd_preload_fds(&c, srcs, (const char *const *)argv + 1, n);
                for (int i = 0; i < n; i++)
                    if (srcs[i] >= 0)
                        close(srcs[i]);
            }
            emit("\"held\": %d, ", held);
            status(t);
        } else if (strcmp(cmd, "cancel") == 0) {
            emit("\"rc\": %d, ", shadowd_cancel(&c, atoll(argv[1])));
        } else if (strcmp(cmd, "pending") == 0) {
            emit("\"pending\": %d, \"poll_timeout\": %d, ", shadowd_pending(&c),
                 shadowd_poll_timeout(&c));
        } else if (strcmp(cmd, "fds") == 0) {
            emit("\"fds\": %d, ", count_fds());
            if (argc > 1) { /* fds list: what each is */
                DIR *d = opendir("/proc/self/fd");
                struct dirent *e;
                char link[300], target[256];
                emit("\"targets\": [");
                while ((e = readdir(d)) != NULL) {
                    if (e->d_name[0] == '.')
                        continue;
                    snprintf(link, sizeof link, "/proc/self/fd/%s", e->d_name);
                    ssize_t n = readlink(link, target, sizeof target - 1);
                    target[n > 0 ? n : 0] = '\0';
                    emit("\"%s=", e->d_name);
                    emit("%s\", ", target);
                }
                closedir(d);
                used -= 2;
                emit("], ");
            }
        } else if (strcmp(cmd, "idle") == 0) {
            /* what a supervisor does once it has answered the program; and
             * whether a batch was due */
            emit("\"due\": %d, ", c.priv_.hint_due);
            shadowd_idle(&c);
        } else if (strcmp(cmd, "close") == 0) {
            shadowd_close(&c);
            emit("\"fds\": %d, \"us\": %.1f, ", count_fds(), now_us() - t);
        } else if (strcmp(cmd, "counts") == 0) {
            emit("\"index\": %llu, \"index_refused\": %llu, \"reported\": %llu, "
                 "\"read_opens\": %llu, \"unopened\": %llu, \"other_version\": %llu, "
                 "\"slow\": %llu, ",
                 (unsigned long long)c.counts.index, (unsigned long long)c.counts.index_refused,
                 (unsigned long long)c.counts.reported, (unsigned long long)c.counts.read_opens,
                 (unsigned long long)c.counts.unopened, (unsigned long long)c.counts.other_version,
                 (unsigned long long)c.counts.slow);
            emit("\"daemon\": %llu, \"held\": %llu, \"copied\": %llu, \"fast\": %llu, "
                 "\"missed\": %llu, \"preloaded\": %llu, "
                 "\"available\": %d, \"max_batch\": %llu, \"max_file_size\": %llu, "
                 "\"protocol\": %d, \"racy_window_ns\": %llu, \"backoff_ms\": %d, ",
                 (unsigned long long)c.counts.daemon, (unsigned long long)c.counts.held,
                 (unsigned long long)c.counts.copied, (unsigned long long)c.counts.fast,
                 (unsigned long long)c.counts.missed, (unsigned long long)c.counts.preloaded,
                 shadowd_available(&c), (unsigned long long)c.max_batch,
                 (unsigned long long)c.max_file_size, c.protocol,
                 (unsigned long long)c.racy_window_ns, c.priv_.backoff_ms); /* (this window's) */
        } else if (strcmp(cmd, "scribble") == 0) {
            /* Memory of unknown contents: every byte of the struct 0xA5
             * (its held connection, if any, left open: a test's own), then
             * shadowd_init, which must make it as good as zero-filled. */
            memset(&c, 0xA5, sizeof c);
            shadowd_init(&c);
        } else if (strcmp(cmd, "zero") == 0) {
            /* A zero-filled struct: close it, twice, then (with a PATH) use it. */
            static struct shadowd z;
            memset(&z, 0, sizeof z);
            shadowd_close(&z);
            shadowd_close(&z);
            emit("\"stdin_open\": %s, ", fcntl(0, F_GETFD) >= 0 ? "true" : "false");
            if (argc > 1) {
                int fd = strcmp(argv[1], "routed") == 0 ? shadowd_open_routed(&z, argv[2])
                                                        : shadowd_open(&z, argv[1]);
                emit_str("code", z.code);
                emit_str("error", z.error);
                emit_str("socket_path", z.socket_path);
                describe("", fd, 0);
            }
            emit("\"pollfd\": %d, \"pending\": %d, ", shadowd_fd(&z), shadowd_pending(&z));
            shadowd_close(&z);
            shadowd_close(&z);
            emit("\"stdin_still_open\": %s, ", fcntl(0, F_GETFD) >= 0 ? "true" : "false");
        } else if (strcmp(cmd, "default") == 0) {
            char buf[108];
            const char *p = shadowd_default_socket(buf, sizeof buf);
            emit_str("path", p ? p : "");
        } else if (strcmp(cmd, "fdlimit") == 0) {
            /* fdlimit N: every number up to the highest in use taken (by
             * /dev/null), and RLIMIT_NOFILE set so that exactly N are left
             * (no command that counts fds works meanwhile); fdlimit off: the
             * limit as it was, those numbers closed again. */
            static struct rlimit was;
            static int holes[4096], nholes, limited;
            if (strcmp(argv[1], "off") == 0) {
                if (limited)
                    setrlimit(RLIMIT_NOFILE, &was);
                for (int i = 0; i < nholes; i++)
                    close(holes[i]);
                nholes = limited = 0;
            } else {
                int top = 0, n = -1;
                DIR *d = opendir("/proc/self/fd");
                struct dirent *e;
                while ((e = readdir(d)) != NULL)
                    if (e->d_name[0] != '.' && atoi(e->d_name) > top)
                        top = atoi(e->d_name);
                closedir(d);
                while (nholes < 4096 && (n = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0 &&
                       n < top)
                    holes[nholes++] = n;
                if (n > top)
                    close(n);
                else if (n == top)
                    holes[nholes++] = n; /* (top was opendir's own) */
                getrlimit(RLIMIT_NOFILE, &was);
                struct rlimit low = {.rlim_cur = (rlim_t)(top + 1 + atoi(argv[1])),
                                     .rlim_max = was.rlim_max};
                limited = setrlimit(RLIMIT_NOFILE, &low) == 0;
                emit("\"limited\": %d, \"top\": %d, ", limited, top);
            }
        } else if (strcmp(cmd, "sleep") == 0) {
            usleep((useconds_t)atoi(argv[1]) * 1000);
        } else {
            emit_str("unknown", cmd);
        }
        done();
    }
    shadowd_close(&c);
    return 0;
}
