/*
 * shadowd-open: the C client on the command line, the C side of
 * `shadowd bench`, and the tool that measures the routed open's crossover.
 * `shadowd-open --help` says how to use it.
 *
 * Exit status: 0; 1 when an open failed (the reason on stderr); 2 for a
 * usage error.
 *
 * Must never: exit 0 after a failed open; write anything to stdout but the
 * files' bytes (or the counts and tables its modes print).
 */
#define _GNU_SOURCE
#include "shadowd.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char USAGE[] =
    "usage: shadowd-open [OPTIONS] PATH...\n"
    "       shadowd-open [OPTIONS] -l SECONDS PATH\n"
    "       shadowd-open [OPTIONS] --crossover DIR\n"
    "       shadowd-open [OPTIONS] --latency [--rounds N] PATH...\n"
    "       shadowd-open [OPTIONS] --connects N [--pause MS]\n"
    "\n"
    "Write each PATH's bytes, read from the sealed fd shadowd served, to stdout,\n"
    "over one connection. A failed open is reported and the next one tried.\n"
    "\n"
    "  -s, --socket PATH      the daemon's socket (default: the socket rule:\n"
    "                         $SHADOWD_SOCKET, the user's, the host's)\n"
    "  -r, --routed           the routed open: the process-local tier, local copies\n"
    "                         of small, young and large files, the daemon, and a\n"
    "                         local copy whenever the daemon fails; never fails\n"
    "                         because of the daemon\n"
    "  -b, --batch            open all PATHs in one batch call (with -r: routed)\n"
    "  -n, --repeat N         open each PATH N times (shows the tier with -r)\n"
    "  -v, --verbose          \"SIZE hit|miss ROUTE\" to stderr for every open\n"
    "  -g, --gate             print \"ready\" before each open (with -l: once) and\n"
    "                         wait for a line on stdin\n"
    "  -l, --loop SECONDS     open and close PATH as often as possible for SECONDS\n"
    "                         and print how many times\n"
    "  -c, --copy             with -l: copy locally (shadowd_copy_fd), as\n"
    "                         supervisors do without shadowd\n"
    "  -i, --index            with -l: hits through the daemon's index\n"
    "                         (shadowd_index_open, no round trip)\n"
    "  -t, --timeout MS       connect+hello and reply timeout (default 250)\n"
    "      --reply-timeout MS the reply timeout alone\n"
    "      --per-mib MS       reply time allowed per MiB of the file (default 4)\n"
    "      --backoff MS[,MAX] the breaker's first window and cap (default 1000,30000;\n"
    "                         0: never fail fast)\n"
    "      --local-below N    with -r: copy files below N bytes locally\n"
    "      --young MS         with -r: copy files whose ctime is younger locally\n"
    "      --held N[,BYTES]   with -r: bounds of the process-local tier\n"
    "  -q, --quiet            no log lines when the daemon goes away or comes back\n"
    "      --crossover DIR    measure a hit through the daemon against a local copy\n"
    "                         per file size (files written in DIR) and print the\n"
    "                         size from which the daemon is faster\n"
    "      --latency          time single opens of each PATH five ways, interleaved\n"
    "                         in shuffled order, --rounds times (default 200): a local\n"
    "                         copy, a hit through the socket, a hit through the index,\n"
    "                         a reopen from the process-local tier, and the system\n"
    "                         calls an index hit cannot do without, made bare; each\n"
    "                         from the open of the source to the close of both fds.\n"
    "                         One JSON object per PATH: the medians (p50) and p99,\n"
    "                         in microseconds\n"
    "      --connects N       time N new connections one after another, each as a\n"
    "                         supervisor makes one (shadowd_connect_start, then\n"
    "                         shadowd_connect_wait and shadowd_index_ready, then\n"
    "                         shadowd_close); one JSON object: p50 and p99 in\n"
    "                         microseconds, and how many got the index\n"
    "      --pause MS         with --connects: wait MS between connections (a\n"
    "                         supervisor's connection comes alone; default 0)\n"
    "  -h, --help             this text\n"
    "\n"
    "Exit status: 0; 1 when an open failed; 2 for a usage error.\n";

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Print "ready", then wait for a line on stdin; 0 at its end. */
static int
wait_for_go(void)
{
    char line[16];
    printf("ready\n");
    fflush(stdout);
    return fgets(line, sizeof line, stdin) != NULL;
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

/* Copy the bytes of *fd* to stdout and close it; -1 on failure. */
static int
cat_fd(int fd)
{
    char buf[65536];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n) {
            n = -1;
            break;
        }
    }
    close(fd);
    return n < 0 ? -1 : 0;
}

