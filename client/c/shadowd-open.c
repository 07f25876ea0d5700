/*
 * shadowd-open: the C client on the command line, and the C side of
 * `shadowd bench`.
 *
 *   shadowd-open [-s SOCKET] [-v] [-g] PATH...
 *       write each PATH's bytes, read from the fd shadowd served, to stdout,
 *       over one connection; "SIZE hit|miss" to stderr with -v. With -g,
 *       print "ready" before each open and wait for a line on stdin. A
 *       failed open is reported and the next one tried.
 *   shadowd-open [-s SOCKET] [-c] [-g] -l SECONDS PATH
 *       open and close PATH through shadowd (with -c: copy it into a
 *       fresh sealed memfd, as supervisors do without shadowd) as often as
 *       possible for SECONDS; print how many times. With -g, print "ready"
 *       once connected and wait for a line on stdin before starting.
 *
 * Exit status: 0, 1 when shadowd refused or failed an open (the reason on
 * stderr), 2 for a usage error.
 *
 * Must never: exit 0 after a failed open.
 */
#define _GNU_SOURCE
#include "shadowd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#endif
#define SEALS 0xF /* F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE */

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The status quo: a fresh memfd holding a copy of *path*, sealed. */
static int
copy_sealed(const char *path)
{
    struct stat st;
    int src = open(path, O_RDONLY | O_CLOEXEC);
    if (src < 0)
        return -1;
    int fd = -1;
    if (fstat(src, &st) == 0)
        fd = memfd_create("shadowd-bench", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    off_t off = 0;
    while (fd >= 0 && off < st.st_size) {
        ssize_t n = sendfile(fd, src, &off, (size_t)(st.st_size - off));
        if (n == 0)
            errno = ENODATA; /* the file shrank */
        if (n <= 0) {
            close(fd);
            fd = -1;
        }
    }
    if (fd >= 0 && (fchmod(fd, st.st_mode & 0111 ? 0555 : 0444) < 0 ||
                    fcntl(fd, F_ADD_SEALS, SEALS) < 0)) {
        close(fd);
        fd = -1;
    }
    close(src);
    return fd;
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

/* Open *path* through shadowd and copy its bytes to stdout; -1 on failure. */
static int
cat(struct shadowd *c, const char *path, int verbose)
{
    int fd = shadowd_open(c, path);
    if (fd < 0) {
        fprintf(stderr, "shadowd-open: %s\n", c->error);
        return -1;
    }
    if (verbose)
        fprintf(stderr, "%llu %s\n", (unsigned long long)c->size, c->hit ? "hit" : "miss");
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
usage(void)
{
    fprintf(stderr, "usage: shadowd-open [-s SOCKET] [-v] [-g] PATH...\n"
                    "       shadowd-open [-s SOCKET] [-c] [-g] -l SECONDS PATH\n");
    return 2;
}

int
main(int argc, char **argv)
{
    const char *socket_path = NULL;
    double seconds = -1;
    int copy = 0, gate = 0, verbose = 0, opt;
    struct shadowd c = {.sock = -1};

    while ((opt = getopt(argc, argv, "s:l:cgv")) != -1) {
        switch (opt) {
        case 's': socket_path = optarg; break;
        case 'l': seconds = atof(optarg); break;
        case 'c': copy = 1; break;
        case 'g': gate = 1; break;
        case 'v': verbose = 1; break;
        default: return usage();
        }
    }
    if (optind >= argc || (seconds >= 0 && optind != argc - 1))
        return usage();
    const char *path = argv[optind];

    if (!copy && shadowd_connect(&c, socket_path) < 0) {
        fprintf(stderr, "shadowd-open: %s\n", c.error);
        return 1;
    }
    if (seconds < 0) {
        int status = 0;
        for (int i = optind; i < argc; i++) {
            if (gate && !wait_for_go())
                return 1;
            if (cat(&c, argv[i], verbose) < 0)
                status = 1;
        }
        shadowd_close(&c);
        return fflush(stdout) != 0 ? 1 : status;
    }
    if (gate && !wait_for_go())
        return 1;
    unsigned long count = 0;
    double deadline = now() + seconds;
    while (now() < deadline) {
        int fd = copy ? copy_sealed(path) : shadowd_open(&c, path);
        if (fd < 0) {
            fprintf(stderr, "shadowd-open: %s\n", copy ? strerror(errno) : c.error);
            return 1;
        }
        close(fd);
        count++;
    }
    printf("%lu\n", count);
    shadowd_close(&c);
    return fflush(stdout) != 0;
}
