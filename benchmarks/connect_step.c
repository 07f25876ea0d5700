/*
 * connect_step: what a supervisor's connection to the daemon costs, step by
 * step, seen from a C client that speaks the protocol itself (so that each
 * system call is timed on its own), and what each round costs the daemon's
 * CPU (its threads' /proc/PID/task/TID/schedstat, read by this program).
 *
 * Modes:
 *   connect  each round: socket, connect, the hello (version 2) and the
 *            index request sent back to back (as shadowd_connect_start does
 *            before a supervisor forks), the hello's answer and the index's
 *            (its fd closed) waited for, then close. Timed: connect(), the
 *            two sends, the hello's answer and the index's after the sends,
 *            the whole; the daemon's main thread's CPU from before connect()
 *            to its return, to the index's answer, and to SETTLE ms after the
 *            close (the close's handling included).
 *   told     each round the same connection, then NFILES files of the list
 *            (fresh ones each round: never asked for before) opened and sent
 *            in one open_batch with "wait": false, and the socket closed
 *            without reading the answer (as shadowd_close sends the files a
 *            supervisor copied in the cold window). Timed: the batch's
 *            sendmsg, the close, both; the daemon's main thread's CPU from
 *            before the send to SETTLE ms after the close (the batch, and
 *            the results of the fills it started), all its threads' too (the
 *            fills' copies).
 *
 * Rounds are PAUSE_MS apart (a supervisor's connections come alone, to a
 * daemon that went idle meanwhile). Prints one JSON object: every sample, in
 * microseconds, per measure.
 *
 * A measuring instrument for docs/performance.md; run by
 * benchmarks/connect.py. Must never: write anything but its report; leave an
 * fd open (it checks its own count at the end).
 *
 *   connect_step SOCKET DAEMON_PID MODE ROUNDS PAUSE_MS SETTLE_MS [FILELIST NFILES]
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_FILES 64
#define MAX_TASKS 64
#define MAX_MEASURES 16

static double
now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static void
sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* The daemon's threads' schedstat files, opened once: the main thread first. */
static int task_fd[MAX_TASKS];
static int ntasks;

static void
open_tasks(long pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/task/%ld/schedstat", pid, pid);
    task_fd[ntasks++] = open(path, O_RDONLY | O_CLOEXEC);
    if (task_fd[0] < 0) {
        perror(path);
        exit(1);
    }
}

/* Worker threads come and go: look again before a round that reads them. */
static void
refresh_tasks(long pid)
{
    for (int i = 1; i < ntasks; i++)
        close(task_fd[i]);
    ntasks = 1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/task", pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && ntasks < MAX_TASKS) {
        long tid = atol(e->d_name);
        if (tid <= 0 || tid == pid)
            continue;
        snprintf(path, sizeof path, "/proc/%ld/task/%ld/schedstat", pid, tid);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0)
            task_fd[ntasks++] = fd;
    }
    closedir(d);
}

/* CPU ns of the daemon's main thread (all 0) or of all its threads (all 1). */
static double
cpu_us(int all)
{
    double sum = 0;
    for (int i = 0; i < (all ? ntasks : 1); i++) {
        char buf[128];
        ssize_t n = pread(task_fd[i], buf, sizeof buf - 1, 0);
        if (n <= 0)
            continue; /* a worker that ended: its time is gone with it */
        buf[n] = '\0';
        sum += strtod(buf, NULL) / 1e3;
    }
    return sum;
}

/* -- the messages (docs/protocol.md) ---------------------------------------- */

static const uint8_t HELLO[] = {0x84, 0xa2, 'o', 'p', 0xa5, 'h', 'e', 'l', 'l', 'o', 0xa2, 'i',
                                'd', 0x00, 0xa7, 'v', 'e', 'r', 's', 'i', 'o', 'n', 0x02, 0xa6,
                                'c', 'l', 'i', 'e', 'n', 't', 0xa4, 'b', 'e', 'n', 'c'};
static const uint8_t INDEX[] = {0x82, 0xa2, 'o', 'p', 0xa5, 'i', 'n', 'd', 'e', 'x', 0xa2, 'i', 'd', 0x01};
static const uint8_t BATCH[] = {0x83, 0xa2, 'o', 'p', 0xaa, 'o', 'p', 'e', 'n', '_', 'b', 'a', 't',
                                'c', 'h', 0xa2, 'i', 'd', 0x02, 0xa4, 'w', 'a', 'i', 't', 0xc2};

static int
send_fds(int s, const void *data, size_t len, const int *fds, int nfds)
{
    struct iovec iov = {(void *)data, len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FILES)];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(s, &msg, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

/* Receive one reply; close any fd it carried. The reply's second byte on is
 * {"id": N, "ok": ...}: returns whether ok is true. */
static int
recv_reply(int s)
{
    uint8_t buf[4096];
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FILES)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(s, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        return -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            int nfd = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int fds[MAX_FILES];
            memcpy(fds, CMSG_DATA(cm), sizeof(int) * (size_t)nfd);
            for (int i = 0; i < nfd; i++)
                close(fds[i]);
        }
    }
    /* ok: "a2 6f 6b c3" somewhere in the first bytes */
    for (ssize_t i = 0; i + 3 < n && i < 16; i++)
        if (buf[i] == 0xa2 && buf[i + 1] == 'o' && buf[i + 2] == 'k')
            return buf[i + 3] == 0xc3 ? 0 : -1;
    return -1;
}

/* -- samples ----------------------------------------------------------------- */

static const char *names[MAX_MEASURES];
static double *samples[MAX_MEASURES];
static int nmeasures;