static int
cat(struct shadowd *c, const char *path, int routed, int verbose)
{
    int fd = routed ? shadowd_open_routed(c, path) : shadowd_open(c, path);
    if (fd < 0) {
        /* Name the file: a refusal's words do not ("only regular files are
         * served; ..."), the client's own failure to open it does. */
        size_t n = strlen(path);
        if (strncmp(c->error, path, n) == 0 && c->error[n] == ':')
            fprintf(stderr, "shadowd-open: %s\n", c->error);
        else
            fprintf(stderr, "shadowd-open: %s: %s\n", path, c->error);
        return -1;
    }
    if (verbose)
        fprintf(stderr, "%llu %s%s%s\n", (unsigned long long)c->size, c->hit ? "hit" : "miss",
                routed ? " " : "", routed ? route_name(c->route) : "");
    return cat_fd(fd);
}

static int
cat_batch(struct shadowd *c, char **paths, int n, int routed, int verbose)
{
    int srcs[256];
    struct shadowd_item items[256];
    int status = 0;
    if (n > 256) {
        fprintf(stderr, "shadowd-open: at most 256 paths with --batch\n");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        srcs[i] = open(paths[i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (srcs[i] < 0)
            fprintf(stderr, "shadowd-open: %s: %s\n", paths[i], strerror(errno));
    }
    if (routed)
        shadowd_open_batch_routed(c, srcs, (const char *const *)paths, n, items);
    else
        shadowd_open_batch(c, srcs, (const char *const *)paths, n, items);
    for (int i = 0; i < n; i++) {
        if (srcs[i] >= 0)
            close(srcs[i]);
        if (items[i].fd < 0) {
            if (srcs[i] >= 0)
                fprintf(stderr, "shadowd-open: %s: not served (%s%s%s)\n", paths[i],
                        items[i].code[0] ? items[i].code : "",
                        items[i].code[0] && items[i].errnum ? ", " : "",
                        items[i].errnum ? strerror(items[i].errnum) : "");
            status = -1;
            continue;
        }
        if (verbose)
            fprintf(stderr, "%llu %s %s\n", (unsigned long long)items[i].size,
                    items[i].hit ? "hit" : "miss", route_name(items[i].route));
        if (cat_fd(items[i].fd) < 0)
            status = -1;
    }
    return status;
}

/* -- the crossover ------------------------------------------------------- */

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Time of one open+close of *src*, the mean over at least 3 and about 2 ms. */
static double
per_open(struct shadowd *c, int src, int through_daemon)
{
    int count = 0;
    double start = now(), t;
    do {
        int fd = through_daemon ? shadowd_request_fd(c, src, NULL) : shadowd_copy_fd(c, src);
        if (fd < 0) {
            fprintf(stderr, "shadowd-open: %s\n", c->error);
            exit(1);
        }
        close(fd);
        count++;
        t = now() - start;
    } while (count < 3 || t < 0.002);
    return t / count;
}

static int
crossover(struct shadowd *c, const char *dir, int rounds)
{
    enum { NSIZES = 15 };
    static const long sizes[NSIZES] = {1 << 10,   4 << 10,   16 << 10,  32 << 10,  64 << 10,
                                       96 << 10,  128 << 10, 160 << 10, 192 << 10, 256 << 10,
                                       384 << 10, 512 << 10, 1 << 20,   2 << 20,   4 << 20};
    static double daemon[NSIZES][101], copy[NSIZES][101];
    int srcs[NSIZES];
    char path[4096];
    char *data = malloc((size_t)sizes[NSIZES - 1]);
    if (data == NULL)
        return 1;
    if (rounds > 101)
        rounds = 101;
    unsigned seed = 12345;
    for (long i = 0; i < sizes[NSIZES - 1]; i++)
        data[i] = (char)((seed = seed * 1103515245u + 12345u) >> 16);
    for (int s = 0; s < NSIZES; s++) {
        snprintf(path, sizeof path, "%s/crossover-%ld", dir, sizes[s]);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, data, (size_t)sizes[s]) != sizes[s]) {
            fprintf(stderr, "shadowd-open: writing %s: %s\n", path, strerror(errno));
            return 1;
        }
        close(fd);
        srcs[s] = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    }
    free(data);
    /* The daemon caches a file once its ctime is older than its racy
     * window (1 s by default): wait, then warm every file into it. */
    for (int tries = 0;; tries++) {
        struct timespec pause = {1, 100000000L};
        nanosleep(&pause, NULL);
        int cold = 0;
        for (int s = 0; s < NSIZES; s++) {
            for (int k = 0; k < 2; k++) {
                int fd = shadowd_request_fd(c, srcs[s], NULL);
                if (fd < 0) {
                    fprintf(stderr, "shadowd-open: %s\n", c->error);
                    return 1;
                }
                close(fd);
            }
            cold += !c->hit;
        }
        if (!cold)
            break;
        if (tries == 5) {
            fprintf(stderr, "shadowd-open: the daemon does not cache the test files\n");
            return 1;
        }
    }
    for (int r = 0; r < rounds; r++) {
        for (int s = 0; s < NSIZES; s++) {
            /* Interleaved, each method first in every other round. */
            if (r % 2) {
                copy[s][r] = per_open(c, srcs[s], 0);
                daemon[s][r] = per_open(c, srcs[s], 1);
            } else {
                daemon[s][r] = per_open(c, srcs[s], 1);
                copy[s][r] = per_open(c, srcs[s], 0);
            }
        }
    }
    long cross = -1;
    printf("%10s %12s %12s %8s\n", "size", "daemon_us", "copy_us", "ratio");
    for (int s = 0; s < NSIZES; s++) {
        qsort(daemon[s], (size_t)rounds, sizeof(double), cmp_double);
        qsort(copy[s], (size_t)rounds, sizeof(double), cmp_double);
        double d = daemon[s][rounds / 2] * 1e6, k = copy[s][rounds / 2] * 1e6;
        printf("%10ld %12.2f %12.2f %8.2f\n", sizes[s], d, k, d / k);
        if (d < k && cross < 0)
            cross = sizes[s];
        else if (d >= k)
            cross = -1;
        close(srcs[s]);
        snprintf(path, sizeof path, "%s/crossover-%ld", dir, sizes[s]);
        unlink(path);
    }
    if (cross < 0)
        printf("crossover: none (a local copy was as fast at every size)\n");
    else
        printf("crossover: %ld (medians of %d rounds; pass it as --local-below)\n", cross, rounds);
    return 0;
}

/* -- latency per file: copy, socket hit, index hit, held tier --------------- */

enum { BY_COPY, BY_SOCKET, BY_INDEX, BY_HELD, BY_SYSCALLS, NWAYS };
static const char *const WAY_NAMES[NWAYS] = {"copy", "socket", "index", "held", "syscalls"};

/* For BY_SYSCALLS: this process's /proc/self/fd, and per path a sealed copy
 * it holds, standing in for the daemon's memfd. */
static int self_fds = -1;
static int *own_copies;

/* The system calls every hit through the index makes, and nothing else: open
 * the source (the caller's proof of access), fstat it, reopen a sealed memfd
 * by its /proc fd link (O_NONBLOCK | O_NOCTTY, as the index's range opens),
 * fstat that, clear O_NONBLOCK, read its seals, and close both. What this
 * host charges for them is the floor under any client's index hit. */
static int
bare_syscalls(int src, int held)
{
    struct stat st, m;
    char name[16];
    snprintf(name, sizeof name, "%d", held);
    if (fstat(src, &st) < 0)
        return -1;
    int fd = openat(self_fds, name, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fstat(fd, &m) < 0 || m.st_size != st.st_size || fcntl(fd, F_SETFL, 0) < 0 ||
        fcntl(fd, F_GET_SEALS) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One open of *path* the *way* given, as a supervisor makes it, timed from
 * its own open of the source to the close of the source and of the fd it
 * got; seconds, or -1 when the open failed (error in c). */
static double
one_open(struct shadowd *c, const char *path, int file, int way)
{
    struct stat st;
    double t0 = now();
    int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC), fd = -1;
    if (src >= 0) {
        if (way == BY_COPY)
            fd = shadowd_copy_fd(c, src);
        else if (way == BY_SOCKET)
            fd = shadowd_request_fd(c, src, NULL);
        else if (way == BY_HELD)
            fd = shadowd_open_routed_fd(c, src, NULL); /* held: the process-local tier */
        else if (way == BY_SYSCALLS)
            fd = bare_syscalls(src, own_copies[file]);
        else if (fstat(src, &st) == 0)
            fd = shadowd_index_open(c, src, &st);
        close(src);
    }
    if (fd >= 0)
        close(fd);
    double t = now() - t0;
    if (fd >= 0 && way == BY_HELD && c->route != SHADOWD_ROUTE_HELD) {
        snprintf(c->error, sizeof c->error, "%s: not in the process-local tier", path);
        return -1;
    }
    if (src < 0)
        snprintf(c->error, sizeof c->error, "%s: %s", path, strerror(errno));
    return fd >= 0 ? t : -1;
}

/* Wait (up to 10 s) until the daemon has *path* cached and in its index,
 * and keep it in the process-local tier. */
static int
warm(struct shadowd *c, const char *path)
{
    double deadline = now() + 10;
    while (now() < deadline) {
        shadowd_set_index(c, 1, 1); /* the routed open's index hit goes into the tier */
        int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        int fd = src < 0 ? -1 : shadowd_open_routed_fd(c, src, NULL);
        if (src >= 0)
            close(src);
        if (fd >= 0)
            close(fd);
        shadowd_set_index(c, 1, 0);
        if (one_open(c, path, -1, BY_SOCKET) >= 0 && one_open(c, path, -1, BY_INDEX) >= 0 &&
            one_open(c, path, -1, BY_HELD) >= 0)
            return 0;
        struct timespec pause = {0, 10000000L};
        nanosleep(&pause, NULL);
    }
    fprintf(stderr, "shadowd-open: %s is not in the daemon's index (%s)\n", path,
            c->error[0] ? c->error : "not cached, or no index for this process");
    return -1;
}

static int
latency(struct shadowd *c, char **paths, int n, int rounds)
{
    double *samples = calloc((size_t)n * NWAYS * (size_t)rounds, sizeof(double));
    int *jobs = calloc((size_t)n * NWAYS, sizeof(int));
    if (samples == NULL || jobs == NULL)
        return 1;
    own_copies = calloc((size_t)n, sizeof(int));
    self_fds = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (own_copies == NULL || self_fds < 0)
        return 1;
    for (int i = 0; i < n; i++) {
        if (warm(c, paths[i]) < 0)
            return 1;
        int src = open(paths[i], O_RDONLY | O_CLOEXEC);
        own_copies[i] = src < 0 ? -1 : shadowd_copy_fd(c, src); /* sealed, as the daemon's */
        if (src >= 0)
            close(src);
        if (own_copies[i] < 0) {
            fprintf(stderr, "shadowd-open: %s: %s\n", paths[i], c->error);
            return 1;
        }
    }
    unsigned seed = 2718281u;
    for (int r = 0; r < rounds; r++) {
        /* Every (file, way) once per round, in a new random order each
         * round: what ran just before must not favour one series. */
        for (int j = 0; j < n * NWAYS; j++)
            jobs[j] = j;
        for (int j = n * NWAYS - 1; j > 0; j--) {
            seed = seed * 1103515245u + 12345u;
            int k = (int)((seed >> 8) % (unsigned)(j + 1)), x = jobs[j];
            jobs[j] = jobs[k];
            jobs[k] = x;
        }
        for (int j = 0; j < n * NWAYS; j++) {
            int file = jobs[j] / NWAYS, way = jobs[j] % NWAYS;
            double t = one_open(c, paths[file], file, way);
            /* The daemon may drop a slot for a moment (a change it saw, an
             * eviction): warm the file again and time it once more. */
            if (t < 0 && warm(c, paths[file]) == 0)
                t = one_open(c, paths[file], file, way);
            if (t < 0) {
                fprintf(stderr, "shadowd-open: %s: %s\n", paths[file], c->error);
                return 1;
            }
            samples[((size_t)file * NWAYS + (size_t)way) * (size_t)rounds + (size_t)r] = t;
        }
    }
    for (int i = 0; i < n; i++) {
        struct stat st;
        stat(paths[i], &st);
        printf("{\"path\": \"");
        for (const char *p = paths[i]; *p; p++)
            printf(*p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
        printf("\", \"size\": %lld, \"rounds\": %d", (long long)st.st_size, rounds);
        for (int w = 0; w < NWAYS; w++) {
            double *s = samples + ((size_t)i * NWAYS + (size_t)w) * (size_t)rounds;
            qsort(s, (size_t)rounds, sizeof(double), cmp_double);
            int p99 = (int)(0.99 * (rounds - 1) + 0.5);
            double p50 = rounds % 2 ? s[rounds / 2] : (s[rounds / 2 - 1] + s[rounds / 2]) / 2;
            printf(", \"%s\": [%.3f, %.3f]", WAY_NAMES[w], p50 * 1e6, s[p99] * 1e6);
        }
        printf("}\n");
    }
    for (int i = 0; i < n; i++)
        close(own_copies[i]);
    close(self_fds);
    free(own_copies);
    free(samples);
    free(jobs);
    return fflush(stdout) != 0;
}

/* -- a new connection's cost ---------------------------------------------- */

/* *n* connections one after another, *pause_ms* apart, each timed from
 * shadowd_connect_start to the index held (or not given), then closed. */
static int
connects(const char *socket_path, long long n, long long pause_ms, int connect_ms, int reply_ms)
{
    double *samples = calloc((size_t)n, sizeof(double));
    long long indexed = 0;
    if (samples == NULL)
        return 1;
    for (long long i = 0; i < n; i++) {
        if (pause_ms > 0) {
            struct timespec pause = {(time_t)(pause_ms / 1000), (long)(pause_ms % 1000) * 1000000L};
            nanosleep(&pause, NULL);
        }
        struct shadowd one;
        shadowd_init(&one);
        shadowd_set_log(&one, NULL, NULL);
        shadowd_set_timeouts(&one, connect_ms, reply_ms, -1);
        double t0 = now();
        int ok = shadowd_connect_start(&one, socket_path) == 0 && shadowd_connect_wait(&one) == 0;
        int held = ok && shadowd_index_ready(&one);
        samples[i] = now() - t0;
        if (!ok) {
            fprintf(stderr, "shadowd-open: connection %lld: %s\n", i + 1, one.error);
            shadowd_close(&one);
            free(samples);
            return 1;
        }
        indexed += held;
        shadowd_close(&one);
    }
    qsort(samples, (size_t)n, sizeof(double), cmp_double);
    int p99 = (int)(0.99 * (double)(n - 1) + 0.5);
    double p50 = n % 2 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2;
    printf("{\"connects\": %lld, \"pause_ms\": %lld, \"p50\": %.1f, \"p99\": %.1f, "
           "\"indexed\": %lld}\n",
           n, pause_ms, p50 * 1e6, samples[p99] * 1e6, indexed);
    free(samples);
    return fflush(stdout) != 0;
}

/* -- main ----------------------------------------------------------------- */

enum {
    OPT_REPLY = 256,
    OPT_PER_MIB,
    OPT_BACKOFF,
    OPT_LOCAL_BELOW,
    OPT_YOUNG,
    OPT_HELD,
    OPT_CROSSOVER,
    OPT_ROUNDS,
    OPT_LATENCY,
    OPT_CONNECTS,
    OPT_PAUSE,
};

static const struct option LONG_OPTIONS[] = {
    {"socket", required_argument, NULL, 's'},
    {"routed", no_argument, NULL, 'r'},
    {"batch", no_argument, NULL, 'b'},
    {"repeat", required_argument, NULL, 'n'},
    {"verbose", no_argument, NULL, 'v'},
    {"gate", no_argument, NULL, 'g'},
    {"loop", required_argument, NULL, 'l'},
    {"copy", no_argument, NULL, 'c'},
    {"index", no_argument, NULL, 'i'},
    {"latency", no_argument, NULL, OPT_LATENCY},
    {"timeout", required_argument, NULL, 't'},
    {"reply-timeout", required_argument, NULL, OPT_REPLY},
    {"per-mib", required_argument, NULL, OPT_PER_MIB},
    {"backoff", required_argument, NULL, OPT_BACKOFF},
    {"local-below", required_argument, NULL, OPT_LOCAL_BELOW},
    {"young", required_argument, NULL, OPT_YOUNG},
    {"held", required_argument, NULL, OPT_HELD},
    {"quiet", no_argument, NULL, 'q'},
    {"crossover", required_argument, NULL, OPT_CROSSOVER},
    {"rounds", required_argument, NULL, OPT_ROUNDS},
    {"connects", required_argument, NULL, OPT_CONNECTS},
    {"pause", required_argument, NULL, OPT_PAUSE},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* A whole non-negative number, or -2 (a usage error). */
static long long
number(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    return errno || end == s || *end || v < 0 ? -2 : v;
}

static int
usage(void)
{
    fprintf(stderr, "%s", USAGE);
    return 2;
}

int
main(int argc, char **argv)
{
    static struct shadowd c = {.sock = -1};
    const char *socket_path = NULL, *cross_dir = NULL;
    double seconds = -1;
    int copy = 0, gate = 0, verbose = 0, routed = 0, batch = 0, by_index = 0, lat = 0, opt;
    long long repeat = 1, connect_ms = -1, reply_ms = -1, per_mib = -1, first = -1, cap = -1;
    long long local_below = -1, young = -1, held = -1, held_bytes = -1, rounds = -1;
    long long n_connects = -1, pause_ms = -1;
    char *comma;

    while ((opt = getopt_long(argc, argv, "s:rbn:vgl:cit:qh", LONG_OPTIONS, NULL)) != -1) {
        switch (opt) {
        case 's': socket_path = optarg; break;
        case 'r': routed = 1; break;
        case 'b': batch = 1; break;
        case 'n': repeat = number(optarg); break;
        case 'v': verbose = 1; break;
        case 'g': gate = 1; break;
        case 'l': seconds = atof(optarg); break;
        case 'c': copy = 1; break;
        case 'i': by_index = 1; break;
        case OPT_LATENCY: lat = 1; break;
        case 't': connect_ms = reply_ms = number(optarg); break;
        case OPT_REPLY: reply_ms = number(optarg); break;
        case OPT_PER_MIB: per_mib = number(optarg); break;
        case OPT_BACKOFF:
            if ((comma = strchr(optarg, ',')) != NULL) {
                *comma = '\0';
                cap = number(comma + 1);
            }
            first = number(optarg);
            break;
        case OPT_LOCAL_BELOW: local_below = number(optarg); break;
        case OPT_YOUNG: young = number(optarg); break;
        case OPT_HELD:
            if ((comma = strchr(optarg, ',')) != NULL) {
                *comma = '\0';
                held_bytes = number(comma + 1);
            }
            held = number(optarg);
            break;
        case 'q': shadowd_set_log(&c, NULL, NULL); break;
        case OPT_CROSSOVER: cross_dir = optarg; break;
        case OPT_ROUNDS: rounds = number(optarg); break;
        case OPT_CONNECTS: n_connects = number(optarg); break;
        case OPT_PAUSE: pause_ms = number(optarg); break;
        case 'h': printf("%s", USAGE); return 0;
        default: return usage();
        }
    }
    if (repeat < 1 || connect_ms == -2 || reply_ms == -2 || per_mib == -2 || first == -2 ||
        cap == -2 || local_below == -2 || young == -2 || held == -2 || held_bytes == -2 ||
        rounds == -2 || rounds == 0 || (copy && by_index) || (lat && (cross_dir || seconds >= 0)))
        return usage();
    if (n_connects != -1 || pause_ms != -1) {
        if (n_connects < 1 || pause_ms == -2 || lat || cross_dir || seconds >= 0 || optind != argc)
            return usage();
        return connects(socket_path, n_connects, pause_ms < 0 ? 0 : pause_ms, (int)connect_ms,
                        (int)reply_ms);
    }
    if (rounds < 0)
        rounds = lat ? 200 : 31;
    if (cross_dir == NULL &&
        (optind >= argc || (seconds >= 0 && (optind != argc - 1 || batch))))
        return usage();
    shadowd_set_timeouts(&c, (int)connect_ms, (int)reply_ms, (int)per_mib);
    shadowd_set_backoff(&c, (int)first, (int)cap);
    shadowd_set_routing(&c, local_below, (int)young);
    shadowd_set_held(&c, (int)held, held_bytes);
    /* Plain opens ask the daemon every time (what they print and what -l
     * counts is the daemon's answer); -i and --latency take index hits by
     * name, the routed open as it decides. */
    if (!routed && !by_index && !lat)
        shadowd_set_index(&c, 0, -1);

    /* The routed open connects when it needs the daemon; the others now. */
    if (!copy && !routed && shadowd_connect(&c, socket_path) < 0) {
        fprintf(stderr, "shadowd-open: %s\n", c.error);
        return 1;
    }
    /* The routed open connects when it first needs the daemon. */
    if (routed && shadowd_set_socket(&c, socket_path) < 0) {
        fprintf(stderr, "shadowd-open: %s\n", c.error);
        return 2;
    }
    if (cross_dir)
        return crossover(&c, cross_dir, (int)rounds);
    if (lat)
        return latency(&c, argv + optind, argc - optind, (int)rounds);
    if (seconds < 0) {
        int status = 0;
        for (long long r = 0; r < repeat; r++) {
            if (batch) {
                if (gate && !wait_for_go())
                    return 1;
                if (cat_batch(&c, argv + optind, argc - optind, routed, verbose) < 0)
                    status = 1;
                continue;
            }
            for (int i = optind; i < argc; i++) {
                if (gate && !wait_for_go())
                    return 1;
                if (cat(&c, argv[i], routed, verbose) < 0)
                    status = 1;
            }
        }
        shadowd_close(&c);
        return fflush(stdout) != 0 ? 1 : status;
    }
    const char *path = argv[optind];
    if (gate && !wait_for_go())
        return 1;
    unsigned long count = 0;
    double deadline = now() + seconds;
    while (now() < deadline) {
        int fd;
        if (copy) {
            /* As a supervisor does: open the file, copy it, close it. */
            int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
            fd = src < 0 ? -1 : shadowd_copy_fd(&c, src);
            if (src < 0)
                snprintf(c.error, sizeof c.error, "%s: %s", path, strerror(errno));
            else
                close(src);
        } else if (by_index) {
            /* As a supervisor does: open the file, fstat it, the index hit. */
            struct stat st;
            int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
            fd = src < 0 || fstat(src, &st) < 0 ? -1 : shadowd_index_open(&c, src, &st);
            if (src < 0)
                snprintf(c.error, sizeof c.error, "%s: %s", path, strerror(errno));
            else
                close(src);
            if (fd < 0 && c.error[0] == '\0')
                snprintf(c.error, sizeof c.error, "%s: not in the daemon's index", path);
        } else {
            fd = routed ? shadowd_open_routed(&c, path) : shadowd_open(&c, path);
        }
        if (fd < 0) {
            fprintf(stderr, "shadowd-open: %s\n", c.error);
            return 1;
        }
        close(fd);
        count++;
    }
    printf("%lu\n", count);
    shadowd_close(&c);
    return fflush(stdout) != 0;
}