static int
measure(const char *name, int rounds)
{
    names[nmeasures] = name;
    samples[nmeasures] = calloc((size_t)rounds, sizeof(double));
    return nmeasures++;
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
    return n - 1;
}

int
main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: connect_step SOCKET DAEMON_PID MODE ROUNDS PAUSE_MS SETTLE_MS "
                        "[FILELIST NFILES]\n");
        return 2;
    }
    const char *path = argv[1];
    long pid = atol(argv[2]);
    int told = strcmp(argv[3], "told") == 0;
    int rounds = atoi(argv[4]);
    long pause = atol(argv[5]), settle = atol(argv[6]);
    int nfiles = 0;
    char **files = NULL;
    if (told) {
        if (argc < 9)
            return 2;
        nfiles = atoi(argv[8]);
        if (nfiles < 1 || nfiles > MAX_FILES)
            return 2;
        FILE *f = fopen(argv[7], "r");
        if (f == NULL)
            return 1;
        files = calloc((size_t)rounds * (size_t)nfiles, sizeof *files);
        char line[4096];
        for (int i = 0; i < rounds * nfiles; i++) {
            if (fgets(line, sizeof line, f) == NULL) {
                fprintf(stderr, "connect_step: the list has fewer than %d files\n",
                        rounds * nfiles);
                return 1;
            }
            line[strcspn(line, "\n")] = '\0';
            files[i] = strdup(line);
        }
        fclose(f);
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    open_tasks(pid);
    int fds_at_start = count_fds();

    int m_connect = measure("connect", rounds), m_sends = measure("hello_index_sent", rounds);
    int m_hello = measure("hello_answered", rounds), m_index = measure("index_answered", rounds);
    int m_whole = measure("connection", rounds);
    int m_cpu_connect = measure("daemon_cpu_by_connect", rounds);
    int m_cpu_index = measure("daemon_cpu_by_index", rounds);
    int m_cpu_all = measure("daemon_cpu_connection", rounds);
    int m_close = -1, m_batch = -1, m_told = -1, m_cpu_told = -1, m_cpu_told_all = -1;
    if (told) {
        m_batch = measure("told_sent", rounds);
        m_close = measure("told_closed", rounds);
        m_told = measure("told", rounds);
        m_cpu_told = measure("daemon_cpu_told", rounds);
        m_cpu_told_all = measure("daemon_cpu_told_all_threads", rounds);
    } else {
        m_close = measure("closed", rounds);
    }

    for (int r = 0; r < rounds; r++) {
        sleep_ms(pause);
        if (told)
            refresh_tasks(pid);
        int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        double c0 = cpu_us(0);
        double t0 = now_us();
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
            perror("connect");
            return 1;
        }
        double t1 = now_us();
        double c1 = cpu_us(0);
        double t1b = now_us();
        if (send_fds(s, HELLO, sizeof HELLO, NULL, 0) < 0 ||
            send_fds(s, INDEX, sizeof INDEX, NULL, 0) < 0) {
            perror("send");
            return 1;
        }
        double t2 = now_us();
        if (recv_reply(s) < 0) {
            fprintf(stderr, "connect_step: the hello was refused\n");
            return 1;
        }
        double t3 = now_us();
        recv_reply(s); /* refused (another uid's daemon): its time all the same */
        double t4 = now_us();
        double c4 = cpu_us(0);
        samples[m_connect][r] = t1 - t0;
        samples[m_sends][r] = t2 - t1b;
        samples[m_hello][r] = t3 - t2;
        samples[m_index][r] = t4 - t2;
        samples[m_whole][r] = t4 - t0 - (t1b - t1);
        samples[m_cpu_connect][r] = c1 - c0;
        samples[m_cpu_index][r] = c4 - c0;
        if (!told) {
            double t5 = now_us();
            close(s);
            samples[m_close][r] = now_us() - t5;
            sleep_ms(settle);
            samples[m_cpu_all][r] = cpu_us(0) - c0;
            continue;
        }
        int src[MAX_FILES];
        for (int i = 0; i < nfiles; i++) {
            src[i] = open(files[r * nfiles + i], O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
            if (src[i] < 0) {
                perror(files[r * nfiles + i]);
                return 1;
            }
        }
        double a0 = cpu_us(1), m0 = cpu_us(0);
        double t5 = now_us();
        if (send_fds(s, BATCH, sizeof BATCH, src, nfiles) < 0) {
            perror("sendmsg (the batch)");
            return 1;
        }
        double t6 = now_us();
        for (int i = 0; i < nfiles; i++)
            close(src[i]);
        close(s);
        double t7 = now_us();
        sleep_ms(settle);
        refresh_tasks(pid); /* the fills' workers, if new */
        samples[m_batch][r] = t6 - t5;
        samples[m_close][r] = t7 - t6;
        samples[m_told][r] = t7 - t5;
        samples[m_cpu_told][r] = cpu_us(0) - m0;
        samples[m_cpu_told_all][r] = cpu_us(1) - a0;
        samples[m_cpu_all][r] = m0 - c0;
    }
    for (int i = 1; i < ntasks; i++)
        close(task_fd[i]);
    ntasks = 1;
    if (count_fds() != fds_at_start) {
        fprintf(stderr, "connect_step: %d fds open at the end, %d at the start\n", count_fds(),
                fds_at_start);
        return 1;
    }
    printf("{");
    for (int m = 0; m < nmeasures; m++) {
        printf("%s\"%s\": [", m ? ", " : "", names[m]);
        for (int r = 0; r < rounds; r++)
            printf("%s%.1f", r ? ", " : "", samples[m][r]);
        printf("]");
    }
    printf("}\n");
    return fflush(stdout) != 0;
}
