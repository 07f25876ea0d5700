/*
 * shadowd's wire protocol from C, and the routed open around it: see
 * shadowd.h for the API and its rules, docs/protocol.md for the messages,
 * client/c/README.md for the whole. msgpack is written and read by hand
 * (maps, arrays, strings, integers, booleans and nil are all that occur);
 * the reader checks every length against the datagram, skips what it does
 * not know, and never follows a reply further than 16 levels deep.
 *
 * One connection per struct, non-blocking; every request has a slot (a
 * bounded table) that its reply fills, matched by id, so the blocking calls
 * and the pipelined ones share one reader. Waits are poll() up to a
 * deadline, never a blocking read.
 *
 * Must never: return an fd without the four seals; return an fd that is not
 * a memfd of the right bytes (the routed calls' local copies check the
 * source's fstat around the copy; the process-local tier checks the
 * caller's fstat against the version it holds); leave an fd that came with
 * a reply open when the reply is not handed to the caller; wait for the
 * daemon past a deadline; allocate memory.
 */
#define _GNU_SOURCE
#include "shadowd.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>

#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_GET_SEALS 1034
#endif
#ifndef F_SEAL_SHRINK
#define F_SEAL_SHRINK 0x0002
#endif
#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif
#ifndef MFD_NOEXEC_SEAL
#define MFD_NOEXEC_SEAL 0x0008U
#endif
#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif
#ifndef SHADOWD_TIMEOUT_SECONDS
#define SHADOWD_TIMEOUT_SECONDS 30 /* the ceiling of every wait (tests build it with 1) */
#endif

#define MAGIC 0x7368616430776431ULL
#define REQUIRED_SEALS 0xF /* F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE */
#define LABEL_MAX 4000     /* longer paths go without a label */
#define MAX_FDS 250        /* the most fds a reply may carry (the daemon's max_batch cap) */
#define MAX_DEPTH 16
#define MIN_MAX_REQUEST 512 /* what every daemon accepts, until its hello says */
#define CEILING_MS (SHADOWD_TIMEOUT_SECONDS * 1000)
#define ROUTED_CHUNK 64     /* daemon-bound files a routed batch gathers at once */

#define DEFAULT_CONNECT_MS 250
#define DEFAULT_REPLY_MS 250
#define DEFAULT_REPLY_MS_PER_MIB 4
#define DEFAULT_BACKOFF_FIRST_MS 1000
#define DEFAULT_BACKOFF_MAX_MS 30000
/* The latency breaker: an answer that took this share of the reply timeout
 * or more is slow, and so many slow answers in a row open the breaker as a
 * failure does, so that a daemon answering every request just within the
 * timeout cannot cost each open nearly a timeout for good. A hit takes
 * 25-150 us; on the project's loaded 2-vCPU VM answers over half the
 * Python client's 250 ms came singly, never two in a row (docs/performance.md,
 * "How late a hit comes on a loaded machine"). The Python Opener's rule
 * (SLOW_FRACTION, SLOW_IN_A_ROW). */
#define DEFAULT_SLOW_PERCENT 50
#define DEFAULT_SLOW_IN_A_ROW 3
#define DEFAULT_RACY_NS 1000000000LL /* the daemon's default --racy-window, until its hello says */
/* Below this a local copy is cheaper than a hit through the daemon:
 * measured with `shadowd-open --crossover` (client/c/README.md). */
#define DEFAULT_LOCAL_BELOW (128 * 1024)
#define DEFAULT_HELD_MAX 128
#define DEFAULT_HELD_MAX_BYTES (64LL << 20)
/* How long the process-local tier serves a version the daemon's index does
 * not vouch for (no index here) after the daemon last did: one request per
 * held file and bound, 26-28 us each (docs/performance.md, "The process-local
 * tier checks the daemon"). */
#define DEFAULT_HELD_RECHECK_MS 1000
#define DEFAULT_COLD_MISSES 1
#define DEFAULT_COLD_MS 1000
/* Whether an index hit also goes into the process-local tier (see
 * client/c/README.md, "The index", for what was measured). */
#define DEFAULT_INDEX_KEEP 0
/* Index hits are reported after this many, or when one comes this long
 * after the last report. */
#define REPORT_EVERY_HITS 256
#define REPORT_EVERY_US 1000000LL
#define PROTOCOL 2          /* the version this client says first */
#define PRELOAD_GROUP 256   /* files shadowd_preload handles at once (sources open, items) */
/* A routed open copies in chunks of this while it waits for the daemon's
 * answer, and looks for it after each: about 15-25 us of copying here. */
#define RACE_CHUNK (64 * 1024)

/* Slot states and kinds. */
enum { FREE = 0, SENT, READY, CANCELLED };
enum { K_OPEN = 1, K_LOOKUP, K_PUBLISH, K_BATCH, K_INDEX, K_REPORT };
/* How a request or connection failed. BROKEN: the daemon closed or reset a
 * connection that worked (a restart: worth one retry on a new one). */
enum { F_NONE = 0, F_BROKEN, F_TIMEOUT, F_CONNECT, F_BAD, F_REFUSED, F_REQUEST, F_VERSION };
/* The connection's hello: none sent, sent, answered. */
enum { H_NONE = 0, H_SENT, H_DONE };
/* This connection's index: not asked yet, asked (the answer not read),
 * held, none (the daemon gave none on this connection). */
enum { IX_NONE = 0, IX_ASKED, IX_HAVE, IX_NOT };
/* How start and conn_open connect: NOWAIT, a non-blocking connect that
 * fails (and opens the breaker) on a full backlog, as the pipelined calls
 * always have; WAIT, a connect that waits for room in the backlog up to
 * the connect timeout, then for the hello's answer; EARLY,
 * shadowd_connect_start's, non-blocking, which leaves a full backlog to
 * shadowd_connect_wait's WAIT instead of failing. */
enum { CONNECT_NOWAIT = 0, CONNECT_WAIT = 1, CONNECT_EARLY = 2 };

#define P(c) (&(c)->priv_)

static long long
mono_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static long long
real_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void fail(struct shadowd *c, const char *code, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Say what went wrong in *c* (NULL: errno only). */
static void
fail(struct shadowd *c, const char *code, int errnum, const char *fmt, ...)
{
    va_list ap;
    if (c == NULL) {
        errno = errnum ? errnum : EIO;
        return;
    }
    snprintf(c->code, sizeof c->code, "%s", code);
    c->errnum = errnum;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
}

/* The caller's own fstat of *src* into *st*: 0, or -1 with the error set
 * (errnum its errno). Every fd served for *src* is checked against it: a
 * source this fails for is refused before anything is asked or copied. */
static int
own_fstat(struct shadowd *c, int src, struct stat *st)
{
    if (fstat(src, st) == 0)
        return 0;
    int err = errno;
    fail(c, "", err, "fstat of the file: %s", strerror(err));
    return -1;
}

static void
clear(struct shadowd *c)
{
    c->code[0] = c->error[0] = '\0';
    c->errnum = 0;
    c->hit = 0;
    c->route = SHADOWD_ROUTE_NONE;
    c->copied_why = SHADOWD_COPIED_NOT;
    c->miss = c->filling = c->cached = c->has_version = 0;
    memset(&c->version, 0, sizeof c->version);
}

static void
close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* -- which process this is ---------------------------------------------- */

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

/* One page that the kernel zeroes in every child it forks
 * (MADV_WIPEONFORK, Linux 4.14; any fork, also one made without glibc's
 * atfork handlers: _Fork, a raw clone). It holds 0 or this process's mark,
 * so a process that finds a mark there has not forked since, and every open
 * is spared a getpid() (a system call: 0.2 us on these VMs, 5% of an index
 * hit). A mark, not the pid: a child in a pid namespace of its own may have
 * the very pid its parent has in its own (pid 1 for both, when the parent
 * is the init of its namespace: a container's entry point, `unshare -pf`),
 * and would take a struct its parent set up for its own, using the
 * parent's connection and its /proc/PID/fd. A process's mark is one more
 * than the last one handed out before (last_mark, which a child inherits
 * with the rest of memory), so it is above every mark any struct it
 * inherited can hold. NULL where the kernel cannot: then the pid, asked
 * every time, as before (and a child in a new pid namespace with its
 * parent's pid is taken for its parent). A child made with CLONE_VM and no
 * CLONE_THREAD (vfork, posix_spawn) shares the page and is taken for its
 * parent: such a child may only exec or _exit, and never calls us. */
static int *self_page;
static int self_page_failed;
static int last_mark;

static int *
self_cell(void)
{
    int *cell = __atomic_load_n(&self_page, __ATOMIC_ACQUIRE);
    if (cell != NULL || __atomic_load_n(&self_page_failed, __ATOMIC_RELAXED))
        return cell;
    size_t len = (size_t)sysconf(_SC_PAGESIZE);
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        __atomic_store_n(&self_page_failed, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    if (madvise(m, len, MADV_WIPEONFORK) != 0) {
        munmap(m, len);
        __atomic_store_n(&self_page_failed, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    int *none = NULL;
    if (!__atomic_compare_exchange_n(&self_page, &none, (int *)m, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        munmap(m, len); /* another thread's page came first */
        return none;
    }
    return m;
}

/* Which process this is: its mark (see self_page), or its pid where there
 * is no such page; a system call only in a process that has not asked yet. */
static int
current_self(void)
{
    int *cell = self_cell();
    if (cell == NULL)
        return (int)getpid();
    int mark = __atomic_load_n(cell, __ATOMIC_ACQUIRE);
    if (mark != 0)
        return mark;
    int fresh = __atomic_add_fetch(&last_mark, 1, __ATOMIC_RELAXED);
    if (!__atomic_compare_exchange_n(cell, &mark, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return mark; /* another thread of this process marked it first: its mark */
    return fresh;
}

/* -- setting up ---------------------------------------------------------- */

#define PRIV_AT(m) offsetof(struct shadowd_private_, m)
#define PRIV_END(m) (PRIV_AT(m) + sizeof(((struct shadowd_private_ *)0)->m))

typedef char skip_is_in_the_structs_order
    [PRIV_AT(hint_fd) < PRIV_AT(hint_label) && PRIV_AT(hint_label) < PRIV_AT(hint_labels) &&
             PRIV_AT(hint_labels) < PRIV_AT(held) && PRIV_AT(held) < PRIV_AT(report) &&
             PRIV_AT(report) < PRIV_AT(wbuf) && PRIV_AT(wbuf) < PRIV_AT(rbuf) &&
             offsetof(struct shadowd, priv_) + sizeof(struct shadowd_private_) ==
                 sizeof(struct shadowd)
         ? 1
         : -1];

/* Zero-fill everything but what is never read before it is written: the
 * request and reply buffers, and the arrays read only below a count that
 * starts at 0 (the tier's entries, reached through held_index or below
 * nheld; the unreported hits, through report_index or below nreport; the
 * told files, below nhint and hint_used). That is 150 KiB of the 190: a
 * process's first setup of a static struct (a supervisor's) otherwise
 * writes, and so faults in, every page of it (0.2 ms measured on the
 * project's VM, paid before the tracee starts), and a fork then copies or
 * write-protects them all. Everything between and after those arrays is
 * zeroed, padding included, so a member added anywhere is. */
static void
zero(struct shadowd *c)
{
    static const size_t skip[][2] = {
        {PRIV_AT(hint_fd), PRIV_END(hint_fd)},   {PRIV_AT(hint_label), PRIV_END(hint_label)},
        {PRIV_AT(hint_labels), PRIV_END(hint_labels)}, {PRIV_AT(held), PRIV_END(held)},
        {PRIV_AT(report), PRIV_END(report)},     {PRIV_AT(wbuf), PRIV_END(wbuf)},
        {PRIV_AT(rbuf), PRIV_END(rbuf)},
    };
    char *base = (char *)P(c);
    size_t at = 0;
    memset(c, 0, offsetof(struct shadowd, priv_));
    for (size_t i = 0; i < sizeof skip / sizeof skip[0]; i++) {
        memset(base + at, 0, skip[i][0] - at);
        at = skip[i][1];
    }
    memset(base + at, 0, sizeof(struct shadowd_private_) - at);
}

static void
setup(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    zero(c);
    c->sock = -1;
    c->next_id = 1;
    p->magic = MAGIC;
    p->self = current_self();
    p->connect_ms = DEFAULT_CONNECT_MS;
    p->reply_ms = DEFAULT_REPLY_MS;
    p->reply_ms_per_mib = DEFAULT_REPLY_MS_PER_MIB;
    p->backoff_first_ms = DEFAULT_BACKOFF_FIRST_MS;
    p->backoff_max_ms = DEFAULT_BACKOFF_MAX_MS;
    p->slow_percent = DEFAULT_SLOW_PERCENT;
    p->slow_in_a_row = DEFAULT_SLOW_IN_A_ROW;
    p->young_ms = -1; /* the daemon's racy window */
    p->want_version = PROTOCOL;
    p->race = 0;
    p->cold_misses = DEFAULT_COLD_MISSES;
    p->cold_ms = DEFAULT_COLD_MS;
    p->local_below = DEFAULT_LOCAL_BELOW;
    p->held_max = DEFAULT_HELD_MAX;
    p->held_max_bytes = DEFAULT_HELD_MAX_BYTES;
    p->held_recheck_us = 1000LL * DEFAULT_HELD_RECHECK_MS;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++)
        p->slots[i].fd = p->slots[i].src = -1;
    p->procfd = -1;
    p->relay = p->relay_of = -1;
    p->index_use = 1;
    p->index_keep = DEFAULT_INDEX_KEEP;
    p->index_dirfd = -1;
    p->index_fd = -1;
}

/* Every entry point starts here: a struct without our mark (zero-filled,
 * or of unknown contents) is set up; nothing in it is closed. */
static inline void
ready(struct shadowd *c)
{
    if (P(c)->magic != MAGIC)
        setup(c);
}

void
shadowd_init(struct shadowd *c)
{
    setup(c);
}

static int
clamp_ms(int ms, int dflt)
{
    if (ms < 0)
        ms = dflt;
    return ms > CEILING_MS ? CEILING_MS : ms;
}

void
shadowd_set_timeouts(struct shadowd *c, int connect_ms, int reply_ms, int reply_ms_per_mib)
{
    ready(c);
    P(c)->connect_ms = clamp_ms(connect_ms, DEFAULT_CONNECT_MS);
    P(c)->reply_ms = clamp_ms(reply_ms, DEFAULT_REPLY_MS);
    P(c)->reply_ms_per_mib = clamp_ms(reply_ms_per_mib, DEFAULT_REPLY_MS_PER_MIB);
}

void
shadowd_set_backoff(struct shadowd *c, int first_ms, int max_ms)
{
    ready(c);
    P(c)->backoff_first_ms = first_ms < 0 ? DEFAULT_BACKOFF_FIRST_MS : first_ms;
    P(c)->backoff_max_ms = max_ms < 0 ? DEFAULT_BACKOFF_MAX_MS : max_ms;
    if (P(c)->backoff_max_ms < P(c)->backoff_first_ms)
        P(c)->backoff_max_ms = P(c)->backoff_first_ms;
}

void
shadowd_set_slow(struct shadowd *c, int percent, int in_a_row)
{
    ready(c);
    P(c)->slow_percent = percent < 0 ? DEFAULT_SLOW_PERCENT : percent;
    P(c)->slow_in_a_row = in_a_row < 0 ? DEFAULT_SLOW_IN_A_ROW : in_a_row;
    P(c)->slow_streak = 0;
}

void
shadowd_set_log(struct shadowd *c, shadowd_log_fn fn, void *arg)
{
    ready(c);
    P(c)->log_set = 1;
    P(c)->log = fn;
    P(c)->log_arg = arg;
}

void
shadowd_set_routing(struct shadowd *c, long long local_below, int young_ms)
{
    ready(c);
    P(c)->local_below = local_below < 0 ? DEFAULT_LOCAL_BELOW : local_below;
    P(c)->young_ms = young_ms < 0 ? -1 : young_ms;
}

static void held_trim(struct shadowd *c, uint64_t room);

void
shadowd_set_race(struct shadowd *c, int on)
{
    ready(c);
    P(c)->race = on != 0;
}

void
shadowd_set_cold(struct shadowd *c, int misses, int window_ms)
{
    ready(c);
    P(c)->cold_misses = misses < 0 ? DEFAULT_COLD_MISSES : misses;
    P(c)->cold_ms = window_ms < 0 ? DEFAULT_COLD_MS : clamp_ms(window_ms, DEFAULT_COLD_MS);
    P(c)->cold_streak = 0;
}

void
shadowd_set_held(struct shadowd *c, int max_entries, long long max_bytes)
{
    ready(c);
    if (max_entries < 0)
        max_entries = DEFAULT_HELD_MAX;
    P(c)->held_max = max_entries > SHADOWD_HELD_SLOTS ? SHADOWD_HELD_SLOTS : max_entries;
    P(c)->held_max_bytes = max_bytes < 0 ? DEFAULT_HELD_MAX_BYTES : max_bytes;
    held_trim(c, 0);
}

void
shadowd_set_held_recheck(struct shadowd *c, int ms)
{
    ready(c);
    P(c)->held_recheck_us = 1000LL * (ms < 0 ? DEFAULT_HELD_RECHECK_MS : ms);
}

/* -- the breaker --------------------------------------------------------- */

static void log_line(struct shadowd *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
log_line(struct shadowd *c, const char *fmt, ...)
{
    struct shadowd_private_ *p = P(c);
    char line[512];
    va_list ap;
    int n = snprintf(line, sizeof line, "shadowd: ");
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (p->log_set) {
        if (p->log)
            p->log(p->log_arg, line + n);
        return;
    }
    size_t len = strlen(line);
    line[len++] = '\n';
    /* One write: lines of several processes do not interleave. */
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

/* The daemon failed a request asked at *asked_us* (mono_us; the failure of
 * a connection as it is now: now): fail fast until the window ends. A
 * failure counts against the window its request was asked in, whenever it
 * comes: one asked before the last window ended (a pipelined request
 * waiting out a deadline longer than the window the latency breaker
 * opened) is the outage that window is for, not a retry that failed after
 * it. */
static void
trip(struct shadowd *c, const char *why, long long asked_us)
{
    struct shadowd_private_ *p = P(c);
    long long now = mono_us();
    if (asked_us < p->down_until)
        return; /* this window's failure is known already */
    snprintf(p->down_why, sizeof p->down_why, "%s", why);
    if (!p->down) {
        p->down = 1;
        p->down_since = now;
        p->backoff_ms = p->backoff_first_ms;
        log_line(c, "daemon at %s unavailable (%s); trying it again in %d ms", c->socket_path,
                 why, p->backoff_ms);
    } else if (p->backoff_ms < p->backoff_max_ms) {
        long long next = 2LL * p->backoff_ms;
        p->backoff_ms = next > p->backoff_max_ms ? p->backoff_max_ms : (int)next;
    }
    p->down_until = now + 1000LL * p->backoff_ms;
}

static void
recovered(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!p->down)
        return;
    p->down = 0;
    log_line(c, "daemon at %s is back (unavailable for %.1f s)", c->socket_path,
             (double)(mono_us() - p->down_since) / 1e6);
}

int
shadowd_available(struct shadowd *c)
{
    ready(c);
    return !P(c)->down || mono_us() >= P(c)->down_until;
}

/* 0: go ahead and talk to the daemon; -1: the breaker says no (error set). */
static int
gate(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!p->down)
        return 0;
    long long left = p->down_until - mono_us();
    if (left <= 0)
        return 0; /* the window is over: this call tries again */
    c->counts.fast++;
    fail(c, SHADOWD_UNAVAILABLE, 0, "shadowd at %s is unavailable (%s); not trying it again for %lld ms",
         c->socket_path, p->down_why, (left + 999) / 1000);
    return -1;
}

/* The answer to *s* came while this call waited for it: the latency
 * breaker's part. Only a request that does not wait on the daemon's copy
 * ("wait": false, in version 2) is timed, from just before it was sent to
 * when its answer was read (not the connect, the hello, nor anything this
 * client did after); a version 1 daemon's misses wait for its copy, so its
 * answers are not. A slow one (slow_percent of the reply timeout or more)
 * counts unless it was asked before the last slow one counted came (it
 * waited behind that one: the same stall, once); slow_in_a_row of them
 * open the breaker. The connection stays (nothing on it failed), unused
 * while the window runs: no request, and neither its index's hits nor its
 * index's word for the process-local tier (docs/protocol.md, of a breaker
 * that is open). After the window the next slow answer opens it again,
 * for a window twice as long; an answer in time ends the streak and
 * closes it ("is back"). */
static void
timed(struct shadowd *c, const struct shadowd_slot_ *s)
{
    struct shadowd_private_ *p = P(c);
    if (!s->nowait || s->answered_us == 0 || p->slow_in_a_row <= 0)
        return;
    long long took = s->answered_us - s->asked_us;
    /* took (us) >= reply_ms * 1000 * slow_percent / 100 */
    if (took * 100 < (long long)p->reply_ms * 1000LL * p->slow_percent) {
        p->slow_streak = 0;
        recovered(c);
        return;
    }
    c->counts.slow++;
    if (s->asked_us < p->slow_at)
        return;
    p->slow_at = s->answered_us;
    if (++p->slow_streak < p->slow_in_a_row)
        return;
    char why[160];
    snprintf(why, sizeof why,
             "it answered %d requests in a row in %d%% of the reply timeout (%d ms) or more",
             p->slow_in_a_row, p->slow_percent, p->reply_ms);
    trip(c, why, s->asked_us);
}

/* -- writing ------------------------------------------------------------ */

struct out {
    uint8_t *buf;
    size_t len, cap;
    int over;
};

static void
put_raw(struct out *o, const void *p, size_t n)
{
    if (o->over || n > o->cap - o->len) {
        o->over = 1;
        return;
    }
    memcpy(o->buf + o->len, p, n);
    o->len += n;
}

static void
put_u8(struct out *o, uint8_t b)
{
    put_raw(o, &b, 1);
}

static void
put_be(struct out *o, uint8_t tag, uint64_t v, int bytes)
{
    uint8_t b[9];
    b[0] = tag;
    for (int i = 0; i < bytes; i++)
        b[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    put_raw(o, b, (size_t)bytes + 1);
}

static void
put_uint(struct out *o, uint64_t v)
{
    if (v < 0x80)
        put_u8(o, (uint8_t)v);
    else if (v <= 0xff)
        put_be(o, 0xcc, v, 1);
    else if (v <= 0xffff)
        put_be(o, 0xcd, v, 2);
    else if (v <= 0xffffffffULL)
        put_be(o, 0xce, v, 4);
    else
        put_be(o, 0xcf, v, 8);
}

static void
put_int(struct out *o, int64_t v)
{
    if (v >= 0)
        put_uint(o, (uint64_t)v);
    else if (v >= -32)
        put_u8(o, (uint8_t)(int8_t)v);
    else
        put_be(o, 0xd3, (uint64_t)v, 8);
}

static void
put_str(struct out *o, const char *s, size_t n)
{
    if (n < 32)
        put_u8(o, (uint8_t)(0xa0 | n));
    else if (n < 256)
        put_be(o, 0xd9, n, 1);
    else if (n < 65536)
        put_be(o, 0xda, n, 2);
    else
        put_be(o, 0xdb, n, 4);
    put_raw(o, s, n);
}

static void
put_cstr(struct out *o, const char *s)
{
    put_str(o, s, strlen(s));
}

/* Bytes a string of n bytes takes. */
static size_t
str_size(size_t n)
{
    return n + (n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5);
}

/* Whether *s* is valid UTF-8 (msgpack strings must be, and the daemon
 * decodes strictly: no overlong forms, no surrogates, nothing past U+10FFFF). */
static int
utf8_ok(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char b = s[i];
        size_t k;
        unsigned char lo = 0x80, hi = 0xbf; /* the bounds of the second byte */
        if (b < 0x80)
            k = 0;
        else if (b >= 0xc2 && b <= 0xdf)
            k = 1;
        else if (b >= 0xe0 && b <= 0xef) {
            k = 2;
            if (b == 0xe0)
                lo = 0xa0;
            else if (b == 0xed)
                hi = 0x9f;
        } else if (b >= 0xf0 && b <= 0xf4) {
            k = 3;
            if (b == 0xf0)
                lo = 0x90;
            else if (b == 0xf4)
                hi = 0x8f;
        } else
            return 0;
        if (k > n - i - 1)
            return 0;
        if (k > 0 && (s[i + 1] < lo || s[i + 1] > hi))
            return 0;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xc0) != 0x80)
                return 0;
        i += k + 1;
    }
    return 1;
}

static uint64_t
max_request(const struct shadowd *c)
{
    uint64_t m = c->max_request ? c->max_request : MIN_MAX_REQUEST;
    return m < SHADOWD_REQUEST_BUF ? m : SHADOWD_REQUEST_BUF;
}

/* Whether *label* may go with a request that takes *rest* bytes besides. */
static int
label_fits(const struct shadowd *c, const char *label, size_t rest)
{
    if (label == NULL || label[0] != '/')
        return 0;
    size_t n = strlen(label);
    return n <= LABEL_MAX && rest + str_size(n) <= max_request(c) &&
           utf8_ok((const unsigned char *)label, n);
}

static struct out
out_of(struct shadowd *c)
{
    struct out o = {.buf = P(c)->wbuf, .len = 0, .cap = sizeof P(c)->wbuf, .over = 0};
    return o;
}

/* -- reading ------------------------------------------------------------ */

struct in {
    const uint8_t *p, *end;
};

static int
get_be(struct in *r, size_t n, uint64_t *v)
{
    if ((size_t)(r->end - r->p) < n)
        return -1;
    *v = 0;
    for (size_t i = 0; i < n; i++)
        *v = (*v << 8) | r->p[i];
    r->p += n;
    return 0;
}

/* One value's type byte and, for containers and strings, its length. */
enum kind { K_NIL, K_BOOL, K_UINT, K_INT, K_STR, K_BIN, K_ARRAY, K_MAP, K_FLOAT, K_EXT };

static int
get_head(struct in *r, enum kind *k, uint64_t *v)
{
    uint64_t n;
    if (r->p >= r->end)
        return -1;
    uint8_t b = *r->p++;
    if (b < 0x80) { *k = K_UINT; *v = b; return 0; }
    if (b >= 0xe0) { *k = K_INT; *v = (uint64_t)(int64_t)(int8_t)b; return 0; }
    if ((b & 0xf0) == 0x80) { *k = K_MAP; *v = b & 0x0f; return 0; }
    if ((b & 0xf0) == 0x90) { *k = K_ARRAY; *v = b & 0x0f; return 0; }
    if ((b & 0xe0) == 0xa0) { *k = K_STR; *v = b & 0x1f; return 0; }
    switch (b) {
    case 0xc0: *k = K_NIL; *v = 0; return 0;
    case 0xc2: *k = K_BOOL; *v = 0; return 0;
    case 0xc3: *k = K_BOOL; *v = 1; return 0;
    case 0xcc: *k = K_UINT; return get_be(r, 1, v);
    case 0xcd: *k = K_UINT; return get_be(r, 2, v);
    case 0xce: *k = K_UINT; return get_be(r, 4, v);
    case 0xcf: *k = K_UINT; return get_be(r, 8, v);
    /* Signed integers: *v* holds the value's two's complement bits. */
    case 0xd0: *k = K_INT; if (get_be(r, 1, v)) return -1; *v = (uint64_t)(int64_t)(int8_t)*v; return 0;
    case 0xd1: *k = K_INT; if (get_be(r, 2, v)) return -1; *v = (uint64_t)(int64_t)(int16_t)*v; return 0;
    case 0xd2: *k = K_INT; if (get_be(r, 4, v)) return -1; *v = (uint64_t)(int64_t)(int32_t)*v; return 0;
    case 0xd3: *k = K_INT; return get_be(r, 8, v);
    case 0xca: *k = K_FLOAT; *v = 4; return 0;
    case 0xcb: *k = K_FLOAT; *v = 8; return 0;
    case 0xd9: *k = K_STR; return get_be(r, 1, v);
    case 0xda: *k = K_STR; return get_be(r, 2, v);
    case 0xdb: *k = K_STR; return get_be(r, 4, v);
    case 0xc4: *k = K_BIN; return get_be(r, 1, v);
    case 0xc5: *k = K_BIN; return get_be(r, 2, v);
    case 0xc6: *k = K_BIN; return get_be(r, 4, v);
    case 0xdc: *k = K_ARRAY; return get_be(r, 2, v);
    case 0xdd: *k = K_ARRAY; return get_be(r, 4, v);
    case 0xde: *k = K_MAP; return get_be(r, 2, v);
    case 0xdf: *k = K_MAP; return get_be(r, 4, v);
    case 0xd4: *k = K_EXT; *v = 2; return 0;
    case 0xd5: *k = K_EXT; *v = 3; return 0;
    case 0xd6: *k = K_EXT; *v = 5; return 0;
    case 0xd7: *k = K_EXT; *v = 9; return 0;
    case 0xd8: *k = K_EXT; *v = 17; return 0;
    case 0xc7: if (get_be(r, 1, &n)) return -1; *k = K_EXT; *v = n + 1; return 0;
    case 0xc8: if (get_be(r, 2, &n)) return -1; *k = K_EXT; *v = n + 1; return 0;
    case 0xc9: if (get_be(r, 4, &n)) return -1; *k = K_EXT; *v = n + 1; return 0;
    }
    return -1; /* 0xc1: never used */
}

static int
skip_bytes(struct in *r, uint64_t n)
{
    if ((uint64_t)(r->end - r->p) < n)
        return -1;
    r->p += n;
    return 0;
}

/* Skip one value whose head was read. */
static int
skip_body(struct in *r, enum kind k, uint64_t v, int depth)
{
    enum kind k2;
    uint64_t v2;
    switch (k) {
    case K_STR: case K_BIN: case K_FLOAT: case K_EXT:
        return skip_bytes(r, v);
    case K_ARRAY: case K_MAP:
        if (depth >= MAX_DEPTH)
            return -1;
        /* Every element takes at least a byte: a count beyond the datagram is a lie. */
        if ((k == K_MAP ? 2 * v : v) > (uint64_t)(r->end - r->p))
            return -1;
        for (uint64_t i = 0; i < (k == K_MAP ? 2 * v : v); i++) {
            if (get_head(r, &k2, &v2) || skip_body(r, k2, v2, depth + 1))
                return -1;
        }
        return 0;
    default:
        return 0;
    }
}

/* A map key: its bytes, checked to lie within the datagram. */
static int
get_key(struct in *r, const uint8_t **key, uint64_t *len)
{
    enum kind k;
    if (get_head(r, &k, len) || k != K_STR || (uint64_t)(r->end - r->p) < *len)
        return -1;
    *key = r->p;
    r->p += *len;
    return 0;
}

static int
key_is(const uint8_t *s, uint64_t n, const char *key)
{
    return n == strlen(key) && memcmp(s, key, n) == 0;
}

/* The fields a reply, or an item of a batch reply, may hold. */
struct fields {
    int has_id, ok, hit;
    uint64_t id, size;
    const char *code, *message;
    size_t code_len, message_len;
    /* Version 2. Checked only where shadowd/protocol.py checks them: a
     * served reply's version and cached, a miss's filling. */
    int miss;        /* "miss" is true */
    int filling;     /* -1: absent, nil or not a boolean */
    int cached;      /* -1: absent, nil or not a boolean */
    int has_version; /* a "version" that is not nil (well formed or not) */
    int version_bad; /* ... that is not [size, mtime_ns, ctime_ns] */
    struct shadowd_version version;
};

struct reply {
    struct fields f;
    uint64_t version, max_request, max_batch, max_file_size, max_inflight, max_namespace;
    uint64_t racy_window_ns;
    int has_racy_window;
    int hello_version; /* "version" was an unsigned integer (a hello reply's) */
    uint64_t pid, slots; /* an index reply's */
    int has_pid, has_slots;
    struct in results; /* the items of a batch reply */
    uint64_t nresults;
    int has_results;
};

/* A served version: [size, mtime_ns, ctime_ns], an unsigned 64-bit size and
 * signed 64-bit times (as shadowd/protocol.py reads it: integers of any
 * msgpack width within those ranges). 0, or -1 when it is not one (the
 * array is skipped whole either way, so the reader stays in step). */
static int
parse_version(struct in *r, uint64_t n, struct shadowd_version *out, int depth)
{
    int bad = n != 3;
    for (uint64_t i = 0; i < n; i++) {
        enum kind k;
        uint64_t v;
        if (get_head(r, &k, &v))
            return -2;
        if (k != K_UINT && k != K_INT) {
            if (skip_body(r, k, v, depth + 1))
                return -2;
            bad = 1;
            continue;
        }
        if (i == 0) {
            bad |= k == K_INT && (int64_t)v < 0;
            out->size = v;
        } else if (i < 3) {
            bad |= k == K_UINT && v > (uint64_t)INT64_MAX;
            if (i == 1)
                out->mtime_ns = (int64_t)v;
            else
                out->ctime_ns = (int64_t)v;
        }
    }
    return bad ? -1 : 0;
}

/* A field every reply map may have; 1 when *key* was one, 0 when not, -1 bad
 * msgpack. "version" here is a served reply's (an array); a hello's (an
 * unsigned integer) is left to the caller when *top*. */
static int
common_field(struct in *r, const uint8_t *key, uint64_t key_len, enum kind k, uint64_t v,
             struct fields *f, int top)
{
    if (key_is(key, key_len, "ok") && k == K_BOOL)
        f->ok = (int)v;
    else if (key_is(key, key_len, "hit") && k == K_BOOL)
        f->hit = (int)v;
    else if (key_is(key, key_len, "miss") || key_is(key, key_len, "filling") ||
             key_is(key, key_len, "cached")) {
        int b = k == K_BOOL ? (int)v : -1;
        if (k != K_BOOL && skip_body(r, k, v, 2))
            return -1;
        if (key[0] == 'm')
            f->miss = b == 1; /* only true counts, as in protocol.py */
        else if (key[0] == 'f')
            f->filling = b;
        else
            f->cached = b;
    } else if (key_is(key, key_len, "version") && k == K_ARRAY) {
        f->has_version = 1;
        int bad = parse_version(r, v, &f->version, 1);
        if (bad == -2)
            return -1;
        f->version_bad = bad != 0;
        return 1;
    } else if (key_is(key, key_len, "version") && k != K_NIL && !(top && k == K_UINT)) {
        f->has_version = f->version_bad = 1;
        return skip_body(r, k, v, 2) ? -1 : 1;
    }
    else if (key_is(key, key_len, "size") && k == K_UINT)
        f->size = v;
    else if ((key_is(key, key_len, "code") || key_is(key, key_len, "message")) && k == K_STR) {
        if ((uint64_t)(r->end - r->p) < v)
            return -1;
        if (key[0] == 'c') {
            f->code = (const char *)r->p;
            f->code_len = (size_t)v;
        } else {
            f->message = (const char *)r->p;
            f->message_len = (size_t)v;
        }
        r->p += v;
    } else
        return 0;
    return 1;
}

static void
fields_init(struct fields *f)
{
    memset(f, 0, sizeof *f);
    f->ok = f->filling = f->cached = -1;
}

static int
parse_limits(struct in *r, uint64_t n, struct reply *out)
{
    for (uint64_t j = 0; j < n; j++) {
        const uint8_t *name;
        uint64_t name_len, v;
        enum kind k;
        if (get_key(r, &name, &name_len) || get_head(r, &k, &v))
            return -1;
        uint64_t *slot = NULL;
        if (k == K_UINT) {
            if (key_is(name, name_len, "max_request"))
                slot = &out->max_request;
            else if (key_is(name, name_len, "max_batch"))
                slot = &out->max_batch;
            else if (key_is(name, name_len, "max_file_size"))
                slot = &out->max_file_size;
            else if (key_is(name, name_len, "max_inflight"))
                slot = &out->max_inflight;
            else if (key_is(name, name_len, "max_namespace"))
                slot = &out->max_namespace;
            else if (key_is(name, name_len, "racy_window_ns")) {
                slot = &out->racy_window_ns;
                out->has_racy_window = 1;
            }
        }
        if (slot)
            *slot = v;
        else if (skip_body(r, k, v, 2))
            return -1;
    }
    return 0;
}

/* The fields of a reply map that these requests can get. */
static int
parse_reply(const uint8_t *data, size_t len, struct reply *out)
{
    struct in r = {data, data + len};
    enum kind k;
    uint64_t n, v;

    memset(out, 0, sizeof *out);
    fields_init(&out->f);
    if (get_head(&r, &k, &n) || k != K_MAP)
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *key;
        uint64_t key_len;
        if (get_key(&r, &key, &key_len) || get_head(&r, &k, &v))
            return -1;
        int known = common_field(&r, key, key_len, k, v, &out->f, 1);
        if (known < 0)
            return -1;
        if (known)
            continue;
        if (key_is(key, key_len, "id") && k == K_UINT) {
            out->f.has_id = 1;
            out->f.id = v;
        } else if (key_is(key, key_len, "version") && k == K_UINT) {
            out->version = v;
            out->hello_version = 1;
            /* Not a served reply's version: one that carries it is malformed. */
            out->f.has_version = out->f.version_bad = 1;
        } else if (key_is(key, key_len, "pid") && k == K_UINT) {
            out->pid = v;
            out->has_pid = 1;
        } else if (key_is(key, key_len, "slots") && k == K_UINT) {
            out->slots = v;
            out->has_slots = 1;
        } else if (key_is(key, key_len, "limits") && k == K_MAP) {
            if (parse_limits(&r, v, out))
                return -1;
        } else if (key_is(key, key_len, "results") && k == K_ARRAY) {
            out->has_results = 1;
            out->nresults = v;
            out->results.p = r.p;
            if (skip_body(&r, k, v, 1))
                return -1;
            out->results.end = r.p;
        } else if (skip_body(&r, k, v, 1)) {
            return -1;
        }
    }
    return r.p == r.end && out->f.ok >= 0 ? 0 : -1;
}

/* One item of a batch reply's results (already known to be well formed
 * as msgpack, since parse_reply skipped over it). */
static int
parse_item(struct in *r, struct fields *f)
{
    enum kind k;
    uint64_t n, v;
    fields_init(f);
    if (get_head(r, &k, &n) || k != K_MAP)
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *key;
        uint64_t key_len;
        if (get_key(r, &key, &key_len) || get_head(r, &k, &v))
            return -1;
        int known = common_field(r, key, key_len, k, v, f, 0);
        if (known < 0 || (!known && skip_body(r, k, v, 2)))
            return -1;
    }
    return f->ok >= 0 ? 0 : -1;
}

/* A served reply or batch item, well formed in version 2's keys as
 * shadowd/protocol.py reads them: a version, when not nil, is [size,
 * mtime_ns, ctime_ns] and comes with a boolean "cached". (A file dated past
 * 2262 is served without either.) */
static int
served_ok(const struct fields *f)
{
    return !f->has_version || (!f->version_bad && f->cached >= 0);
}

static void
served_of(const struct fields *f, int proto, struct shadowd_served_ *out)
{
    memset(out, 0, sizeof *out);
    out->proto = (uint8_t)proto;
    out->miss = (uint8_t)f->miss;
    out->filling = (uint8_t)(f->miss && f->filling == 1);
    if (!f->miss && f->has_version) {
        out->has_version = 1;
        out->version = f->version;
        out->cached = (uint8_t)(f->cached == 1);
    }
}

static void
refusal_text(char *buf, size_t len, const struct fields *f)
{
    snprintf(buf, len, "shadowd refused: %.*s (%.*s)", (int)f->message_len,
             f->message ? f->message : "", (int)f->code_len, f->code ? f->code : "");
}

static void
code_text(char *buf, size_t len, const struct fields *f)
{
    snprintf(buf, len, "%.*s", (int)f->code_len, f->code ? f->code : "");
}

/* -- the socket rule ----------------------------------------------------- */

static int
is_socket(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

/* The one rule (see shadowd.h); *looked* gets the places looked at. */
static const char *
pick_socket(char *buf, size_t len, char *looked, size_t looked_len)
{
    char cand[2][256];
    int n = 0;
    const char *explicit = getenv("SHADOWD_SOCKET");

    if (looked_len)
        looked[0] = '\0';
    if (explicit && *explicit) {
        snprintf(looked, looked_len, "$SHADOWD_SOCKET");
        return explicit;
    }
    if (geteuid() != 0) {
        /* A relative XDG_RUNTIME_DIR is ignored, as the XDG spec says (and
         * shadowd/paths.py does): it would name a place below the cwd. */
        const char *runtime = getenv("XDG_RUNTIME_DIR");
        int w = runtime && runtime[0] == '/'
                    ? snprintf(cand[n], sizeof cand[n], "%s/shadowd/shadowd.sock", runtime)
                    : snprintf(cand[n], sizeof cand[n], "/run/user/%u/shadowd/shadowd.sock",
                               (unsigned)geteuid());
        if (w > 0 && (size_t)w < sizeof cand[n])
            n++;
    }
    snprintf(cand[n++], sizeof cand[0], "/run/shadowd/shadowd.sock");
    int pick = 0;
    for (int i = 0; i < n; i++) {
        if (is_socket(cand[i])) {
            pick = i;
            break;
        }
    }
    if (looked_len)
        snprintf(looked, looked_len, "%.140s%s%.140s", cand[0], n > 1 ? ", " : "",
                 n > 1 ? cand[1] : "");
    if (strlen(cand[pick]) >= len)
        return NULL;
    return strcpy(buf, cand[pick]);
}

const char *
shadowd_default_socket(char *buf, size_t len)
{
    char looked[8];
    return pick_socket(buf, len, looked, 0);
}

/* -- slots ---------------------------------------------------------------- */

static void
slot_free(struct shadowd_slot_ *s)
{
    if (s->fd >= 0)
        close(s->fd);
    if (s->src >= 0)
        close(s->src);
    memset(s, 0, sizeof *s);
    s->fd = s->src = -1;
}

static struct shadowd_slot_ *
slot_find(struct shadowd *c, uint64_t id)
{
    if (id == 0 || id > 0xffffffffULL)
        return NULL;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++)
        if (P(c)->slots[i].id == (uint32_t)id)
            return &P(c)->slots[i];
    return NULL;
}

static struct shadowd_slot_ *
slot_new(struct shadowd *c, int kind, int owned)
{
    struct shadowd_slot_ *s = NULL;
    for (int i = 0; i < SHADOWD_MAX_PENDING && !s; i++)
        if (P(c)->slots[i].id == 0)
            s = &P(c)->slots[i];
    if (s == NULL) {
        fail(c, "", EAGAIN, "%d requests are pending already", SHADOWD_MAX_PENDING);
        return NULL;
    }
    uint32_t id;
    do { /* ids in 1..2^31-1, never one still pending */
        id = c->next_id ? c->next_id : 1;
        c->next_id = (id + 1) & 0x7fffffff;
    } while (slot_find(c, id));
    memset(s, 0, sizeof *s);
    s->id = id;
    s->kind = (uint8_t)kind;
    s->owned = (uint8_t)owned;
    s->fd = s->src = -1;
    s->seq = ++P(c)->seq;
    s->asked_us = mono_us(); /* (sent right after: what its answer vouches from) */
    return s;
}

/* Whether nobody waits for the reply to *s*: the index asked for without
 * waiting, a report. Such a slot goes with its connection. */
static int
unwaited(const struct shadowd_slot_ *s)
{
    return s->kind == K_INDEX || s->kind == K_REPORT;
}

static void index_drop(struct shadowd *c);
static void report_clear(struct shadowd_private_ *p);

/* -- the connection ------------------------------------------------------- */

/* Drop the connection; every request waiting on it fails with *code* (or
 * "unavailable") and *msg*. The breaker opens (trip, as of *asked_us*)
 * unless the connection merely broke after a good hello (a daemon restart:
 * the next call connects again), or *failure* is F_NONE (we dropped it
 * ourselves). */
static void
drop_connection(struct shadowd *c, long long asked_us, int failure, const char *code,
                const char *msg)
{
    struct shadowd_private_ *p = P(c);
    if (code == NULL || code[0] == '\0')
        code = SHADOWD_UNAVAILABLE;
    int was_working = p->hello == H_DONE;
    if (p->live)
        close(c->sock);
    c->sock = -1;
    p->live = 0;
    p->hello = H_NONE;
    index_drop(c); /* the index is this connection's (another daemon may answer next) */
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        struct shadowd_slot_ *s = &p->slots[i];
        if (s->state == CANCELLED || (s->state == SENT && (s->late || unwaited(s)))) {
            slot_free(s);
        } else if (s->state == SENT) {
            s->state = READY;
            s->failure = failure;
            snprintf(s->code, sizeof s->code, "%s", code);
            snprintf(s->error, sizeof s->error, "%.159s", msg);
        }
    }
    fail(c, code, 0, "%s", msg);
    p->last_failure = failure;
    /* The next daemon may be another (a restart may be an upgrade): say
     * version 2 to it first. */
    if (was_working)
        p->want_version = PROTOCOL;
    if (failure != F_NONE && failure != F_VERSION && (failure != F_BROKEN || !was_working))
        trip(c, msg, asked_us);
}

/* drop_connection, for a failure of the connection as it is now. */
static void fail_connection(struct shadowd *c, int failure, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
fail_connection(struct shadowd *c, int failure, const char *code, const char *fmt, ...)
{
    char msg[sizeof c->error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    drop_connection(c, mono_us(), failure, code, msg);
}

/* The connection of a process we forked from is not ours to use: its
 * replies would go to whichever process reads first. */
static void
after_fork(struct shadowd *c)
{
    int self = current_self();
    if (self == P(c)->self)
        return;
    P(c)->self = self;
    if (P(c)->live) {
        close(c->sock); /* this process's copy; the parent's stays open */
        P(c)->live = 0;
        c->sock = -1;
        P(c)->hello = H_NONE;
        for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
            struct shadowd_slot_ *s = &P(c)->slots[i];
            if (s->state == SENT || s->state == CANCELLED) {
                s->state = s->state == SENT && !s->late && !unwaited(s) ? READY : FREE;
                s->failure = F_BROKEN;
                snprintf(s->code, sizeof s->code, "%s", SHADOWD_UNAVAILABLE);
                snprintf(s->error, sizeof s->error, "sent by the parent process");
                if (s->state == FREE)
                    slot_free(s);
            }
        }
    }
    /* The parent's index and its counts (the parent reports them): this
     * process asks on its own connection (its mapping and descriptor
     * copies go). So with the files copied while the daemon was cold or
     * the index lacked them: the parent tells the daemon of them; this
     * process lets go of its copies of their sources. */
    index_drop(c);
    report_clear(P(c));
    for (int i = 0; i < P(c)->nhint; i++)
        close(P(c)->hint_fd[i]);
    P(c)->nhint = P(c)->hint_used = P(c)->hint_due = 0;
}

static int recv_one(struct shadowd *c);

/* Read every reply that has arrived. */
static void
drain(struct shadowd *c)
{
    while (P(c)->live && recv_one(c) > 0) {
    }
}

/* Send one datagram with *fds*. 0 sent; -1 the connection failed (pending
 * requests failed with it); -2 this request alone failed (errnum set:
 * EAGAIN when the socket is full and *deadline* is 0, EBADF for a bad fd). */
static int
send_request(struct shadowd *c, const struct out *req, const int *fds, int nfds, long long deadline)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = req->buf, .iov_len = req->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};

    if (req->over) {
        fail(c, "", EMSGSIZE, "request too large for this client's buffer");
        return -2;
    }
    if (nfds > 0) {
        memset(control.bytes, 0, sizeof control.bytes);
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    for (;;) {
        if (sendmsg(c->sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0)
            return 0;
        int err = errno;
        if (err == EINTR)
            continue;
        if (err == EAGAIN && deadline > 0) {
            long long left = deadline - mono_us();
            struct pollfd pfd = {.fd = c->sock, .events = POLLOUT};
            if (left > 0 && (poll(&pfd, 1, (int)((left + 999) / 1000)) >= 0 || errno == EINTR))
                continue;
            fail_connection(c, F_TIMEOUT, NULL, "sending a request to shadowd: timed out");
            return -1;
        }
        if (err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ECONNREFUSED) {
            /* A daemon that turns us away answers, then closes: read it. */
            drain(c);
            if (P(c)->live)
                fail_connection(c, F_BROKEN, NULL, "sending a request to shadowd: %s",
                                strerror(err));
            return -1;
        }
        /* Nothing was sent (a datagram goes whole or not at all). */
        fail(c, "", err, "sending a request to shadowd: %s", strerror(err));
        return -2;
    }
}

static int
send_hello(struct shadowd *c)
{
    struct out req = out_of(c);
    put_u8(&req, 0x84);
    put_cstr(&req, "op");
    put_cstr(&req, "hello");
    put_cstr(&req, "id");
    put_uint(&req, 0);
    put_cstr(&req, "version");
    put_uint(&req, (uint64_t)P(c)->want_version);
    put_cstr(&req, "client");
    put_cstr(&req, "shadowd.c/2");
    P(c)->hello = H_SENT;
    int r = send_request(c, &req, NULL, 0, 0);
    if (r == -2)
        fail_connection(c, F_CONNECT, NULL, "sending hello to shadowd: %s", c->error);
    return r ? -1 : 0;
}

/* EACCES at connect, with who the socket lets in when its mode is why: a
 * bare "Permission denied" left a new user guessing (most often the host
 * daemon's socket, which lets in root, or root and a group). Numbers, not
 * names: a user or group lookup may load NSS modules into a supervisor. */
static const char *
access_denied(const char *path, char *buf, size_t len)
{
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISSOCK(st.st_mode) || (st.st_mode & 0002))
        return strerror(EACCES); /* a directory on the way, or not the socket's mode */
    if (st.st_mode & 0020)
        snprintf(buf, len,
                 "%s: the socket is %u:%u, mode %04o: only uid %u and the members of gid %u "
                 "may connect",
                 strerror(EACCES), (unsigned)st.st_uid, (unsigned)st.st_gid,
                 (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid, (unsigned)st.st_gid);
    else
        snprintf(buf, len, "%s: the socket is %u:%u, mode %04o: only uid %u may connect",
                 strerror(EACCES), (unsigned)st.st_uid, (unsigned)st.st_gid,
                 (unsigned)(st.st_mode & 07777), (unsigned)st.st_uid);
    return buf;
}

/* Connect and send hello, as *how* says (CONNECT_*; the hello reply is
 * waited for by the caller). 0 connected, -1 failed, 1 (CONNECT_EARLY
 * only) not connected, nothing failed: the daemon's backlog is full. */
static int
conn_open(struct shadowd *c, int how)
{
    struct shadowd_private_ *p = P(c);
    int blocking = how == CONNECT_WAIT;
    p->connect_later = 0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char pathbuf[sizeof c->socket_path];
    const char *path = c->socket_path;

    if (!p->explicit_path) {
        path = pick_socket(pathbuf, sizeof pathbuf, p->looked, sizeof p->looked);
        if (path == NULL || strlen(path) >= sizeof c->socket_path) {
            fail_connection(c, F_CONNECT, NULL, "socket path too long (%s)", p->looked);
            return -1;
        }
        snprintf(c->socket_path, sizeof c->socket_path, "%s", path);
    }
    if (strlen(c->socket_path) >= sizeof addr.sun_path) {
        fail_connection(c, F_CONNECT, NULL, "socket path too long: %s", c->socket_path);
        return -1;
    }
    strcpy(addr.sun_path, c->socket_path);
    long long start = mono_us();
    long long deadline = start + 1000LL * p->connect_ms;
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | (blocking ? 0 : SOCK_NONBLOCK), 0);
    if (s < 0) {
        int err = errno;
        fail_connection(c, F_CONNECT, NULL, "socket: %s", strerror(err));
        c->errnum = err;
        return -1;
    }
    int rc;
    for (;;) {
        if (blocking) {
            /* The kernel waits in connect() while the daemon's backlog is full. */
            long long left = deadline - mono_us();
            struct timeval tv = {.tv_sec = left > 0 ? left / 1000000 : 0,
                                 .tv_usec = left > 0 ? left % 1000000 : 1};
            setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        }
        rc = connect(s, (struct sockaddr *)&addr, sizeof addr);
        if (rc == 0 || errno != EINTR || mono_us() >= deadline)
            break;
    }
    if (rc < 0 && errno == EAGAIN && how == CONNECT_EARLY) {
        /* A non-blocking connect on AF_UNIX has no EINPROGRESS: while the
         * listener's backlog is full the kernel answers EAGAIN at once, and
         * nothing completes later (unix(7), connect(2)): the socket is
         * useless. That is a daemon busy for a moment, not one that is
         * down: no failure, the breaker stays shut, and the connection is
         * left to shadowd_connect_wait, whose blocking connect the kernel
         * wakes as soon as the daemon accepts, bounded by the connect
         * timeout (with the hello), as shadowd_connect's. Retrying here
         * would stall a caller that asked not to wait (a supervisor about
         * to fork) or, without waiting, most likely find the backlog full
         * again; connect_wait is where the caller has chosen to wait. */
        close(s);
        p->connect_later = 1;
        c->errnum = EAGAIN;
        return 1;
    }
    if (rc < 0) {
        int err = errno;
        close(s);
        char denied[128];
        const char *why = err == EAGAIN || err == EINPROGRESS || err == EINTR
                              ? (blocking ? "timed out" : "its backlog is full")
                          : err == EACCES ? access_denied(c->socket_path, denied, sizeof denied)
                                          : strerror(err);
        if (p->explicit_path || p->looked[0] == '\0' || strcmp(p->looked, "$SHADOWD_SOCKET") == 0)
            fail_connection(c, F_CONNECT, NULL, "connecting to shadowd at %s: %s", c->socket_path,
                            why);
        else
            fail_connection(c, F_CONNECT, NULL, "connecting to shadowd at %s: %s (looked at %s)",
                            c->socket_path, why, p->looked);
        c->errnum = err;
        return -1;
    }
    if (blocking) {
        int fl = fcntl(s, F_GETFL);
        fcntl(s, F_SETFL, fl | O_NONBLOCK);
    }
    c->sock = s;
    p->live = 1;
    p->hello_deadline = deadline;
    /* max_file_size and racy_window_ns (with racy_known) stay the last
     * hello's until this one answers: a routed open made meanwhile (the
     * first after a breaker's window connects without waiting) routes by
     * them, not by nothing, which would ask the daemon for files it refuses
     * or will not cache. A daemon that comes back is most likely run as it
     * was; its hello says otherwise if not. */
    c->max_request = c->max_batch = c->max_inflight = c->max_namespace = 0;
    c->protocol = 0;
    return send_hello(c);
}

/* The earliest deadline anyone waits for, or with *latest* the latest
 * (0: none). */
static long long
owed_deadline(struct shadowd *c, int latest)
{
    long long until = P(c)->hello == H_SENT ? P(c)->hello_deadline : 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        const struct shadowd_slot_ *s = &P(c)->slots[i];
        if ((s->state == SENT || s->state == CANCELLED) && s->deadline > 0 &&
            (until == 0 || (latest ? s->deadline > until : s->deadline < until)))
            until = s->deadline;
    }
    return until;
}

/* Whether anything on the connection is overdue at *now*. */
static int
overdue(struct shadowd *c, long long now)
{
    if (P(c)->hello == H_SENT && now >= P(c)->hello_deadline)
        return 1;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        const struct shadowd_slot_ *s = &P(c)->slots[i];
        if ((s->state == SENT || s->state == CANCELLED) && s->deadline > 0 && now >= s->deadline)
            return 1;
    }
    return 0;
}

/* Fail the connection when anything on it is overdue: 1 when it did. */
static int
check_deadlines(struct shadowd *c, long long now)
{
    if (!P(c)->live || !overdue(c, now))
        return 0;
    /* A reply that came but was not read yet (nobody waited for it: a
     * report, a told-later batch) is not late: read what is there first. */
    drain(c);
    if (!P(c)->live)
        return 1;
    if (P(c)->hello == H_SENT && now >= P(c)->hello_deadline) {
        fail_connection(c, F_TIMEOUT, NULL, "no hello reply from shadowd: timed out after %d ms",
                        P(c)->connect_ms);
        return 1;
    }
    /* The breaker goes by the latest of them asked: one asked after its
     * window ended is a retry that failed. */
    long long asked = 0;
    int found = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        const struct shadowd_slot_ *s = &P(c)->slots[i];
        if ((s->state == SENT || s->state == CANCELLED) && s->deadline > 0 && now >= s->deadline) {
            asked = found && asked > s->asked_us ? asked : s->asked_us;
            found = 1;
        }
    }
    if (!found)
        return 0;
    drop_connection(c, asked, F_TIMEOUT, NULL, "waiting for shadowd's reply: timed out");
    return 1;
}

/* Wait until *done*(c, arg) or the connection fails; deadlines enforced. */
static void
wait_until(struct shadowd *c, int (*done)(struct shadowd *, const void *), const void *arg)
{
    while (P(c)->live && !done(c, arg)) {
        long long now = mono_us();
        if (check_deadlines(c, now))
            break;
        long long until = owed_deadline(c, 0);
        int ms = until ? (int)((until - now + 999) / 1000) : CEILING_MS;
        struct pollfd pfd = {.fd = c->sock, .events = POLLIN};
        int r = poll(&pfd, 1, ms < 0 ? 0 : ms);
        if (r < 0 && errno != EINTR) {
            fail_connection(c, F_BROKEN, NULL, "poll: %s", strerror(errno));
            break;
        }
        if (r > 0)
            drain(c);
    }
}

static int
hello_done(struct shadowd *c, const void *arg)
{
    (void)arg;
    return P(c)->hello == H_DONE;
}

static int
slot_done(struct shadowd *c, const void *arg)
{
    (void)c;
    return ((const struct shadowd_slot_ *)arg)->state != SENT;
}

/* Ready to send a request: the breaker allows it, connected (as *how*
 * says: CONNECT_*), and (when CONNECT_WAIT) the hello answered. 0, or -1
 * with the error set; 1 when CONNECT_EARLY found the backlog full. */
static int
start(struct shadowd *c, int how)
{
    after_fork(c);
    /* A caller that submits without collecting still learns of a hung daemon. */
    check_deadlines(c, mono_us());
    if (gate(c))
        return -1;
    if (!P(c)->live) {
        int r = conn_open(c, how);
        if (r != 0)
            return r;
    }
    if (how == CONNECT_WAIT && P(c)->hello != H_DONE) {
        wait_until(c, hello_done, NULL);
        /* A daemon of version 1 refused our version 2: greet it in 1. */
        if (P(c)->hello != H_DONE && !P(c)->live && P(c)->last_failure == F_VERSION) {
            if (conn_open(c, CONNECT_WAIT))
                return -1;
            wait_until(c, hello_done, NULL);
        }
        if (P(c)->hello != H_DONE)
            return -1;
    }
    return 0;
}

/* When a reply to a request sent now is overdue. One that may wait while
 * the daemon copies the file gets time per MiB besides (see shadowd.h). */
static long long
reply_deadline(struct shadowd *c, uint64_t size, int may_wait)
{
    long long ms = P(c)->reply_ms;
    if (may_wait)
        ms += (long long)((size >> 20) * (uint64_t)P(c)->reply_ms_per_mib);
    if (ms > CEILING_MS)
        ms = CEILING_MS;
    return mono_us() + 1000LL * ms;
}

/* Whether a request that asks not to wait says so: in version 2 only (the
 * hello we sent says 2, and the daemon did not answer it with 1). */
static int
says_nowait(const struct shadowd *c, int nowait)
{
    return nowait && P(c)->want_version >= 2 && !(P(c)->hello == H_DONE && c->protocol < 2);
}

/* The daemon answered our hello with version 1: requests sent with it that
 * asked not to wait may wait on its copy after all; give them the time. */
static void
v1_deadlines(struct shadowd *c)
{
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        struct shadowd_slot_ *s = &P(c)->slots[i];
        if ((s->state == SENT || s->state == CANCELLED) && s->nowait) {
            s->nowait = 0;
            s->deadline += 1000LL * (long long)((s->src_size >> 20) *
                                                (uint64_t)P(c)->reply_ms_per_mib);
        }
    }
}

/* -- replies -------------------------------------------------------------- */

static int
sealed(int fd)
{
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & REQUIRED_SEALS) == REQUIRED_SEALS;
}

/* Why a descriptor the daemon sent is refused, or NULL: it must be sealed
 * and open read-only, as the protocol promises (and the Python client
 * checks). A read-write one is what a daemon would send that handed out
 * its cache's own memfd (memfd_create's descriptor), whose offset it and
 * every holder share; a write-only one could not even be read. */
static const char *
served_refusal(int fd)
{
    if (!sealed(fd))
        return "shadowd sent a descriptor that is not sealed; refused it";
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDONLY)
        return "shadowd sent a descriptor not open read-only; refused it";
    /* A new open file description starts at offset 0, and the daemon never
     * reads through the one it sends. Elsewhere it is one that another
     * holder moved: shared (a dup, or one description sent to several), so
     * the tracee's reads would move under it. (A shared one nobody moved
     * yet looks the same as a new one from here: see client/c/README.md.) */
    if (lseek(fd, 0, SEEK_CUR) != 0)
        return "shadowd sent a descriptor whose offset is not 0 (a description another "
               "holder shares); refused it";
    return NULL;
}

/* Why the daemon's *fd*, served for a source whose version before the
 * request was *before* (the caller's own fstat, or this client's just
 * before it asked), is not that version, or NULL (written to *buf*). A
 * reply that says its version (*f*) must say *before*'s; and the fd itself
 * must hold before's size, which is all a reply without a version can be
 * checked by (version 1's, a file dated past 2262). With *size_only* the
 * size alone (a private file: its key's). A version other than the
 * caller's is never handed out as if it were that one: it is the bytes
 * of another version (stale, when the daemon is wrong; newer, when the
 * file changed between the two fstats), which the caller's own stat of
 * the source does not describe. */
static const char *
served_other(int fd, const struct shadowd_version_ *before, int size_only, const struct fields *f,
             char *buf, size_t len)
{
    struct stat st;
    if (!size_only && f->has_version && !f->version_bad &&
        (f->version.size != before->size || f->version.mtime_ns != before->mtime_ns ||
         f->version.ctime_ns != before->ctime_ns)) {
        snprintf(buf, len,
                 "shadowd served version [%llu, %lld, %lld], not the caller's [%llu, %lld, "
                 "%lld]; refused it",
                 (unsigned long long)f->version.size, (long long)f->version.mtime_ns,
                 (long long)f->version.ctime_ns, (unsigned long long)before->size,
                 (long long)before->mtime_ns, (long long)before->ctime_ns);
        return buf;
    }
    if (fstat(fd, &st) < 0)
        st.st_size = -1;
    if ((uint64_t)st.st_size != before->size) {
        snprintf(buf, len, "shadowd served %lld bytes for a file of %llu; refused it",
                 (long long)st.st_size, (unsigned long long)before->size);
        return buf;
    }
    return NULL;
}

static int
batch_reply(struct shadowd *c, struct shadowd_slot_ *s, const struct reply *rep, int *fds,
            int nfds, int proto)
{
    struct fields f;
    struct in r = rep->results;
    int served = 0;
    for (uint64_t i = 0; i < rep->nresults; i++) {
        if (parse_item(&r, &f))
            goto bad;
        /* As protocol.py: an item that missed (v2) has no fd and says
         * whether the daemon fills; a served one's version is well formed. */
        if (f.ok == 1 && (f.miss ? f.filling < 0 : !served_ok(&f)))
            goto bad;
        served += f.ok == 1 && !f.miss;
    }
    if (rep->nresults != (uint64_t)s->nitems || served != nfds)
        goto bad;
    r = rep->results;
    int next = 0;
    for (int i = 0; i < s->nitems; i++) {
        struct shadowd_item *it = &s->items[s->map ? s->map[i] : i];
        struct shadowd_served_ sv;
        parse_item(&r, &f);
        it->size = f.size;
        it->hit = f.hit;
        if (f.ok != 1) {
            code_text(it->code, sizeof it->code, &f);
            refusal_text(s->error, sizeof s->error, &f);
            continue;
        }
        served_of(&f, proto, &sv);
        it->miss = sv.miss;
        it->filling = sv.filling;
        it->cached = sv.cached;
        it->has_version = sv.has_version;
        it->version = sv.version;
        if (f.miss) {
            it->code[0] = '\0';
            continue;
        }
        int fd = fds[next++];
        const char *refused = served_refusal(fd);
        if (refused != NULL) {
            close(fd);
            it->code[0] = '\0';
            snprintf(s->error, sizeof s->error, "%s", refused);
            continue;
        }
        if (s->befores != NULL &&
            served_other(fd, &s->befores[i], 0, &f, s->error, sizeof s->error) != NULL) {
            close(fd);
            snprintf(it->code, sizeof it->code, "unstable");
            c->counts.other_version++;
            continue;
        }
        it->fd = fd;
        it->route = SHADOWD_ROUTE_DAEMON;
        it->code[0] = '\0';
    }
    return 0;
bad:
    close_fds(fds, nfds);
    s->failure = F_BAD;
    snprintf(s->code, sizeof s->code, "%s", SHADOWD_UNAVAILABLE);
    snprintf(s->error, sizeof s->error, "bad batch reply from shadowd");
    return -1;
}

static void cold_saw(struct shadowd *c, const struct shadowd_version_ *v, int filling_miss);
static int may_keep(int src, const struct shadowd_version_ *before,
                    const struct shadowd_served_ *sv, int hit, uint64_t served_size);
static void index_take(struct shadowd *c, const struct reply *rep, int *fds, int nfds);
static int held_put(struct shadowd *c, int served, const struct shadowd_version_ *v,
                    long long vouched_us);

/* Put one reply where it belongs. -1 when it failed the connection.
 * *dropped*: the kernel dropped descriptors the reply carried, for want of
 * a number in this process (EMFILE): the reply's request fails with that,
 * the caller's own error, and the connection stays. */
static int
dispatch(struct shadowd *c, const struct reply *rep, int *fds, int nfds, int dropped)
{
    struct shadowd_private_ *p = P(c);
    const struct fields *f = &rep->f;
    const char *refused;
    char text[200], code[32];

    if (dropped && (!f->has_id || (p->hello == H_SENT && f->id == 0))) {
        /* Neither a refusal nor a hello reply carries a descriptor. */
        close_fds(fds, nfds);
        fail_connection(c, F_BAD, NULL, "bad reply from shadowd (descriptors where none go)");
        return -1;
    }
    if (!f->has_id) {
        close_fds(fds, nfds);
        code_text(code, sizeof code, f);
        refusal_text(text, sizeof text, f);
        /* Refused before any id could be read (at accept, or a datagram
         * the daemon could not read): it closes the connection. */
        fail_connection(c, f->ok == 0 ? F_REFUSED : F_BAD, f->ok == 0 ? code : NULL, "%s",
                        f->ok == 0 ? text : "reply without an id from shadowd");
        return -1;
    }
    if (p->hello == H_SENT && f->id == 0) {
        if (f->ok == 1 && nfds == 0 && rep->hello_version && rep->version >= 1 &&
            rep->version <= (uint64_t)p->want_version) {
            c->protocol = (int)rep->version;
            c->racy_window_ns = c->protocol >= 2 && rep->has_racy_window ? rep->racy_window_ns : 0;
            p->racy_known = c->protocol >= 2 && rep->has_racy_window;
            c->max_request = rep->max_request ? rep->max_request : 65536;
            c->max_batch = rep->max_batch ? rep->max_batch : 1;
            if (c->max_batch > MAX_FDS)
                c->max_batch = MAX_FDS;
            c->max_file_size = rep->max_file_size;
            c->max_inflight = rep->max_inflight;
            c->max_namespace = rep->max_namespace ? rep->max_namespace : 255;
            p->hello = H_DONE;
            if (c->protocol < 2)
                v1_deadlines(c);
            recovered(c);
            return 0;
        }
        close_fds(fds, nfds);
        if (f->ok == 0) {
            code_text(code, sizeof code, f);
            refusal_text(text, sizeof text, f);
            if (strcmp(code, "unsupported-version") == 0 && p->want_version > 1) {
                /* A daemon of version 1: greet it again in 1 (start does,
                 * on a new connection: it closes this one). */
                p->want_version = 1;
                fail_connection(c, F_VERSION, NULL, "%s", text);
                return -1;
            }
            fail_connection(c, F_REFUSED, code, "%s", text);
        } else if (f->ok == 1 && nfds == 0 && rep->hello_version) {
            /* A version we do not speak (0, or above the one we said: a
             * daemon of a newer major version): nothing is asked of it. */
            char spoken[24] = "1";
            if (p->want_version > 1)
                snprintf(spoken, sizeof spoken, "1 to %d", p->want_version);
            fail_connection(c, F_BAD, NULL,
                            "shadowd answered hello with protocol version %llu; "
                            "this client speaks %s",
                            (unsigned long long)rep->version, spoken);
        } else {
            fail_connection(c, F_BAD, NULL, "unexpected hello reply from shadowd");
        }
        return -1;
    }
    struct shadowd_slot_ *s = slot_find(c, f->id);
    if (s == NULL || (s->state != SENT && s->state != CANCELLED)) {
        close_fds(fds, nfds);
        fail_connection(c, F_BAD, NULL, "shadowd answered another request (%llu, not pending)",
                        (unsigned long long)f->id);
        return -1;
    }
    s->answered_us = mono_us(); /* (timed, for the latency breaker, by whoever waited) */
    if (dropped) {
        /* Read whole and matched to its request: the connection is in step.
         * The descriptors that did come are closed (the reply is not handed
         * out whole); nothing of it is the daemon's fault. */
        close_fds(fds, nfds);
        if (s->kind == K_INDEX && s->state == SENT) {
            slot_free(s);
            p->index_state = IX_NONE; /* asked again: the daemon has one for us */
            return 0;
        }
        if (s->state == CANCELLED || s->kind == K_REPORT || s->late) {
            slot_free(s); /* nobody waits for it */
            return 0;
        }
        s->state = READY;
        s->fd = -1;
        s->failure = F_REQUEST;
        s->errnum = EMFILE;
        s->code[0] = '\0';
        snprintf(s->error, sizeof s->error,
                 "shadowd's reply carried a descriptor this process had no number left "
                 "for (MSG_CTRUNC): %s",
                 strerror(EMFILE));
        return 0;
    }
    if (s->kind == K_INDEX && s->state == SENT) {
        slot_free(s);
        index_take(c, rep, fds, nfds); /* closes the fds */
        return 0;
    }
    if (s->state == CANCELLED || s->kind == K_REPORT) {
        close_fds(fds, nfds); /* nobody will collect it */
        slot_free(s);
        return 0;
    }
    if (f->ok == 1 && s->kind != K_BATCH) {
        /* Version 2's keys, checked as protocol.py checks them. */
        int miss = s->kind == K_OPEN && f->miss;
        if (miss ? nfds != 0 || f->filling < 0 : !served_ok(f)) {
            close_fds(fds, nfds);
            fail_connection(c, F_BAD, NULL, "bad reply from shadowd (%s)",
                            miss ? "a miss with fds or without filling"
                                 : "its version is not [size, mtime_ns, ctime_ns] with cached");
            return -1;
        }
    }
    if (s->late) {
        /* A routed open copied the file before this answer came: a served
         * version the daemon cached fills the tier for the next open. */
        struct shadowd_served_ sv;
        served_of(f, c->protocol, &sv);
        if (f->ok == 1 && s->kind == K_OPEN && !f->miss && nfds == 1 &&
            served_refusal(fds[0]) == NULL &&
            served_other(fds[0], &s->before, 0, f, text, sizeof text) == NULL &&
            may_keep(s->src, &s->before, &sv, f->hit, f->size))
            held_put(c, fds[0], &s->before, s->asked_us);
        /* A miss it is filling says the daemon is cold, whenever it comes. */
        if (f->ok == 1 && s->kind == K_OPEN && s->routed)
            cold_saw(c, &s->before, f->miss && f->filling == 1);
        close_fds(fds, nfds);
        slot_free(s);
        return 0;
    }
    s->state = READY;
    s->hit = f->hit;
    s->size = f->size;
    served_of(f, c->protocol, &s->served);
    if (f->ok != 1) {
        close_fds(fds, nfds);
        s->failure = F_REQUEST;
        code_text(s->code, sizeof s->code, f);
        refusal_text(s->error, sizeof s->error, f);
    } else if (s->kind == K_BATCH) {
        if (batch_reply(c, s, rep, fds, nfds, c->protocol) < 0) {
            fail_connection(c, F_BAD, NULL, "bad batch reply from shadowd");
            return -1;
        }
    } else if (s->kind == K_LOOKUP && !f->hit && nfds == 0) {
        s->fd = -1; /* a miss */
    } else if (s->kind == K_OPEN && f->miss) {
        s->fd = -1; /* a miss not waited for (v2): the daemon fills its cache */
    } else if (nfds != 1) {
        close_fds(fds, nfds);
        s->failure = F_REQUEST;
        snprintf(s->error, sizeof s->error, "shadowd's reply carried %d fds, not 1", nfds);
    } else if ((refused = served_refusal(fds[0])) != NULL) {
        snprintf(s->error, sizeof s->error, "%s", refused);
        close(fds[0]);
        s->failure = F_REQUEST;
    } else if (s->check &&
               served_other(fds[0], &s->before, s->check == 2, f, s->error, sizeof s->error)) {
        /* Not the caller's version: the routed calls copy the file here
         * (which reads it as it is now), the others fail. Nothing of the
         * daemon's is broken (the file may have changed in between): the
         * breaker stays shut. */
        close(fds[0]);
        s->failure = F_REQUEST;
        snprintf(s->code, sizeof s->code, "unstable");
        c->counts.other_version++;
    } else {
        s->fd = fds[0];
    }
    return 0;
}

/* Whether *fd* is a file of shmem (a memfd) or hugetlbfs: only they answer
 * F_GET_SEALS, and their close waits on nobody. */
static int
shmem(int fd)
{
    return fcntl(fd, F_GET_SEALS) >= 0;
}

static void *
close_in_thread(void *arg)
{
    close((int)(intptr_t)arg);
    return NULL;
}

/* Close *fd*, one the daemon sent that is no memfd, on a detached thread of
 * its own: closing a file runs its file system's flush, which for a file
 * of a FUSE mount waits for the mount's server, and a daemon's own mount
 * need never answer (attack 47: the caller waited for good). A thread per
 * descriptor: a close takes the number out of the process's table before
 * it waits, where a descriptor left open would be flushed by the exec (or
 * exit) of every child forked later. The thread blocks every signal, so
 * that none meant for the process waits on it. Where no thread can be made
 * the descriptor is left open. */
static void
close_apart(int fd)
{
    sigset_t all, before;
    pthread_attr_t attr;
    pthread_t t;
    if (pthread_attr_init(&attr) != 0)
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before);
    pthread_create(&t, &attr, close_in_thread, (void *)(intptr_t)fd);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    pthread_attr_destroy(&attr);
}

/* Read one datagram without waiting: 1 handled, 0 nothing there, -1 the
 * connection is gone. */
static int
recv_one(struct shadowd *c)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = P(c)->rbuf, .iov_len = sizeof P(c)->rbuf};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.bytes,
        .msg_controllen = sizeof control.bytes,
    };
    int fds[MAX_FDS], nfds = 0, reset = 0;
    struct reply rep;
    ssize_t n;

    for (;;) {
        n = recvmsg(c->sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == ECONNRESET && !reset) {
            /* A daemon that closed with a request of ours unread (one sent
             * behind a hello it refused, as version 1 refuses ours) is
             * reported as a reset before the answers it sent first, which
             * are still here: read them (the refusal says what to do). */
            reset = 1;
            continue;
        }
        break;
    }
    if (n < 0 || (reset && n == 0 && msg.msg_controllen == 0)) {
        int err = n < 0 && !(reset && errno == EAGAIN) ? errno : ECONNRESET;
        if (err == EAGAIN)
            return 0;
        fail_connection(c, F_BROKEN, NULL, "waiting for shadowd's reply: %s", strerror(err));
        return -1;
    }
    if (msg.msg_controllen > 0) {
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (count > MAX_FDS - nfds)
                count = MAX_FDS - nfds;
            memcpy(fds + nfds, CMSG_DATA(cm), sizeof(int) * (size_t)count);
            nfds += count;
        }
    }
    if (n == 0 && nfds == 0) {
        fail_connection(c, F_BROKEN, NULL, "shadowd closed the connection");
        return -1;
    }
    /* Every descriptor the protocol sends is a memfd; anything else is
     * refused before its close can hold the caller (close_apart). */
    for (int i = 0; i < nfds; i++) {
        if (!shmem(fds[i])) {
            for (int j = 0; j < nfds; j++) {
                if (shmem(fds[j]))
                    close(fds[j]);
                else
                    close_apart(fds[j]);
            }
            fail_connection(c, F_BAD, NULL, "shadowd sent a descriptor that is no memfd; refused it");
            return -1;
        }
    }
    /* MSG_CTRUNC with room left for more descriptors than came: the kernel
     * had no number to give this process for the next one (its
     * RLIMIT_NOFILE) and dropped the rest, not the daemon sending too many
     * (those would fill the buffer). */
    int dropped = (msg.msg_flags & MSG_CTRUNC) && nfds < MAX_FDS;
    if ((msg.msg_flags & MSG_TRUNC) || ((msg.msg_flags & MSG_CTRUNC) && !dropped) ||
        parse_reply(P(c)->rbuf, (size_t)n, &rep)) {
        close_fds(fds, nfds);
        fail_connection(c, F_BAD, NULL, "bad reply from shadowd");
        return -1;
    }
    return dispatch(c, &rep, fds, nfds, dropped) < 0 ? -1 : 1;
}

/* -- requests ------------------------------------------------------------- */

/* What a request is: built into *o* with its id; its fds; the bytes its
 * reply may wait for (for the timeout). */
struct request {
    int kind;
    int (*build)(struct shadowd *c, struct out *o, uint32_t id, const struct request *rq);
    const int *fds;
    int nfds;
    uint64_t size;
    const char *label;                  /* open */
    const char *const *labels;          /* batch, indexed through map */
    const int *map;                     /* batch: item index of each fd */
    struct shadowd_item *items;         /* batch */
    const char *ns;                     /* lookup, publish */
    const struct shadowd_key *key;      /* lookup, publish */
    int nowait;                         /* open, batch: "wait": false in version 2 */
    int noserve;                        /* batch with nowait: "serve": false too */
    /* What a served fd must be (served_other): the source's version before
     * the request (open; lookup and publish: its size alone, size_only),
     * or each fd's (batch, in the order of fds). NULL: not checked. */
    const struct shadowd_version_ *before;
    const struct shadowd_version_ *befores;
    int size_only;
};

static int
build_open(struct shadowd *c, struct out *o, uint32_t id, const struct request *rq)
{
    /* Without the label the map takes at most 23 bytes; "path" 5 more. */
    int with_label = label_fits(c, rq->label, 28);
    int nowait = says_nowait(c, rq->nowait);
    put_u8(o, (uint8_t)(0x82 + with_label + nowait));
    put_cstr(o, "op");
    put_cstr(o, "open");
    put_cstr(o, "id");
    put_uint(o, id);
    if (with_label) {
        put_cstr(o, "path");
        put_cstr(o, rq->label);
    }
    if (nowait) { /* the key order of docs/protocol.md's example */
        put_cstr(o, "wait");
        put_u8(o, 0xc2);
    }
    return 0;
}

static int
build_batch(struct shadowd *c, struct out *o, uint32_t id, const struct request *rq)
{
    /* Labels go while the request stays within max_request; the others nil
     * ("serve": false is 7 bytes more). */
    size_t used = 46 + (rq->noserve ? 7 : 0) + (size_t)rq->nfds;
    int nowait = says_nowait(c, rq->nowait), noserve = nowait && rq->noserve;
    put_u8(o, (uint8_t)(0x83 + nowait + noserve));
    put_cstr(o, "op");
    put_cstr(o, "open_batch");
    put_cstr(o, "id");
    put_uint(o, id);
    put_cstr(o, "paths");
    if (rq->nfds < 16)
        put_u8(o, (uint8_t)(0x90 | rq->nfds));
    else
        put_be(o, 0xdc, (uint64_t)rq->nfds, 2);
    for (int i = 0; i < rq->nfds; i++) {
        const char *label = rq->labels ? rq->labels[rq->map[i]] : NULL;
        if (label_fits(c, label, used)) {
            put_cstr(o, label);
            used += str_size(strlen(label)) - 1;
        } else {
            put_u8(o, 0xc0);
        }
    }
    if (nowait) {
        put_cstr(o, "wait");
        put_u8(o, 0xc2);
    }
    if (noserve) { /* only telling: no fd for what the daemon holds */
        put_cstr(o, "serve");
        put_u8(o, 0xc2);
    }
    return 0;
}

static int
build_private(struct shadowd *c, struct out *o, uint32_t id, const struct request *rq)
{
    (void)c;
    put_u8(o, 0x84);
    put_cstr(o, "op");
    put_cstr(o, rq->kind == K_LOOKUP ? "lookup" : "publish");
    put_cstr(o, "id");
    put_uint(o, id);
    put_cstr(o, "namespace");
    put_cstr(o, rq->ns);
    put_cstr(o, "key");
    put_u8(o, 0x84);
    put_cstr(o, "ino");
    put_uint(o, rq->key->ino);
    put_cstr(o, "size");
    put_uint(o, rq->key->size);
    put_cstr(o, "mtime_ns");
    put_int(o, rq->key->mtime_ns);
    put_cstr(o, "ctime_ns");
    if (rq->key->has_ctime)
        put_int(o, rq->key->ctime_ns);
    else
        put_u8(o, 0xc0);
    return 0;
}

/* Send *rq* on the connection there is (the caller called start). The slot,
 * or NULL: then *failure* says how it failed (error set). */
static struct shadowd_slot_ *
submit(struct shadowd *c, const struct request *rq, int owned, int *failure)
{
    struct shadowd_slot_ *s = slot_new(c, rq->kind, owned);
    *failure = F_REQUEST;
    if (s == NULL)
        return NULL;
    struct out o = out_of(c);
    rq->build(c, &o, s->id, rq);
    s->items = rq->items;
    s->map = rq->map;
    s->befores = rq->befores;
    if (rq->before != NULL) {
        s->before = *rq->before;
        s->check = rq->size_only ? 2 : 1;
    }
    s->nitems = rq->nfds;
    s->src_size = rq->size;
    /* A publish may wait while the daemon copies a memfd it cannot seal. */
    s->nowait = (uint8_t)says_nowait(c, rq->nowait);
    s->deadline = reply_deadline(c, rq->size, !s->nowait); /* v1_deadlines may extend it */
    /* Owned requests never wait in send: a full socket fails them now. */
    int r = send_request(c, &o, rq->fds, rq->nfds, owned ? 0 : s->deadline);
    if (r == 0) {
        s->state = SENT;
        return s;
    }
    *failure = r == -1 ? P(c)->last_failure : F_REQUEST;
    slot_free(s);
    return NULL;
}

/* One request and its reply, blocking: a connection that broke is made
 * again once. 0 with *res* the reply's slot (copied; its fd is now the
 * caller's), or -1 with the error set when there was no reply. */
static int
call(struct shadowd *c, const struct request *rq, struct shadowd_slot_ *res)
{
    clear(c);
    for (int attempt = 0; attempt < 2; attempt++) {
        int fresh = !P(c)->live;
        int failure;
        if (start(c, CONNECT_WAIT))
            return -1;
        struct shadowd_slot_ *s = submit(c, rq, 0, &failure);
        if (s != NULL) {
            wait_until(c, slot_done, s);
            timed(c, s);
            *res = *s;
            s->fd = -1; /* handed over in *res */
            slot_free(s);
            failure = res->failure;
            if (failure == F_NONE || failure == F_REQUEST) {
                snprintf(c->code, sizeof c->code, "%s", res->code);
                snprintf(c->error, sizeof c->error, "%s", res->error);
                c->errnum = res->errnum;
                return 0;
            }
            snprintf(c->code, sizeof c->code, "%s", res->code);
            snprintf(c->error, sizeof c->error, "%s", res->error);
        }
        if (failure != F_BROKEN && failure != F_VERSION)
            return -1;
        if (failure == F_BROKEN && (fresh || attempt == 1)) {
            /* Even a new connection broke: the daemon is not usable. */
            trip(c, c->error, mono_us());
            return -1;
        }
        /* The connection we had broke (the daemon restarted?): once more. */
    }
    return -1;
}

/* What a reply said beyond the fd, into the last-call fields of *c*. */
static void
say_served(struct shadowd *c, const struct shadowd_served_ *sv)
{
    c->miss = sv->miss;
    c->filling = sv->filling;
    c->cached = sv->cached;
    c->has_version = sv->has_version;
    c->version = sv->version;
}

/* The daemon's fd for *src*, whose version before the request is *before*
 * (the caller's own fstat: an fd of another version is refused), or -1
 * (error set); *sv* what the reply said. With *nowait* (version 2), a miss is -1
 * with c->miss set and no error. */
static int
ask_daemon(struct shadowd *c, int src, const char *label, const struct shadowd_version_ *before,
           int nowait, struct shadowd_served_ *sv)
{
    struct shadowd_slot_ res;
    struct request rq = {.kind = K_OPEN, .build = build_open, .fds = &src, .nfds = 1,
                         .size = before->size, .label = label, .nowait = nowait,
                         .before = before};
    memset(sv, 0, sizeof *sv);
    if (call(c, &rq, &res))
        return -1;
    *sv = res.served;
    say_served(c, sv);
    if (res.fd < 0) {
        if (res.served.miss && res.failure == F_NONE)
            return -1; /* not an error: copy it */
        if (res.error[0] == '\0')
            fail(c, "", 0, "shadowd sent no descriptor");
        return -1;
    }
    c->size = res.size;
    c->hit = res.hit;
    c->route = SHADOWD_ROUTE_DAEMON;
    c->counts.daemon++;
    return res.fd;
}

int
shadowd_set_socket(struct shadowd *c, const char *socket_path)
{
    ready(c);
    clear(c);
    if (socket_path != NULL) {
        if (strlen(socket_path) >= sizeof c->socket_path) {
            fail(c, "", ENAMETOOLONG, "socket path too long: %s", socket_path);
            return -1;
        }
        memmove(c->socket_path, socket_path, strlen(socket_path) + 1);
        P(c)->explicit_path = 1;
    } else {
        P(c)->explicit_path = 0;
    }
    return 0;
}

int
shadowd_connect(struct shadowd *c, const char *socket_path)
{
    if (shadowd_set_socket(c, socket_path) < 0)
        return -1;
    if (P(c)->live)
        fail_connection(c, F_NONE, NULL, "shadowd_connect replaced the connection");
    clear(c);
    return start(c, CONNECT_WAIT);
}

struct proof;
static int index_hit(struct shadowd *c, const struct stat *st, struct proof *pr);
static int ask_once(struct shadowd *c, int src, const char *label, const struct stat *st);
static void version_of(const struct stat *st, struct shadowd_version_ *v);

int
shadowd_open_fd(struct shadowd *c, int src, const char *label)
{
    struct stat st;
    ready(c);
    clear(c);
    if (own_fstat(c, src, &st) < 0)
        return -1;
    if (P(c)->index_use && S_ISREG(st.st_mode)) {
        /* A hit through the daemon's index: the same fd, no round trip. */
        after_fork(c);
        int fd = index_hit(c, &st, NULL);
        if (fd >= 0)
            return fd;
    }
    return ask_once(c, src, label, &st);
}

/* The request of shadowd_open_fd and shadowd_request_fd, of the file whose
 * fstat just before it is *st*: a served fd of another version is refused
 * ("unstable"). */
static int
ask_once(struct shadowd *c, int src, const char *label, const struct stat *st)
{
    struct shadowd_served_ sv;
    struct shadowd_version_ v;
    version_of(st, &v);
    int fd = ask_daemon(c, src, label, &v, 0, &sv);
    if (fd < 0 && c->miss && c->error[0] == '\0')
        fail(c, "", 0, "shadowd answered a miss without a descriptor"); /* asked to wait */
    return fd;
}

int
shadowd_request_fd(struct shadowd *c, int src, const char *label)
{
    struct stat st;
    ready(c);
    clear(c);
    return own_fstat(c, src, &st) < 0 ? -1 : ask_once(c, src, label, &st);
}

int
shadowd_open(struct shadowd *c, const char *path)
{
    ready(c);
    int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (src < 0) {
        fail(c, "", errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    int fd = shadowd_open_fd(c, src, path);
    close(src);
    return fd;
}

/* One batch request of n <= max_batch fds, whose sources' versions before
 * it are *befores*; items[map[i]] filled. */
static void
batch_once(struct shadowd *c, const int *fds, const char *const *labels, const int *map, int n,
           const struct shadowd_version_ *befores, struct shadowd_item *items, int nowait)
{
    struct shadowd_slot_ res;
    uint64_t size = 0;
    for (int k = 0; k < n; k++)
        size += befores[k].size;
    struct request rq = {.kind = K_BATCH, .build = build_batch, .fds = fds, .nfds = n,
                         .size = size, .labels = labels, .map = map, .items = items,
                         .nowait = nowait, .befores = befores};
    memset(&res, 0, sizeof res);
    int rc = call(c, &rq, &res);
    if (rc == 0 && res.failure == F_NONE)
        return;
    /* No reply, the whole request refused, or its descriptors dropped at
     * our fd limit (errnum, no code): every item says why. */
    for (int i = 0; i < n; i++) {
        struct shadowd_item *it = &items[map[i]];
        if (it->fd >= 0 || it->code[0] != '\0')
            continue;
        if (rc == 0 && res.code[0] == '\0' && res.errnum)
            it->errnum = res.errnum;
        else
            snprintf(it->code, sizeof it->code, "%s", c->code[0] ? c->code : SHADOWD_UNAVAILABLE);
    }
}

static void
item_init(struct shadowd_item *it)
{
    memset(it, 0, sizeof *it);
    it->fd = -1;
}

/* Send the daemon-bound items (fds[k] for items[map[k]], its source's
 * version before the request befores[k]) in batches. */
static void
batch_send(struct shadowd *c, const int *fds, const char *const *labels, const int *map, int n,
           const struct shadowd_version_ *befores, struct shadowd_item *items, int nowait)
{
    int done = 0;
    while (done < n) {
        if (start(c, CONNECT_WAIT)) {
            for (int k = done; k < n; k++)
                snprintf(items[map[k]].code, sizeof items[map[k]].code, "%s", c->code);
            return;
        }
        int chunk = n - done;
        if ((uint64_t)chunk > c->max_batch)
            chunk = (int)c->max_batch;
        batch_once(c, fds + done, labels, map + done, chunk, befores + done, items, nowait);
        done += chunk;
    }
}

int
shadowd_open_batch(struct shadowd *c, const int *srcs, const char *const *labels, int n,
                   struct shadowd_item *items)
{
    int fds[MAX_FDS], map[MAX_FDS];
    struct shadowd_version_ vs[MAX_FDS];
    int served = 0, k = 0;

    ready(c);
    clear(c);
    if (n < 0) {
        fail(c, "", EINVAL, "a batch of %d files", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        item_init(&items[i]);
        struct stat st;
        /* No fstat of its own, nothing to check a served fd against: not asked. */
        if (srcs[i] < 0 || fstat(srcs[i], &st) < 0) {
            items[i].errnum = srcs[i] < 0 ? EBADF : errno;
            continue;
        }
        fds[k] = srcs[i];
        map[k] = i;
        version_of(&st, &vs[k]);
        if (++k == MAX_FDS || i == n - 1) {
            batch_send(c, fds, labels, map, k, vs, items, 0);
            k = 0;
        }
    }
    if (k > 0)
        batch_send(c, fds, labels, map, k, vs, items, 0);
    for (int i = 0; i < n; i++) {
        served += items[i].fd >= 0;
        c->counts.daemon += items[i].fd >= 0;
    }
    return served;
}

/* -- private files -------------------------------------------------------- */

static int
check_ns(struct shadowd *c, const char *ns)
{
    size_t n = ns ? strlen(ns) : 0;
    uint64_t most = c->max_namespace ? c->max_namespace : 255;
    if (n == 0 || n > most || !utf8_ok((const unsigned char *)ns, n)) {
        fail(c, "", EINVAL, "a namespace is 1 to %llu bytes of UTF-8", (unsigned long long)most);
        return -1;
    }
    return 0;
}

static int
private_call(struct shadowd *c, int kind, const char *ns, const struct shadowd_key *key, int memfd,
             int *miss)
{
    struct shadowd_slot_ res;
    struct shadowd_version_ want = {.size = key->size}; /* (its size alone is checked) */
    struct request rq = {.kind = kind, .build = build_private, .fds = &memfd,
                         .nfds = kind == K_PUBLISH ? 1 : 0, .size = key->size, .ns = ns,
                         .key = key, .before = &want, .size_only = 1};
    *miss = 0;
    if (check_ns(c, ns) || call(c, &rq, &res))
        return -1;
    if (res.fd < 0) {
        *miss = kind == K_LOOKUP && res.failure == F_NONE;
        if (!*miss && res.error[0] == '\0')
            fail(c, "", 0, "shadowd sent no descriptor");
        return -1;
    }
    c->size = res.size;
    c->hit = res.hit;
    c->route = SHADOWD_ROUTE_DAEMON;
    c->counts.daemon++;
    return res.fd;
}

int
shadowd_lookup(struct shadowd *c, const char *ns, const struct shadowd_key *key)
{
    int miss;
    ready(c);
    int fd = private_call(c, K_LOOKUP, ns, key, -1, &miss);
    if (miss) {
        c->hit = 0;
        return SHADOWD_MISS;
    }
    return fd;
}

int
shadowd_publish(struct shadowd *c, const char *ns, const struct shadowd_key *key, int memfd)
{
    int miss;
    ready(c);
    return private_call(c, K_PUBLISH, ns, key, memfd, &miss);
}

/* -- local copies ---------------------------------------------------------- */

/* A new memfd that allows sealing, executable iff *executable*. */
static int
new_memfd(int executable)
{
    /* Whether the kernel knows MFD_EXEC/MFD_NOEXEC_SEAL (6.3+): 0 unknown. */
    static int exec_flags = 0;
    unsigned base = MFD_CLOEXEC | MFD_ALLOW_SEALING;
    if (exec_flags >= 0) {
        int fd = memfd_create("shadowd", base | (executable ? MFD_EXEC : MFD_NOEXEC_SEAL));
        if (fd >= 0) {
            exec_flags = 1;
            return fd;
        }
        if (errno != EINVAL || exec_flags == 1)
            return -1;
        exec_flags = -1;
    }
    /* An old kernel: the memfd starts as mode 0777; seal_memfd narrows it. */
    return memfd_create("shadowd", base);
}

/* Mode r-x or r--, then the four seals (F_SEAL_EXEC first where known).
 * EBUSY (pages pinned for a moment right after the copy, or a writable
 * mapping) is tried again over 70 ms. */
static int
seal_memfd(int fd, int executable)
{
    static const long delays_ms[] = {10, 20, 40};
    if (fchmod(fd, executable ? 0555 : 0444) < 0)
        return -1;
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_EXEC) < 0 && errno != EINVAL)
        return -1;
    for (size_t i = 0;; i++) {
        if (fcntl(fd, F_ADD_SEALS, REQUIRED_SEALS) == 0)
            return 0;
        if (errno != EBUSY || i == sizeof delays_ms / sizeof delays_ms[0])
            return -1;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = delays_ms[i] * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        }
    }
}

/* A new read-only open file description of *fd*'s file (its own offset).
 * With *c*, relative to its O_PATH fd of /proc/self/fd: no walk through
 * /proc and self (0.7 us of 2.6 here). That fd names the directory of the
 * process that opened it, so a forked child opens its own. */
/* *n* in decimal into *buf* (at least 12 bytes); the string. (snprintf
 * costs a tenth of a hit's own time.) */
static const char *
decimal(char *buf, int n)
{
    char *p = buf + 11;
    unsigned v = n < 0 ? 0u - (unsigned)n : (unsigned)n;
    *p = '\0';
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (n < 0)
        *--p = '-';
    return p;
}

/* A new open file description of what our *fd* is, opened with *flags*
 * through /proc/self/fd (the very inode, not a path that may have changed),
 * for the process whose current_self() is *self* (the caller just asked). */
static int
reopen_flags(struct shadowd *c, int fd, int self, int flags)
{
    char path[32];
    if (c != NULL) {
        struct shadowd_private_ *p = P(c);
        if (p->procfd >= 0 && p->procfd_self != self) {
            close(p->procfd); /* a forked child's copy of its parent's */
            p->procfd = -1;
        }
        if (p->procfd < 0) {
            p->procfd = open("/proc/self/fd", O_PATH | O_DIRECTORY | O_CLOEXEC);
            p->procfd_self = self;
        }
        if (p->procfd >= 0)
            return openat(p->procfd, decimal(path, fd), flags);
    }
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return open(path, flags);
}

/* reopen_readonly for the process whose current_self() is *self*. */
static int
reopen_as(struct shadowd *c, int fd, int self)
{
    return reopen_flags(c, fd, self, O_RDONLY | O_CLOEXEC);
}

static int
reopen_readonly(struct shadowd *c, int fd)
{
    return reopen_as(c, fd, current_self());
}

/* Copy exactly *size* bytes of *src* from offset 0 into *dst*. 0; 1 when
 * the source holds fewer or more bytes (it changed); -1 error. With *stop*,
 * the bytes go in chunks of RACE_CHUNK and stop(arg) is asked after each:
 * when it says so, the copy ends there with 2. */
static int
copy_bytes(int dst, int src, uint64_t size, int (*stop)(void *), void *arg)
{
    off_t off = 0;
    int use_pread = 0;
    char buf[65536];
    while ((uint64_t)off < size) {
        size_t most = stop ? RACE_CHUNK : 0x7ffff000;
        size_t want = size - (uint64_t)off > most ? most : (size_t)(size - (uint64_t)off);
        ssize_t n;
        if (!use_pread) {
            n = sendfile(dst, src, &off, want);
            if (n < 0 && (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
                use_pread = 1; /* a file system that cannot splice */
                continue;
            }
        } else {
            n = pread(src, buf, want < sizeof buf ? want : sizeof buf, off);
            if (n > 0) {
                for (ssize_t done = 0; done < n;) {
                    ssize_t w = pwrite(dst, buf + done, (size_t)(n - done), off + done);
                    if (w < 0 && errno == EINTR)
                        continue;
                    if (w < 0)
                        return -1;
                    done += w;
                }
                off += n;
            }
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            return 1; /* ended early */
        if (stop && stop(arg))
            return 2;
    }
    /* One more byte means the file is longer than its stat said. */
    char extra;
    ssize_t more;
    do {
        more = pread(src, &extra, 1, (off_t)size);
    } while (more < 0 && errno == EINTR);
    return more < 0 ? -1 : more > 0;
}

static int
same_stat(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* Seal *memfd* (filled, read-write) and return a read-only reopen of it;
 * *memfd* is closed either way. */
static int
finish_copy(struct shadowd *c, int memfd, int executable, const char *what)
{
    int fd = -1;
    if (seal_memfd(memfd, executable) == 0)
        fd = reopen_readonly(c, memfd);
    if (fd < 0)
        fail(c, "", errno, "%s: %s", what, strerror(errno));
    close(memfd);
    return fd;
}

/* One local copy of the regular file open at *src*, whose fstat is *st*:
 * 0 with *out* a sealed read-only fd; 1 when the source changed under the
 * copy (look again); 2 when *stop* ended it; -1 on failure (error set). */
static int
copy_attempt(struct shadowd *c, int src, const struct stat *st, int (*stop)(void *), void *arg,
             int *out)
{
    struct stat after;
    int executable = (st->st_mode & 0111) != 0;
    int memfd = new_memfd(executable);
    if (memfd < 0) {
        fail(c, "", errno, "memfd_create: %s", strerror(errno));
        return -1;
    }
    int r = copy_bytes(memfd, src, (uint64_t)st->st_size, stop, arg);
    if (r < 0) {
        int err = errno;
        close(memfd);
        fail(c, "", err, "copying the file: %s", strerror(err));
        return -1;
    }
    if (r == 0 && fstat(src, &after) == 0 && same_stat(st, &after)) {
        *out = finish_copy(c, memfd, executable, "sealing the copy");
        return *out >= 0 ? 0 : -1;
    }
    close(memfd);
    return r == 2 ? 2 : 1;
}

int
shadowd_copy_fd(struct shadowd *c, int src)
{
    struct stat st;
    if (c)
        ready(c);
    if (own_fstat(c, src, &st) < 0)
        return -1;
    if (!S_ISREG(st.st_mode)) {
        /* The refusal the daemon gives, so callers handle one code. */
        fail(c, "not-regular", EINVAL, "only regular files are served; this is not one");
        return -1;
    }
    for (int attempt = 0; attempt < 3; attempt++) {
        int fd = -1;
        int r = copy_attempt(c, src, &st, NULL, NULL, &fd);
        if (r <= 0)
            return r == 0 ? fd : -1;
        /* It changed under the copy: look again, copy again. */
        if (own_fstat(c, src, &st) < 0)
            return -1;
    }
    fail(c, "", EAGAIN, "the file kept changing while it was copied");
    return -1;
}

/* -- private files, routed ------------------------------------------------ */

int
shadowd_open_private(struct shadowd *c, const char *ns, const struct shadowd_key *key,
                     int executable, shadowd_fill_fn fill, void *arg)
{
    int miss = 0, fd = -1, asked = 0;
    struct stat st;

    ready(c);
    clear(c);
    if (check_ns(c, ns))
        return -1;
    if (shadowd_available(c)) {
        asked = 1;
        fd = private_call(c, K_LOOKUP, ns, key, -1, &miss);
        if (fd >= 0)
            return fd;
    } else {
        c->counts.fast++;
    }
    int memfd = new_memfd(executable);
    if (memfd < 0) {
        fail(c, "", errno, "memfd_create: %s", strerror(errno));
        return -1;
    }
    if (fill(arg, memfd) != 0) {
        int err = errno;
        close(memfd);
        fail(c, "", err, "the fill callback failed: %s", strerror(err));
        return -1;
    }
    if (fstat(memfd, &st) < 0) {
        int err = errno;
        close(memfd);
        fail(c, "", err, "fstat of the filled memfd: %s", strerror(err));
        return -1;
    }
    if ((uint64_t)st.st_size != key->size) {
        close(memfd);
        fail(c, "size-mismatch", 0, "fill wrote %lld bytes; the key says %llu",
             (long long)st.st_size, (unsigned long long)key->size);
        return -1;
    }
    if (asked && miss) {
        fd = private_call(c, K_PUBLISH, ns, key, memfd, &miss);
        if (fd >= 0) {
            close(memfd);
            return fd;
        }
    }
    /* The daemon cannot help: seal it here. A memfd that cannot be sealed
     * (fill kept a writable mapping) is copied first, as the daemon would. */
    clear(c);
    c->route = SHADOWD_ROUTE_COPY;
    c->hit = 0;
    c->size = key->size;
    c->counts.copied++;
    if (seal_memfd(memfd, executable) == 0) {
        fd = reopen_readonly(c, memfd);
        close(memfd);
        if (fd < 0)
            fail(c, "", errno, "reopening the sealed file: %s", strerror(errno));
        return fd;
    }
    int copy = new_memfd(executable);
    if (copy < 0 || copy_bytes(copy, memfd, key->size, NULL, NULL) != 0) {
        int err = errno;
        if (copy >= 0)
            close(copy);
        close(memfd);
        fail(c, "", err, "copying the private file: %s", strerror(err));
        return -1;
    }
    close(memfd);
    return finish_copy(c, copy, executable, "sealing the private file");
}

/* -- the process-local tier ------------------------------------------------ */

/* A timestamp in ns, as the version compares it: modulo 2^64 where it does
 * not fit an int64 (a file dated past 2262, or before 1677, on a file system
 * that keeps such times: an owner's utimensat, a FUSE server's answer).
 * Computed unsigned, where a wrap is defined: signed, it was an overflow the
 * C standard leaves undefined. Distinct times stay distinct (they would have
 * to be 2^55 s apart to meet), and the daemon says no version for such a
 * file, so only its size and this client's own fstats are compared. */
static int64_t
ts_ns(const struct timespec *t)
{
    return (int64_t)((uint64_t)t->tv_sec * 1000000000ULL + (uint64_t)t->tv_nsec);
}

static void
version_of(const struct stat *st, struct shadowd_version_ *v)
{
    v->dev = (uint64_t)st->st_dev;
    v->ino = (uint64_t)st->st_ino;
    v->size = (uint64_t)st->st_size;
    v->mtime_ns = ts_ns(&st->st_mtim);
    v->ctime_ns = ts_ns(&st->st_ctim);
}

/* The tier's index: open addressing over twice as many buckets as entries
 * (so never full), linear probing; a bucket holds an entry's position + 1,
 * 0 when empty. Finding a file costs a hash and a probe or two, however
 * many files are held. */
#define INDEX_SIZE (2 * SHADOWD_HELD_SLOTS)
#define INDEX_MASK (INDEX_SIZE - 1)
typedef char held_slots_are_a_power_of_two[(SHADOWD_HELD_SLOTS & (SHADOWD_HELD_SLOTS - 1)) == 0 &&
                                                   SHADOWD_HELD_SLOTS < 32768
                                               ? 1
                                               : -1];

static unsigned
held_home(uint64_t dev, uint64_t ino)
{
    uint64_t h = (ino ^ (dev * 0x9e3779b97f4a7c15ULL)) * 0xff51afd7ed558ccdULL;
    return (unsigned)(h >> 40) & INDEX_MASK;
}

/* The bucket of (dev, ino), or the empty one where it would go. */
static unsigned
held_bucket(const struct shadowd_private_ *p, uint64_t dev, uint64_t ino)
{
    unsigned b = held_home(dev, ino);
    for (;;) {
        unsigned e = p->held_index[b];
        if (e == 0 || (p->held[e - 1].ino == ino && p->held[e - 1].dev == dev))
            return b;
        b = (b + 1) & INDEX_MASK;
    }
}

/* Empty bucket *b*, moving back the entries after it that probed past it. */
static void
index_remove(struct shadowd_private_ *p, unsigned b)
{
    unsigned hole = b;
    p->held_index[hole] = 0;
    for (unsigned j = (hole + 1) & INDEX_MASK; p->held_index[j] != 0; j = (j + 1) & INDEX_MASK) {
        const struct shadowd_held_ *h = &p->held[p->held_index[j] - 1];
        unsigned home = held_home(h->dev, h->ino);
        /* It stays unless its home lies cyclically in (hole, j]. */
        if (((j - home) & INDEX_MASK) >= ((j - hole) & INDEX_MASK)) {
            p->held_index[hole] = p->held_index[j];
            p->held_index[j] = 0;
            hole = j;
        }
    }
}

/* The entry of (dev, ino), or -1. */
static int
held_find(const struct shadowd_private_ *p, uint64_t dev, uint64_t ino)
{
    unsigned e = p->held_index[held_bucket(p, dev, ino)];
    return e == 0 ? -1 : (int)e - 1;
}

static void relay_release(struct shadowd *c);

static void
held_drop(struct shadowd *c, int i)
{
    struct shadowd_private_ *p = P(c);
    index_remove(p, held_bucket(p, p->held[i].dev, p->held[i].ino));
    if (p->relay_of == p->held[i].fd)
        relay_release(c); /* nothing of ours pins a memfd the tier let go */
    close(p->held[i].fd);
    p->held_bytes -= p->held[i].size;
    int last = --p->nheld;
    if (i != last) {
        /* The last entry moves into the gap; its bucket follows it (found
         * by its data, still in place at *last*). */
        p->held[i] = p->held[last];
        p->held_index[held_bucket(p, p->held[i].dev, p->held[i].ino)] = (uint16_t)(i + 1);
    }
}

/* Evict least recently used entries until one more of *room* bytes fits. */
static void
held_trim(struct shadowd *c, uint64_t room)
{
    struct shadowd_private_ *p = P(c);
    int extra = room > 0;
    while (p->nheld > 0 && (p->nheld + extra > p->held_max ||
                            p->held_bytes + room > (uint64_t)p->held_max_bytes)) {
        int oldest = 0;
        for (int i = 1; i < p->nheld; i++)
            if (p->held[i].used < p->held[oldest].used)
                oldest = i;
        held_drop(c, oldest);
    }
}

static int
same_version(const struct shadowd_held_ *h, const struct shadowd_version_ *v)
{
    return h->size == v->size && h->mtime_ns == v->mtime_ns && h->ctime_ns == v->ctime_ns;
}

static int held_index_usable(struct shadowd *c, long long now);
static int index_names(const struct shadowd_private_ *p, const struct shadowd_held_ *h);

/* Whether exactly version *v* is held, and the daemon still vouches for
 * that memfd (then it counts as just used): its index, while one is held,
 * must name it now; without one, the daemon must have served it (or its
 * index named it) less than held_recheck_us ago. An entry of the same file
 * in another version is dropped (it will never be right again), and so is
 * one the daemon no longer vouches for (the open goes on down the tiers,
 * and what the daemon serves is kept again). */
static int
held_has(struct shadowd *c, const struct shadowd_version_ *v)
{
    struct shadowd_private_ *p = P(c);
    if (p->nheld == 0)
        return 0;
    long long now = mono_us();
    /* First: it may read replies, and late answers may change the tier. */
    int by_index = held_index_usable(c, now);
    int i = held_find(p, v->dev, v->ino);
    if (i < 0)
        return 0;
    struct shadowd_held_ *h = &p->held[i];
    if (!same_version(h, v) ||
        (by_index ? !index_names(p, h) : now - h->vouched_us >= p->held_recheck_us)) {
        held_drop(c, i);
        return 0;
    }
    if (by_index && p->index_alive_us > h->vouched_us)
        h->vouched_us = p->index_alive_us;
    h->used = ++p->clock;
    return 1;
}

/* -- the proof of access of an O_PATH source ------------------------------ */

/* faccessat2 (Linux 5.8): its number where glibc's headers may lack it. */
#if !defined(SYS_faccessat2) && (defined(__x86_64__) || defined(__aarch64__) || defined(__riscv))
#define SYS_faccessat2 439
#endif

/* Set once faccessat2 said it cannot make the check (ENOSYS before Linux
 * 5.8, EINVAL where AT_EMPTY_PATH or AT_EACCESS is not known, EPERM from a
 * seccomp filter): the read-open proves every hit from then on. */
static int access_check_missing;

/* What a call given an O_PATH descriptor of the source knows of the
 * caller's right to read it (shadowd_open_routed_opath). */
struct proof {
    int at;     /* the caller's fd of the file: O_PATH (or any fd that names it) */
    int src;    /* our read-only open of it, once one was made; else -1 */
    int state;  /* 0: not checked yet; 1: may read it; -1: may not (errnum) */
    int errnum;
};

/* Open the file *pr* names for reading, as a supervisor would open it:
 * through /proc/self/fd of the caller's descriptor (the very inode it
 * statted, never a path), O_NONBLOCK and O_NOCTTY as for any source. The
 * fd, kept in pr->src, or -1 with errno. */
static int
proof_open(struct shadowd *c, struct proof *pr)
{
    if (pr->src >= 0)
        return pr->src;
    pr->src = reopen_flags(c, pr->at, P(c)->self, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (pr->src >= 0)
        c->counts.read_opens++;
    return pr->src;
}

/* Whether the caller may read the file: 1, or 0 (pr->errnum says why).
 * With *pr* NULL the caller opened the file for reading itself: proved.
 * Otherwise faccessat2(at, "", R_OK, AT_EMPTY_PATH | AT_EACCESS) on the
 * caller's descriptor: the permission check open makes (the file's mode,
 * ACLs, the file system's own permission method, the LSMs' inode
 * permission hook), with the credentials open uses (fsuid, fsgid, the
 * effective capabilities: AT_EACCESS), and nothing else of open (no LSM
 * file_open hook, no fanotify permission event, no file system open: see
 * client/c/README.md). Whenever it says no, or cannot say, the file is
 * opened for reading instead, and that open decides. */
static int
may_read(struct shadowd *c, struct proof *pr)
{
    if (pr == NULL)
        return 1;
    if (pr->state != 0)
        return pr->state > 0;
#ifdef SYS_faccessat2
    if (!__atomic_load_n(&access_check_missing, __ATOMIC_RELAXED)) {
        if (syscall(SYS_faccessat2, pr->at, "", R_OK, AT_EMPTY_PATH | AT_EACCESS) == 0) {
            pr->state = 1;
            return 1;
        }
        if (errno == ENOSYS || errno == EINVAL || errno == EPERM)
            __atomic_store_n(&access_check_missing, 1, __ATOMIC_RELAXED);
    }
#endif
    if (proof_open(c, pr) >= 0) {
        pr->state = 1;
        return 1;
    }
    pr->state = -1;
    pr->errnum = errno;
    return 0;
}

/* The tier's reopen of its memfd *memfd*, as reopen_as makes it, through
 * one descriptor number of its own, always the same (p->relay): *memfd* is
 * duplicated onto it (dup3), then /proc/self/fd/RELAY is opened. Opening
 * /proc/self/fd/N for an N this process has not opened through yet makes
 * the kernel build that name's dentry and inode; the tier's memfds have
 * as many numbers as files, each reopened about once per process, so
 * that cost came with nearly every hit: 7.4-7.9 us a reopen under `pip
 * --version` with preload against 3.2-3.8 us through one number, and 3-10
 * us against 1.2 us for the first pass over 500 memfds in a loop
 * (docs/performance.md, "The O_PATH source and the held tier's reopen").
 * The relay duplicates the memfd last reopened until the next reopen of
 * another (the same one again needs no dup3), or until the tier lets that
 * memfd go (relay_release). */
static int
held_reopen(struct shadowd *c, int memfd)
{
    struct shadowd_private_ *p = P(c);
    if (p->relay >= 0 && p->relay_self != p->self) {
        close(p->relay); /* a forked child's copy of its parent's */
        p->relay = p->relay_of = -1;
    }
    if (p->relay < 0) {
        p->relay = fcntl(memfd, F_DUPFD_CLOEXEC, 0);
        p->relay_self = p->self;
    } else if (p->relay_of != memfd && dup3(memfd, p->relay, O_CLOEXEC) < 0) {
        close(p->relay); /* (already that memfd: the same file reopened again) */
        p->relay = -1;
    }
    if (p->relay < 0) {
        p->relay_of = -1;
        return reopen_as(c, memfd, p->self);
    }
    p->relay_of = memfd;
    return reopen_as(c, p->relay, p->self);
}

/* The relay no longer duplicates a memfd of the tier: /proc/self/fd (the
 * procfd) takes its number, which stays ours, so that its name in /proc
 * stays built; closed when there is no procfd. */
static void
relay_release(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    p->relay_of = -1;
    if (p->relay < 0)
        return;
    if (p->relay_self == p->self && p->procfd >= 0 && p->procfd_self == p->self &&
        dup3(p->procfd, p->relay, O_CLOEXEC) >= 0)
        return;
    close(p->relay);
    p->relay = -1;
}

/* A reopen of the held memfd of exactly version *v*, or -1; with *pr*,
 * only once may_read says the caller may read the file (pr->state -1
 * otherwise). */
static int
held_take(struct shadowd *c, const struct shadowd_version_ *v, struct proof *pr)
{
    struct shadowd_private_ *p = P(c);
    if (!held_has(c, v) || !may_read(c, pr))
        return -1;
    int i = held_find(p, v->dev, v->ino);
    /* No seal check: seals belong to the inode, this one's were checked
     * when the daemon's fd came, and F_SEAL_SEAL lets nobody take one off. */
    int fd = held_reopen(c, p->held[i].fd); /* (the routed calls ran after_fork) */
    if (fd < 0)
        held_drop(c, i);
    return fd;
}

/* Keep the daemon's *served* fd of version *v* (a duplicate of it: the
 * tier only ever reopens it, so the shared offset does not matter), which
 * the daemon vouched for at *vouched_us* (mono_us: when the request left,
 * or the index was read). The memfd held already, in this version, is only
 * vouched for again. 1 when kept. */
static int
held_put(struct shadowd *c, int served, const struct shadowd_version_ *v, long long vouched_us)
{
    struct shadowd_private_ *p = P(c);
    struct stat m;
    if (p->held_max <= 0 || v->size > (uint64_t)p->held_max_bytes || fstat(served, &m) < 0)
        return 0;
    int64_t m_ctime = ts_ns(&m.st_ctim);
    int old = held_find(p, v->dev, v->ino);
    if (old >= 0 && same_version(&p->held[old], v) &&
        p->held[old].memfd_dev == (uint64_t)m.st_dev &&
        p->held[old].memfd_ino == (uint64_t)m.st_ino && p->held[old].memfd_ctime_ns == m_ctime) {
        struct shadowd_held_ *h = &p->held[old];
        if (vouched_us > h->vouched_us)
            h->vouched_us = vouched_us;
        h->used = ++p->clock;
        return 1;
    }
    if (old >= 0)
        held_drop(c, old); /* another version, or another memfd of it: the new fd */
    held_trim(c, v->size ? v->size : 1);
    if (p->nheld >= p->held_max)
        return 0;
    int fd = fcntl(served, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int i = p->nheld++;
    struct shadowd_held_ *h = &p->held[i];
    h->dev = v->dev;
    h->ino = v->ino;
    h->size = v->size;
    h->mtime_ns = v->mtime_ns;
    h->ctime_ns = v->ctime_ns;
    h->fd = fd;
    h->memfd_dev = (uint64_t)m.st_dev;
    h->memfd_ino = (uint64_t)m.st_ino;
    h->memfd_ctime_ns = m_ctime;
    h->vouched_us = vouched_us;
    h->used = ++p->clock;
    p->held_bytes += v->size;
    p->held_index[held_bucket(p, v->dev, v->ino)] = (uint16_t)(i + 1);
    return 1;
}

/* Whether the daemon's fd, served for the file open at *src* whose version
 * before the request was *before*, may go into the tier. Version 2 says
 * which version the fd holds and whether the daemon cached it: kept when
 * cached and that version is *before* (the caller's own fstat: ctime
 * cannot go back, so a rewrite with the old mtime put back is another
 * version). A version 2 reply without a version (a file dated past 2262)
 * is not kept. Version 1 says neither: a hit is kept when the caller's
 * fstat after the reply is still *before*, since then nothing changed in
 * between and the daemon's cached version is exactly *before*. */
static int
may_keep(int src, const struct shadowd_version_ *before, const struct shadowd_served_ *sv,
         int hit, uint64_t served_size)
{
    if (sv->has_version)
        return sv->cached && sv->version.size == before->size &&
               sv->version.mtime_ns == before->mtime_ns &&
               sv->version.ctime_ns == before->ctime_ns;
    if (sv->proto >= 2 || !hit)
        return 0;
    struct stat st;
    struct shadowd_version_ after;
    if (src < 0 || fstat(src, &st) < 0)
        return 0;
    version_of(&st, &after);
    return memcmp(&after, before, sizeof after) == 0 && served_size == before->size;
}

static void
served_of_item(const struct shadowd_item *it, int proto, struct shadowd_served_ *sv)
{
    memset(sv, 0, sizeof *sv);
    sv->proto = (uint8_t)proto;
    sv->miss = (uint8_t)it->miss;
    sv->filling = (uint8_t)it->filling;
    sv->cached = (uint8_t)it->cached;
    sv->has_version = (uint8_t)it->has_version;
    sv->version = it->version;
}

/* -- the index: hits without a round trip --------------------------------- */

/* The layout of docs/protocol.md, "The index" (little-endian). */
#define INDEX_MAGIC "SHDWIDX1"
#define INDEX_LAYOUT 2 /* 2: the slot key keys index_home */
#define INDEX_HEADER 4096
#define INDEX_SLOT 128
#define INDEX_LIVE 1
#define INDEX_MAX_SLOTS (1u << 24) /* 2 GiB of slots: anything larger is not an index */
#define INDEX_MAX_PROBES 64
/* The open of a number in the range: a memfd at every instant, by the
 * daemon's promise. Should a daemon bug break it (a number closed, then
 * given to a FIFO it received), O_NONBLOCK keeps a FIFO's open from waiting
 * for a writer and O_NOCTTY a terminal's from becoming ours; the fstat then
 * refuses either. O_NOCTTY is not kept in the open file description;
 * O_NONBLOCK is (F_GETFL shows it, a tracee would too), so a served fd has
 * it cleared (F_SETFL 0: one more system call, measured in
 * docs/performance.md). */
#define INDEX_RANGE_FLAGS (O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define INDEX_READABLE 1
#else
#define INDEX_READABLE 0 /* the slots' integers would read wrong: no index here */
#endif


struct index_slot {
    uint32_t seq, state;
    uint64_t dev, ino, size;
    int64_t mtime_ns, ctime_ns;
    int32_t fd;
    uint32_t mode;
    uint64_t memfd_ino;
    int64_t memfd_ctime_ns;
};
typedef char index_slot_is_the_documented_layout
    [offsetof(struct index_slot, dev) == 8 && offsetof(struct index_slot, mtime_ns) == 32 &&
             offsetof(struct index_slot, fd) == 48 && offsetof(struct index_slot, memfd_ino) == 56 &&
             offsetof(struct index_slot, memfd_ctime_ns) == 64 && sizeof(struct index_slot) <= INDEX_SLOT
         ? 1
         : -1];

/* The daemon writes slots while we read them: every read of a slot is an
 * atomic load (relaxed; seq's first with acquire, its second after a
 * fence), so the compiler neither tears nor reorders them. */
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* splitmix64's finaliser: a 64-bit bijection with full avalanche. */
static uint64_t
mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Where a file's probe starts: the mix docs/protocol.md gives, under the
 * index's slot *key* (which keeps its probe runs unknown to anyone who
 * cannot read the index). The report table uses it too, with key 0. */
static uint32_t
index_home(uint64_t key, uint64_t dev, uint64_t ino, uint32_t slots)
{
    return (uint32_t)(mix64(mix64(key ^ dev) ^ ino) & (slots - 1));
}

/* The st_dev of this kernel's memfds, from a memfd of our own, made,
 * fstat'd and closed once a process (a fork's child inherits it: the same
 * kernel); 0 when it could not be made, *err* then its errno. */
static uint64_t own_memfd_dev_known;

static uint64_t
own_memfd_dev(int *err)
{
    uint64_t dev = __atomic_load_n(&own_memfd_dev_known, __ATOMIC_RELAXED);
    if (dev != 0)
        return dev;
    int fd = memfd_create("shadowd-probe", MFD_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        *err = errno;
        if (fd >= 0)
            close(fd);
        return 0;
    }
    close(fd);
    dev = (uint64_t)st.st_dev;
    __atomic_store_n(&own_memfd_dev_known, dev, __ATOMIC_RELAXED);
    return dev;
}

static void
report_clear(struct shadowd_private_ *p)
{
    p->nreport = 0;
    p->report_hits = 0;
    p->report_spill = 0;
    memset(p->report_index, 0, sizeof p->report_index);
}

/* Forget the index: unmapped, its fd of the daemon's /proc/PID/fd closed.
 * Its unreported hits stay, for that daemon's next index: a connection
 * lost while the daemon lives (a reply late, a reply we could not read)
 * loses none of them (index_map). */
static void
index_drop(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (p->index_map != NULL)
        munmap((void *)(uintptr_t)p->index_map, p->index_len);
    if (p->index_dirfd >= 0)
        close(p->index_dirfd);
    p->index_map = NULL;
    p->index_len = 0;
    p->index_dirfd = -1;
    p->index_state = IX_NONE;
}

/* Whether the index of the daemon *pid* may be taken at its word about its
 * descriptor range: the credentials SO_PEERCRED gives for our connection
 * are that very process's (it called listen() itself, not a service
 * manager for it) and its uid is our effective uid. A daemon of another
 * uid could hold at a number of its "range" an O_PATH descriptor of a FIFO
 * or a device its user may name but not open: root's direct open would
 * open it for real (a FIFO blocks, a driver's open runs). Of our own uid,
 * it could open that itself. */
static int
index_direct(const struct shadowd *c, uint64_t pid)
{
    struct ucred peer;
    socklen_t len = sizeof peer;
    return getsockopt(c->sock, SOL_SOCKET, SO_PEERCRED, &peer, &len) == 0 &&
           len == sizeof peer && peer.pid > 0 && (uint64_t)peer.pid == pid &&
           peer.uid == geteuid();
}

/* Map the index *fd* the daemon *pid* sent, of *slots* slots, and check its
 * header. 0; -1 when it is not an index this client reads; -2 when this
 * process had no descriptor number left to look into the daemon's
 * /proc/PID/fd (EMFILE: ours, not the daemon's). */
static int
index_map(struct shadowd *c, int fd, uint64_t pid, uint64_t slots)
{
    struct shadowd_private_ *p = P(c);
    struct stat st;
    uint8_t head[72];
    uint32_t layout, slot_size, n, hpid, probes, range_base, range_count, index_fd;
    uint64_t memfd_dev, generation, key;
    char dir[48];

    /* A memfd that can never shrink (F_SEAL_SHRINK, which no one can take
     * back), checked before it is mapped: cut short under our mapping, its
     * next read would kill this process with SIGBUS; and a file that is no
     * memfd (F_GET_SEALS fails) could be one on a FUSE mount, whose page
     * faults wait on its server for as long as it likes. */
    int seals = fcntl(fd, F_GET_SEALS);
    if (slots == 0 || slots > INDEX_MAX_SLOTS || (slots & (slots - 1)) != 0 || pid == 0 ||
        pid > INT32_MAX || seals < 0 || !(seals & F_SEAL_SHRINK) || fstat(fd, &st) < 0 ||
        (uint64_t)st.st_size != INDEX_HEADER + slots * INDEX_SLOT)
        return -1;
    size_t len = (size_t)st.st_size;
    void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        return -1;
    memcpy(head, map, sizeof head);
    memcpy(&layout, head + 8, 4);
    memcpy(&slot_size, head + 12, 4);
    memcpy(&n, head + 16, 4);
    memcpy(&hpid, head + 20, 4);
    memcpy(&memfd_dev, head + 24, 8);
    memcpy(&probes, head + 32, 4);
    memcpy(&generation, head + 40, 8);
    memcpy(&range_base, head + 48, 4);
    memcpy(&range_count, head + 52, 4);
    memcpy(&index_fd, head + 56, 4);
    memcpy(&key, head + 64, 8);
    if (memcmp(head, INDEX_MAGIC, 8) != 0 || layout != INDEX_LAYOUT || slot_size != INDEX_SLOT ||
        n != slots || hpid != pid || probes == 0) {
        munmap(map, len);
        return -1;
    }
    /* The device the slots' memfds must be on is the kernel's, never the
     * sender's word: a file of another device (its FUSE mount) could pass
     * every other check of a slot, and its close wait on that mount's
     * server (docs/security.md attack 45). */
    int err = 0;
    uint64_t ours = own_memfd_dev(&err);
    if (ours == 0 || memfd_dev != ours) {
        munmap(map, len);
        return ours == 0 && (err == EMFILE || err == ENFILE) ? -2 : -1;
    }
    /* The daemon's fd directory, opened once: a reopen then walks one
     * component, not three. The kernel lets us look into it only with
     * the daemon's uid, or as root. */
    snprintf(dir, sizeof dir, "/proc/%u/fd", (unsigned)pid);
    int dirfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        int err = errno;
        munmap(map, len);
        return err == EMFILE || err == ENFILE ? -2 : -1;
    }
    /* The daemon's descriptor range (shadowd/fdrange.py): 0, 0 from a
     * daemon that keeps none, and none that does not fit the numbers. */
    if (range_base == 0 || range_count > (uint32_t)INT_MAX - range_base)
        range_base = range_count = 0;
    {
        /* The daemon's own descriptor of this index must be this very
         * memfd: else /proc/PID is another process of that pid (in our pid
         * namespace), whose numbers of the "range" may be anything, and
         * whose life says nothing of the daemon's (held_index_usable). */
        char name[16];
        struct stat mine;
        errno = 0;
        int at = index_fd <= (uint32_t)INT_MAX
                     ? openat(dirfd, decimal(name, (int)index_fd), O_PATH | O_CLOEXEC)
                     : -1;
        int limit = at < 0 && (errno == EMFILE || errno == ENFILE);
        int same = at >= 0 && fstat(at, &mine) == 0 && mine.st_dev == st.st_dev &&
                   mine.st_ino == st.st_ino;
        if (at >= 0)
            close(at);
        if (!same) {
            close(dirfd);
            munmap(map, len);
            return limit ? -2 : -1;
        }
    }
    p->index_map = map;
    p->index_len = len;
    p->index_dirfd = dirfd;
    p->index_pid = (int)pid;
    p->index_slots = (uint32_t)slots;
    p->index_probes = probes < INDEX_MAX_PROBES ? probes : INDEX_MAX_PROBES;
    if (p->index_probes > p->index_slots)
        p->index_probes = p->index_slots;
    p->index_memfd_dev = memfd_dev;
    p->index_key = key;
    p->index_fd = index_fd <= (uint32_t)INT_MAX ? (int)index_fd : -1;
    p->index_dev = (uint64_t)st.st_dev;
    p->index_ino = (uint64_t)st.st_ino;
    p->index_alive_us = mono_us(); /* it just answered */
    /* Another uid's range is looked at through O_PATH, as any number. */
    if (!index_direct(c, pid))
        range_base = range_count = 0;
    p->index_range_base = range_base;
    p->index_range_count = range_count;
    /* Hits counted through another daemon's index were its statistics: a
     * daemon restarted meanwhile (another index generation) is not told. */
    if (p->report_pid != (int)pid || p->report_generation != generation) {
        report_clear(p);
        p->report_pid = (int)pid;
        p->report_generation = generation;
    }
    p->report_at = mono_us();
    return 0;
}

/* The daemon's answer to our index request. */
static void
index_take(struct shadowd *c, const struct reply *rep, int *fds, int nfds)
{
    struct shadowd_private_ *p = P(c);
    index_drop(c); /* (there is none: one request per connection) */
    p->index_state = IX_NOT;
    /* not-permitted (another uid), no-index, unknown-op, or anything that
     * is not an index: none on this connection, never an error. Nor one
     * that comes after the caller turned the index off (shadowd_set_index
     * while the request sent behind the hello was on its way). */
    if (p->index_use && rep->f.ok == 1 && nfds == 1 && rep->has_pid && rep->has_slots) {
        int r = index_map(c, fds[0], rep->pid, rep->slots);
        /* Out of descriptors here: the daemon does have one; ask again. */
        p->index_state = r == 0 ? IX_HAVE : r == -2 ? IX_NONE : IX_NOT;
    }
    close_fds(fds, nfds);
}

/* Ask for the index on this connection, without waiting for the answer. */
static void
index_ask(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!INDEX_READABLE) {
        p->index_state = IX_NOT;
        return;
    }
    struct shadowd_slot_ *s = slot_new(c, K_INDEX, 0);
    if (s == NULL)
        return; /* 64 requests pending: ask later */
    struct out o = out_of(c);
    put_u8(&o, 0x82);
    put_cstr(&o, "op");
    put_cstr(&o, "index");
    put_cstr(&o, "id");
    put_uint(&o, s->id);
    int r = send_request(c, &o, NULL, 0, 0);
    if (r == 0) {
        s->state = SENT;
        s->deadline = 0; /* nobody waits for it; a silent daemon is noticed elsewhere */
        p->index_state = IX_ASKED;
        return;
    }
    slot_free(s);
    if (r == -2 && c->errnum != EAGAIN)
        p->index_state = IX_NOT;
}

/* Ask for the index when this connection has none and may have one, and
 * read the answer when it came. What fails here is not the caller's
 * error: code and error are left as they were. */
static void
index_poll(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!p->index_use || p->index_state == IX_HAVE || p->index_state == IX_NOT || !p->live ||
        p->hello != H_DONE || c->protocol < 2)
        return;
    char code[sizeof c->code], error[sizeof c->error];
    int errnum = c->errnum;
    memcpy(code, c->code, sizeof code);
    memcpy(error, c->error, sizeof error);
    if (p->index_state == IX_ASKED)
        drain(c);
    else
        index_ask(c);
    memcpy(c->code, code, sizeof code);
    memcpy(c->error, error, sizeof error);
    c->errnum = errnum;
}

static int
index_asked(struct shadowd *c, const void *arg)
{
    (void)arg;
    return P(c)->index_state != IX_ASKED;
}

/* Wait for the index up to the reply timeout: 1 when held. Waited for,
 * the index request is a request like any other: unanswered at the reply
 * timeout, it fails the connection and opens the breaker, so that the
 * opens after it do not each wait out a timeout of their own on a daemon
 * that answered the hello and then hung. */
static int
index_wait(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!p->index_use)
        return 0;
    if (p->index_state == IX_HAVE)
        return 1;
    if (start(c, CONNECT_WAIT))
        return 0;
    index_poll(c);
    if (p->index_state != IX_ASKED)
        return p->index_state == IX_HAVE;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        struct shadowd_slot_ *s = &p->slots[i];
        if (s->kind == K_INDEX && s->state == SENT && s->deadline == 0)
            s->deadline = reply_deadline(c, 0, 0);
    }
    wait_until(c, index_asked, NULL);
    return p->index_state == IX_HAVE;
}

/* What report_send left unsent, and why. */
enum { REPORT_SENT, REPORT_NO_SLOT, REPORT_SOCKET_FULL, REPORT_NO_INDEX };

/* The bucket of report_index that holds (dev, ino), or the free one where
 * it goes. */
static unsigned
report_bucket(const struct shadowd_private_ *p, uint64_t dev, uint64_t ino)
{
    const unsigned mask = 2 * SHADOWD_REPORTS - 1;
    unsigned b = index_home(0, dev, ino, 2 * SHADOWD_REPORTS) & mask;
    for (unsigned e; (e = p->report_index[b]) != 0; b = (b + 1) & mask)
        if (p->report[e - 1].dev == dev && p->report[e - 1].ino == ino)
            break;
    return b;
}

/* Forget the first *n* of the report's files (and the spilled hits with
 * the last): they were sent. */
static void
report_forget(struct shadowd_private_ *p, int n)
{
    if (n >= p->nreport + (p->report_spill > 0)) {
        report_clear(p);
        return;
    }
    if (n == 0)
        return;
    p->nreport -= n;
    memmove(p->report, p->report + n, (size_t)p->nreport * sizeof p->report[0]);
    memset(p->report_index, 0, sizeof p->report_index);
    for (int i = 0; i < p->nreport; i++)
        p->report_index[report_bucket(p, p->report[i].dev, p->report[i].ino)] = (uint16_t)(i + 1);
}

/* Tell the daemon of the index hits counted so far: report requests that
 * fit in its max_request, not waited for (their answers are read and
 * dropped when they come). What was sent is forgotten; what could not be
 * (every request slot waiting for an answer, the socket full, no
 * connection with the index) is kept and merged with the hits counted
 * next, and goes with the next report: a daemon that reads late loses no
 * hit, and no open waits on a report. Then the count towards the next
 * report starts again. REPORT_SENT when nothing is left, else why. */
static int
report_send(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    int total = p->nreport + (p->report_spill > 0), done = 0, why = REPORT_NO_INDEX;
    p->report_hits = 0;
    p->report_at = mono_us();
    if (total == 0)
        return REPORT_SENT;
    if (!p->live || p->hello != H_DONE || p->index_state != IX_HAVE)
        return REPORT_NO_INDEX;
    char code[sizeof c->code], error[sizeof c->error];
    int errnum = c->errnum;
    memcpy(code, c->code, sizeof code);
    memcpy(error, c->error, sizeof error);
    /* The answers to earlier reports are read only when something reads
     * the socket, and index hits never do: read them now, or their slots
     * (SHADOWD_MAX_PENDING) fill up and a report finds none. */
    drain(c);
    /* A triple takes at most 28 bytes; the map around them 32. */
    uint64_t room = max_request(c);
    int most = room > 32 + 28 ? (int)((room - 32) / 28) : 1;
    const struct shadowd_report_ spill = {.dev = 0, .ino = 0, .hits = p->report_spill};
    while (done < total && p->live && p->index_state == IX_HAVE) {
        int n = total - done < most ? total - done : most;
        struct shadowd_slot_ *s = slot_new(c, K_REPORT, 0);
        if (s == NULL) {
            why = REPORT_NO_SLOT;
            break;
        }
        struct out o = out_of(c);
        put_u8(&o, 0x83);
        put_cstr(&o, "op");
        put_cstr(&o, "report");
        put_cstr(&o, "id");
        put_uint(&o, s->id);
        put_cstr(&o, "hits");
        if (n < 16)
            put_u8(&o, (uint8_t)(0x90 | n));
        else
            put_be(&o, 0xdc, (uint64_t)n, 2);
        uint64_t hits = 0;
        for (int i = done; i < done + n; i++) {
            const struct shadowd_report_ *r = i < p->nreport ? &p->report[i] : &spill;
            put_u8(&o, 0x93);
            put_uint(&o, r->dev);
            put_uint(&o, r->ino);
            put_uint(&o, r->hits);
            hits += r->hits;
        }
        int sent = send_request(c, &o, NULL, 0, 0);
        if (sent != 0) {
            slot_free(s);
            why = sent == -2 && c->errnum == EAGAIN ? REPORT_SOCKET_FULL : REPORT_NO_INDEX;
            break;
        }
        s->state = SENT;
        s->deadline = reply_deadline(c, 0, 0);
        c->counts.reported += hits;
        done += n;
    }
    memcpy(c->code, code, sizeof code);
    memcpy(c->error, error, sizeof error);
    c->errnum = errnum;
    report_forget(p, done);
    return done == total ? REPORT_SENT : why;
}

static int cold_now(struct shadowd *c);
static void hint_flush(struct shadowd *c, int leaving);

/* Count an index hit of (dev, ino); report when it is time. */
static void
report_count(struct shadowd *c, uint64_t dev, uint64_t ino)
{
    struct shadowd_private_ *p = P(c);
    unsigned b = report_bucket(p, dev, ino);
    /* A full table is sent (not waited for) to make room, at most once a
     * millisecond while that fails: a hit meanwhile is counted apart. */
    if (p->report_index[b] == 0 && p->nreport == SHADOWD_REPORTS &&
        mono_us() - p->report_at >= 1000) {
        report_send(c);
        b = report_bucket(p, dev, ino);
    }
    unsigned e = p->report_index[b];
    if (e == 0 && p->nreport < SHADOWD_REPORTS) {
        e = (unsigned)++p->nreport;
        p->report[e - 1] = (struct shadowd_report_){.dev = dev, .ino = ino, .hits = 0};
        p->report_index[b] = (uint16_t)e;
    }
    if (e != 0)
        p->report[e - 1].hits++;
    else
        p->report_spill++; /* the table still full: told as hits of no file */
    p->report_hits++;
    if (p->report_hits >= REPORT_EVERY_HITS || mono_us() - p->report_at >= REPORT_EVERY_US) {
        report_send(c);
        /* Files copied here for the index's sake go with it (a cold
         * window keeps its own until it ends). */
        if (p->nhint > 0 && !cold_now(c))
            hint_flush(c, 0);
    }
}

/* At close: the last report, and the answers the daemon owes, waited for
 * (up to the reply timeout, or an owed request's own later deadline, which
 * then opens the breaker): a socket closed
 * with a reply unread in it resets the connection, and the daemon would
 * lose a request still in its queue (it counts a closing connection's
 * reports, nothing else). Hits that found no room are sent as room is made
 * meanwhile. When a told batch goes after the reports (*last* 0), every
 * answer owed is read first, whatever its request (a raced open, a
 * pipelined one not collected, a told batch of before): one that came
 * between the close's last read and the close would cost the daemon the
 * told batch behind it. When nothing is sent after the reports (*last*),
 * every other answer owed is read too (a raced open's, a told batch's: the
 * daemon's reply to one of them failing on our closed socket, it would
 * not read the rest, and a file it was asked or told of would never be
 * filled), and then the answer to the last report is not waited for: the
 * daemon reads a request before it answers it, and answers reports in
 * order, so once every earlier answer is in, nothing the daemon has not
 * read is behind the one answer that may still come (a warm supervisor's
 * exit, which owes nothing but reports, then costs no round trip). */
static void
report_last(struct shadowd *c, int last)
{
    struct shadowd_private_ *p = P(c);
    long long base = mono_us() + 1000LL * p->reply_ms;
    while (p->live) {
        int why = report_send(c);
        int waiting = 0, others = 0;
        /* An answer owed has its request's own deadline when that is later
         * (one that may wait on the daemon's copy gets time per MiB, more
         * once a version 1 hello makes a miss wait): a daemon still copying
         * a large file is not a hung one, and is not to open the breaker. */
        long long latest = owed_deadline(c, 1), deadline = latest > base ? latest : base;
        for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
            const struct shadowd_slot_ *t = &p->slots[i];
            if (t->id != 0 && (t->state == SENT || t->state == CANCELLED))
                *(t->kind == K_REPORT ? &waiting : &others) += 1;
        }
        long long left = deadline - mono_us();
        int sent = why == REPORT_SENT || why == REPORT_NO_INDEX; /* nothing more to send */
        if (sent && others == 0 && waiting <= (last && why == REPORT_SENT ? 1 : 0))
            break;
        if (left <= 0) {
            /* A daemon that did not answer within the reply timeout, as
             * any request's: the breaker opens, so that a call after this
             * close (the struct stays usable) does not wait out a second
             * timeout on it in the same window. */
            fail_connection(c, F_TIMEOUT, NULL,
                            "waiting for shadowd's answers at close: timed out after %lld ms",
                            (deadline - base) / 1000 + p->reply_ms);
            break;
        }
        struct pollfd pfd = {.fd = c->sock,
                             .events = POLLIN | (why == REPORT_SOCKET_FULL ? POLLOUT : 0)};
        if (poll(&pfd, 1, (int)((left + 999) / 1000)) > 0 && (pfd.revents & ~POLLOUT))
            drain(c);
    }
}

void
shadowd_index_report(struct shadowd *c)
{
    ready(c);
    after_fork(c);
    report_send(c);
}

/* The daemon's memfd slot *s* names, checked against it and reopened
 * read-only; -1 when any check fails (*refused* set when it was the
 * memfd's, not the daemon's being gone). */
static int
index_reopen(struct shadowd *c, const struct index_slot *s, uint32_t seq,
             const struct index_slot *got, int *refused)
{
    struct shadowd_private_ *p = P(c);
    char name[16];
    struct stat m;
    if (got->fd < 0)
        return -1;
    int in_range = (uint32_t)got->fd >= p->index_range_base &&
                   (uint32_t)got->fd - p->index_range_base < p->index_range_count;
    /* In the range of a daemon of our uid, N is a memfd whatever it holds by
     * now: opened read-only at once (INDEX_RANGE_FLAGS). Elsewhere O_PATH
     * first: no driver's open runs, whatever descriptor N is by now. */
    int first = openat(p->index_dirfd, decimal(name, got->fd),
                       in_range ? INDEX_RANGE_FLAGS : O_PATH | O_CLOEXEC);
    if (first < 0)
        return -1; /* N was closed meanwhile, or the daemon is gone */
    if (fstat(first, &m) < 0 || !S_ISREG(m.st_mode) || (uint64_t)m.st_dev != p->index_memfd_dev ||
        (uint64_t)m.st_ino != got->memfd_ino || (uint64_t)m.st_size != got->size ||
        (uint32_t)m.st_mode != got->mode ||
        ts_ns(&m.st_ctim) != got->memfd_ctime_ns) {
        close(first); /* N is something else now, or a holder changed the memfd */
        *refused = 1;
        return -1;
    }
    int fd = first;
    if (in_range) {
        if (fcntl(fd, F_SETFL, 0) != 0) { /* served as a plain O_RDONLY open */
            close(fd);
            *refused = 1;
            return -1;
        }
    } else {
        fd = reopen_as(c, first, p->self); /* (every caller ran after_fork) */
        close(first);
        if (fd < 0) {
            *refused = 1;
            return -1;
        }
    }
    /* The slot must have held still while it was used: the daemon changes
     * it before it may close the memfd. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (!sealed(fd) || LOAD(s->seq) != seq) {
        close(fd);
        *refused = 1;
        return -1;
    }
    return fd;
}

/* The live slot of (*dev*, *ino*) in the index, its seq (as read, to be
 * read again after the slot's use) in *seq*; NULL: not in its probe run. */
static const struct index_slot *
index_find(const struct shadowd_private_ *p, uint64_t dev, uint64_t ino, uint32_t *seq)
{
    uint32_t mask = p->index_slots - 1, home = index_home(p->index_key, dev, ino, p->index_slots);
    for (uint32_t i = 0; i < p->index_probes; i++) {
        const struct index_slot *s =
            (const void *)(p->index_map + INDEX_HEADER + (size_t)((home + i) & mask) * INDEX_SLOT);
        *seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (*seq == 0)
            return NULL; /* never used: the file is not further on */
        if ((*seq & 1) || LOAD(s->state) != INDEX_LIVE || LOAD(s->dev) != dev || LOAD(s->ino) != ino)
            continue;
        return s;
    }
    return NULL;
}

/* A hit through the index for the file whose fstat is *st*, or -1; with
 * *pr*, only once may_read says the caller may read the file. */
static int
index_lookup(struct shadowd *c, const struct stat *st, struct proof *pr)
{
    struct shadowd_private_ *p = P(c);
    uint32_t seq;
    const struct index_slot *s = index_find(p, (uint64_t)st->st_dev, (uint64_t)st->st_ino, &seq);
    if (s == NULL)
        return -1;
    struct index_slot got;
    got.size = LOAD(s->size);
    got.mtime_ns = LOAD(s->mtime_ns);
    got.ctime_ns = LOAD(s->ctime_ns);
    if (got.size != (uint64_t)st->st_size ||
        got.mtime_ns != ts_ns(&st->st_mtim) ||
        got.ctime_ns != ts_ns(&st->st_ctim))
        return -1; /* another version is cached: the daemon decides */
    if (!may_read(c, pr))
        return -1;
    got.fd = LOAD(s->fd);
    got.mode = LOAD(s->mode);
    got.memfd_ino = LOAD(s->memfd_ino);
    got.memfd_ctime_ns = LOAD(s->memfd_ctime_ns);
    int refused = 0;
    int fd = index_reopen(c, s, seq, &got, &refused);
    if (fd < 0 && refused)
        c->counts.index_refused++;
    if (fd < 0 && !refused && p->live)
        drain(c); /* the daemon gone? its connection says so (and the index goes) */
    return fd;
}

/* The index's fd for the file open at *src* whose fstat is *st*, counted,
 * reported and said in the last-call fields (route, hit, size), or -1
 * (nothing said in *c*: the caller goes on). */
static int
index_hit(struct shadowd *c, const struct stat *st, struct proof *pr)
{
    struct shadowd_private_ *p = P(c);
    /* Not while the breaker's window runs (the latency breaker keeps the
     * connection, and with it the index): the daemon is left alone. */
    if (p->down && !shadowd_available(c))
        return -1;
    index_poll(c);
    if (p->index_state != IX_HAVE)
        return -1;
    int fd = index_lookup(c, st, pr);
    if (fd < 0)
        return -1;
    c->counts.index++;
    report_count(c, (uint64_t)st->st_dev, (uint64_t)st->st_ino);
    c->route = SHADOWD_ROUTE_INDEX;
    c->hit = 1;
    c->size = (uint64_t)st->st_size;
    return fd;
}

/* Whether the index held names the memfd of held entry *h*: the file's
 * slot is live, of *h*'s version, with that memfd's inode and ctime (and the
 * index's memfd device is the memfd's). Read as index_lookup reads a slot:
 * seq even, and the same after the fields (a slot being written is not the
 * file's). Opens nothing. */
static int
index_names(const struct shadowd_private_ *p, const struct shadowd_held_ *h)
{
    if (h->memfd_dev != p->index_memfd_dev)
        return 0;
    uint32_t seq;
    const struct index_slot *s = index_find(p, h->dev, h->ino, &seq);
    if (s == NULL)
        return 0;
    int same = LOAD(s->size) == h->size && LOAD(s->mtime_ns) == h->mtime_ns &&
               LOAD(s->ctime_ns) == h->ctime_ns && LOAD(s->memfd_ino) == h->memfd_ino &&
               LOAD(s->memfd_ctime_ns) == h->memfd_ctime_ns;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return same && LOAD(s->seq) == seq;
}

/* Whether the process-local tier checks its entries against the index:
 * one is held (asked for now if this connection has none yet) and its
 * daemon was seen alive within the bound (its own descriptor of the index
 * still in its /proc/PID/fd: a daemon that is gone no longer changes its
 * index). A gone daemon's connection and index are dropped. The caller's
 * code and error stay as they were. */
static int
held_index_usable(struct shadowd *c, long long now)
{
    struct shadowd_private_ *p = P(c);
    if (p->down && now < p->down_until)
        return 0; /* (as index_hit: nor its word while the breaker's window runs) */
    index_poll(c);
    if (p->index_state != IX_HAVE)
        return 0;
    if (now - p->index_alive_us < p->held_recheck_us)
        return 1;
    char name[16];
    struct stat st;
    /* Through the link (a stat of the file, never an open of it): the
     * number must still hold this very index, not merely something. */
    if (p->index_fd >= 0 && fstatat(p->index_dirfd, decimal(name, p->index_fd), &st, 0) == 0 &&
        (uint64_t)st.st_dev == p->index_dev && (uint64_t)st.st_ino == p->index_ino) {
        p->index_alive_us = now;
        return 1;
    }
    char code[sizeof c->code], error[sizeof c->error];
    int errnum = c->errnum;
    memcpy(code, c->code, sizeof code);
    memcpy(error, c->error, sizeof error);
    drain(c); /* its connection says so too, and drops the index */
    if (p->index_state == IX_HAVE) {
        index_drop(c);
        p->index_state = IX_NOT; /* (none on this connection: the next one asks again) */
    }
    memcpy(c->code, code, sizeof code);
    memcpy(c->error, error, sizeof error);
    c->errnum = errnum;
    return 0;
}

void
shadowd_set_index(struct shadowd *c, int use, int keep)
{
    ready(c);
    if (use >= 0)
        P(c)->index_use = use != 0;
    P(c)->index_keep = keep < 0 ? DEFAULT_INDEX_KEEP : keep != 0;
    if (!P(c)->index_use) {
        /* In a forked child, the connection, index and hits are the
         * parent's: let go of them first, or the report would go on the
         * parent's connection (read there as the answer to the parent's
         * next request, which takes the same id) and count them twice. */
        after_fork(c);
        report_send(c);
        index_drop(c);
        P(c)->index_state = IX_NOT; /* (asked again on the next connection, if turned on) */
    }
}

int
shadowd_index_ready(struct shadowd *c)
{
    ready(c);
    clear(c);
    int held = index_wait(c);
    clear(c);
    return held;
}

/* The index request right behind the hello just sent (the daemon reads
 * them in order): its answer comes while the caller forks too, not one
 * round trip after the hello's. A daemon that turns the hello down
 * (version 1) closes the connection, and the index is asked on the next. */
static void
index_behind_hello(struct shadowd *c)
{
    if (P(c)->index_use && P(c)->index_state == IX_NONE && P(c)->hello == H_SENT)
        index_ask(c);
}

/* Here, after the index's states: they ask for the index with the hello. */
int
shadowd_connect_start(struct shadowd *c, const char *socket_path)
{
    ready(c);
    if (shadowd_set_socket(c, socket_path) < 0)
        return -1;
    if (P(c)->live)
        fail_connection(c, F_NONE, NULL, "shadowd_connect_start replaced the connection");
    clear(c);
    int r = start(c, CONNECT_EARLY);
    if (r < 0)
        return -1;
    if (r == 0)
        index_behind_hello(c);
    /* (r == 1: the backlog is full; shadowd_connect_wait connects.) */
    clear(c);
    return 0;
}

int
shadowd_connect_wait(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    ready(c);
    clear(c);
    if (p->connect_later && !p->live) {
        /* shadowd_connect_start found the daemon's backlog full: connect
         * now, waiting for room up to the connect timeout (which bounds the
         * hello's answer too, as in shadowd_connect), with the index
         * request behind the hello as shadowd_connect_start sends it. */
        after_fork(c);
        if (gate(c) || conn_open(c, CONNECT_WAIT))
            return -1;
        index_behind_hello(c);
    }
    p->connect_later = 0;
    return start(c, CONNECT_WAIT);
}

int
shadowd_index_open(struct shadowd *c, int src, const struct stat *st)
{
    struct stat own;
    ready(c);
    clear(c);
    after_fork(c);
    if (st == NULL) {
        if (own_fstat(c, src, &own) < 0)
            return -1;
        st = &own;
    }
    if (!S_ISREG(st->st_mode)) {
        fail(c, "not-regular", EINVAL, "only regular files are served; this is not one");
        return -1;
    }
    if (!index_wait(c)) {
        if (c->error[0] == '\0')
            fail(c, "", 0, "no index from shadowd on this connection");
        return -1;
    }
    clear(c);
    if (gate(c))
        return -1; /* the latency breaker's window: its index is held, not used */
    return index_hit(c, st, NULL);
}

/* -- routed --------------------------------------------------------------- */

/* The age under which a file is copied here: the caller's setting, else
 * the daemon's racy window (it would not cache a younger file). */
static long long
young_ns(const struct shadowd *c)
{
    const struct shadowd_private_ *p = &c->priv_;
    if (p->young_ms >= 0)
        return (long long)p->young_ms * 1000000LL;
    if (p->racy_known)
        return c->racy_window_ns > (uint64_t)INT64_MAX ? INT64_MAX : (long long)c->racy_window_ns;
    return DEFAULT_RACY_NS;
}

/* Why to copy here without asking the daemon (enum shadowd_copied_why), or
 * 0 to ask it; *by_size*: whether local_below counts. */
static int
copy_without_asking(struct shadowd *c, const struct stat *st, int by_size)
{
    struct shadowd_private_ *p = P(c);
    if (!shadowd_available(c)) {
        c->counts.fast++;
        return SHADOWD_COPIED_BREAKER;
    }
    if (by_size && st->st_size < p->local_below)
        return SHADOWD_COPIED_RULE;
    if (c->max_file_size && (uint64_t)st->st_size > c->max_file_size)
        return SHADOWD_COPIED_RULE;
    long long young = young_ns(c);
    /* A ctime past 2262 (a FUSE server's, say) is in the future: young. One
     * before 1677 is old. Neither may overflow on the way (undefined). */
    long long ctime_ns, age;
    if (__builtin_mul_overflow((long long)st->st_ctim.tv_sec, 1000000000LL, &ctime_ns) ||
        __builtin_add_overflow(ctime_ns, (long long)st->st_ctim.tv_nsec, &ctime_ns))
        ctime_ns = st->st_ctim.tv_sec < 0 ? LLONG_MIN : LLONG_MAX;
    if (young > 0 && !__builtin_sub_overflow(real_ns(), ctime_ns, &age) && age < young)
        return SHADOWD_COPIED_RULE;
    return SHADOWD_COPIED_NOT;
}

/* The fd the routed calls make here: a local copy, counted, and why. The
 * last call's fields then say it; `miss` and `filling` stay when the
 * daemon answered a miss, `error` stays when it failed. */
static int
copy_here(struct shadowd *c, int src, uint64_t size, int why)
{
    char error[sizeof c->error];
    int miss = c->miss, filling = c->filling;
    snprintf(error, sizeof error, "%s", why == SHADOWD_COPIED_FAILED ? c->error : "");
    int fd = shadowd_copy_fd(c, src);
    if (fd < 0)
        return -1;
    clear(c);
    c->route = SHADOWD_ROUTE_COPY;
    c->copied_why = why;
    c->size = size;
    c->counts.copied++;
    if (why == SHADOWD_COPIED_MISS) {
        c->miss = miss;
        c->filling = filling;
        c->counts.missed++;
    }
    snprintf(c->error, sizeof c->error, "%s", error);
    return fd;
}

/* The label of *src* when the caller gave none that is absolute. */
static const char *
label_of(int src, const char *label, char *buf, size_t len)
{
    if (label && label[0] == '/')
        return label;
    char path[32];
    snprintf(path, sizeof path, "/proc/self/fd/%d", src);
    ssize_t n = readlink(path, buf, len - 1);
    if (n <= 0 || buf[0] != '/')
        return NULL;
    buf[n] = '\0';
    return buf;
}

/* -- a cold daemon -------------------------------------------------------- */

static int
cold_now(struct shadowd *c)
{
    return P(c)->cold_misses > 0 && P(c)->cold_until > 0 && mono_us() < P(c)->cold_until;
}

/* The daemon answered a routed open of *v*: a miss it is filling, or not
 * (a hit, or a miss it will not fill: no sign of a cold cache). */
static void
cold_saw(struct shadowd *c, const struct shadowd_version_ *v, int filling_miss)
{
    struct shadowd_private_ *p = P(c);
    if (!filling_miss) {
        p->cold_streak = 0;
        return;
    }
    if (p->cold_streak > 0 && p->cold_dev == v->dev && p->cold_ino == v->ino)
        return; /* the same file again, still being filled */
    p->cold_dev = v->dev;
    p->cold_ino = v->ino;
    if (p->cold_misses > 0 && ++p->cold_streak >= p->cold_misses) {
        p->cold_until = mono_us() + 1000LL * p->cold_ms;
        p->cold_streak = 0;
    }
}

/* Whether a file that the daemon's index, held, lacks is copied here and
 * told later rather than asked for (the cold routing is on, the race is not
 * asked for). The daemon then almost surely has no copy: asking would only
 * start its copy while the program runs, on a CPU the program could use
 * (docs/performance.md, "A file the index lacks, told later"). */
static int
unindexed_is_cold(struct shadowd *c)
{
    const struct shadowd_private_ *p = P(c);
    return p->index_state == IX_HAVE && !p->race && p->cold_misses > 0;
}

/* Tell the daemon of the files copied here while it was cold: one batch
 * request per max_batch files with "wait": false and "serve": false, not
 * waited for (its reply is read and dropped when it comes, as a cancelled
 * request's; with *leaving*, the connection goes right after and nothing is
 * kept). The daemon fills its cache with them, one cheap item each, and
 * sends no fd for those it holds already: one would sit in our socket,
 * counted in our uid's fd budget, until the reply is read (a daemon older
 * than "serve" sends them; they are closed with the reply). */
static void
hint_flush(struct shadowd *c, int leaving)
{
    struct shadowd_private_ *p = P(c);
    p->hint_due = 0;
    if (p->nhint == 0)
        return;
    if (p->live && p->hello == H_DONE && c->protocol >= 2 && !p->down) {
        const char *labels[SHADOWD_HINTS];
        int map[SHADOWD_HINTS];
        for (int i = 0; i < p->nhint; i++) {
            labels[i] = p->hint_label[i] >= 0 ? p->hint_labels + p->hint_label[i] : NULL;
            map[i] = i;
        }
        for (int done = 0; done < p->nhint && p->live;) {
            int chunk = p->nhint - done, failure;
            if ((uint64_t)chunk > c->max_batch)
                chunk = (int)c->max_batch;
            struct request rq = {.kind = K_BATCH, .build = build_batch,
                                 .fds = p->hint_fd + done, .nfds = chunk, .labels = labels,
                                 .map = map + done, .nowait = 1, .noserve = 1};
            if (leaving) {
                struct out o = out_of(c);
                uint32_t id = c->next_id ? c->next_id : 1;
                c->next_id = (id + 1) & 0x7fffffff;
                build_batch(c, &o, id, &rq);
                if (send_request(c, &o, rq.fds, chunk, 0) != 0)
                    break;
            } else {
                struct shadowd_slot_ *s = submit(c, &rq, 1, &failure);
                if (s == NULL)
                    break;
                s->owned = 0;
                s->state = CANCELLED; /* its reply's fds are closed when it comes */
            }
            done += chunk;
        }
    }
    for (int i = 0; i < p->nhint; i++)
        close(p->hint_fd[i]);
    p->nhint = 0;
    p->hint_used = 0;
}

/* Keep *src* (a duplicate) of version *v* and its label for the daemon, for
 * later. The files kept are told when 64 are kept, or, with the cold routing
 * on, when the first was kept a cold window ago (a long-lived process's
 * files are not held back for its whole life). */
static void
hint_add(struct shadowd *c, int src, const struct shadowd_version_ *v, const char *label)
{
    struct shadowd_private_ *p = P(c);
    long long now = mono_us();
    if (p->nhint == SHADOWD_HINTS ||
        (p->nhint > 0 && p->cold_misses > 0 && now - p->hint_since >= 1000LL * p->cold_ms))
        hint_flush(c, 0);
    int fd = fcntl(src, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return;
    int i = p->nhint++;
    if (i == 0)
        p->hint_since = now;
    p->hint_fd[i] = fd;
    p->hint_dev[i] = v->dev;
    p->hint_ino[i] = v->ino;
    p->hint_label[i] = -1;
    size_t n = label && label[0] == '/' ? strlen(label) + 1 : 0;
    if (n > 0 && n <= sizeof p->hint_labels - (size_t)p->hint_used) {
        memcpy(p->hint_labels + p->hint_used, label, n);
        p->hint_label[i] = p->hint_used;
        p->hint_used += (int)n;
    }
}

/* Whether the file of *v* is among the files kept to be told. */
static int
hint_has(const struct shadowd_private_ *p, const struct shadowd_version_ *v)
{
    for (int i = 0; i < p->nhint; i++)
        if (p->hint_dev[i] == v->dev && p->hint_ino[i] == v->ino)
            return 1;
    return 0;
}

/* The routing rules need the daemon's limits (its racy window above all):
 * until a hello said them, connect without waiting and read the answer
 * when it has come, so that a file the 1 s default calls young does not
 * keep the routed open from ever asking (and learning). */
static void
know_the_daemon(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (p->hello == H_DONE || !shadowd_available(c))
        return;
    if (!p->live) {
        /* As connect_start: a full backlog is a daemon busy for a moment, not
         * one that is down (no failure, the breaker stays shut); this open is
         * then copied here without asking, and the next one tries again. */
        start(c, CONNECT_EARLY);
        clear(c); /* a failure here is the breaker's business, not this open's */
    } else {
        drain(c);
    }
}

/* Read the answers that came for routed opens that were copied first: they
 * may fill the tier for this very open. Nothing when none is awaited. */
static void
late_answers(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (!p->late_pending)
        return;
    if (p->live)
        drain(c);
    p->late_pending = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++)
        if (p->slots[i].state == SENT && p->slots[i].late)
            p->late_pending = 1;
}

static struct shadowd_slot_ *submit_open(struct shadowd *c, int src, const char *label,
                                         const struct shadowd_version_ *before, int nowait);

/* Send a routed open of *src* that nobody will wait for: the connection is
 * made without waiting (the hello goes with it), the request sent without
 * waiting for room (a full socket fails it); a connection that broke is
 * made again once. Its slot, or NULL (error set). */
/* The request slots a raced open leaves free, so that the index's request
 * and the reports of index hits always find one: raced opens are sent and
 * not waited for, and a daemon behind on answering them would otherwise
 * fill every slot, and the hits counted here would be dropped unreported.
 * A daemon this far behind gains nothing from one more raced open. */
#define SLOTS_KEPT 4

static int
slots_free(const struct shadowd *c)
{
    int n = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++)
        n += P(c)->slots[i].id == 0;
    return n;
}

static struct shadowd_slot_ *
race_submit(struct shadowd *c, int src, const char *label, const struct shadowd_version_ *v)
{
    if (slots_free(c) <= SLOTS_KEPT) {
        fail(c, "", EAGAIN, "%d requests to shadowd are unanswered; copied here",
             SHADOWD_MAX_PENDING - SLOTS_KEPT);
        return NULL;
    }
    struct shadowd_slot_ *s = submit_open(c, src, label, v, 1);
    if (s != NULL) {
        s->owned = 0; /* ours: shadowd_collect never hands it out */
        s->routed = 1;
        /* A version 1 reply says no version: keeping it takes the
         * caller's fstat after it, so keep the source until then. */
        if (!(P(c)->hello == H_DONE && c->protocol >= 2))
            s->src = fcntl(src, F_DUPFD_CLOEXEC, 0);
    }
    return s;
}

struct race {
    struct shadowd *c;
    struct shadowd_slot_ *s;
};

/* Between two chunks of the local copy: read what the daemon sent; stop
 * copying once it served the file. */
static int
race_stop(void *arg)
{
    struct race *r = arg;
    if (r->s->state != SENT)
        return 0; /* answered already without an fd (a miss), or failed: copy on */
    drain(r->c);
    return r->s->state == READY && r->s->fd >= 0;
}

/* The routed open's race: the request *s* is out; copy the file here
 * meanwhile, in chunks, and take whichever is done first: the daemon's fd
 * (the copy is dropped) or the copy (the daemon's answer, when it comes,
 * goes into the tier if it may). Nothing here waits on the daemon. */
static int
race(struct shadowd *c, int src, const struct stat *st, const struct shadowd_version_ *v,
     struct shadowd_slot_ *s)
{
    struct race r = {c, s};
    int fd = -1;
    int rc = copy_attempt(c, src, st, race_stop, &r, &fd);
    if (rc == 2) { /* the daemon served it first */
        cold_saw(c, v, 0);
        fd = s->fd;
        s->fd = -1;
        say_served(c, &s->served);
        c->size = s->size;
        c->hit = s->hit;
        c->route = SHADOWD_ROUTE_DAEMON;
        c->counts.daemon++;
        if (may_keep(src, v, &s->served, s->hit, s->size))
            held_put(c, fd, v, s->asked_us);
        slot_free(s);
        return fd;
    }
    int why = SHADOWD_COPIED_FIRST;
    char error[sizeof c->error];
    error[0] = '\0';
    if (s->state == SENT) {
        s->late = 1; /* its answer goes to the tier when it comes */
        P(c)->late_pending = 1;
    } else {
        if (s->fd >= 0 && may_keep(src, v, &s->served, s->hit, s->size))
            held_put(c, s->fd, v, s->asked_us); /* served just as the copy was done */
        why = s->fd < 0 && s->served.miss && s->failure == F_NONE ? SHADOWD_COPIED_MISS
                                                                 : SHADOWD_COPIED_FAILED;
        if (why == SHADOWD_COPIED_MISS)
            cold_saw(c, v, s->served.filling);
        if (s->fd >= 0)
            why = SHADOWD_COPIED_FIRST;
        snprintf(error, sizeof error, "%s", why == SHADOWD_COPIED_FAILED ? s->error : "");
        c->miss = s->served.miss;
        c->filling = s->served.filling;
        slot_free(s);
    }
    if (rc != 0) {
        /* The source changed under the copy (copy_fd tries again), or the
         * copy failed (it will say why). */
        snprintf(c->error, sizeof c->error, "%s", error);
        return copy_here(c, src, v->size, why);
    }
    int miss = c->miss, filling = c->filling;
    clear(c);
    c->route = SHADOWD_ROUTE_COPY;
    c->copied_why = why;
    c->size = v->size;
    c->counts.copied++;
    if (why == SHADOWD_COPIED_MISS) {
        c->miss = miss;
        c->filling = filling;
        c->counts.missed++;
    }
    snprintf(c->error, sizeof c->error, "%s", error);
    return fd;
}

/* A routed open's index hit: the last-call fields set, kept in the tier
 * when asked to; or -1. */
static int
index_served(struct shadowd *c, const struct stat *st, const struct shadowd_version_ *v,
             struct proof *pr)
{
    long long now = mono_us();
    int fd = index_hit(c, st, pr);
    if (fd >= 0 && P(c)->index_keep)
        held_put(c, fd, v, now);
    return fd;
}

/* Whether a file the size rule copies here should be told to the daemon:
 * while an index is held, a file the daemon would cache (not young, not
 * too large) is then an index hit for the next process that opens it. */
static int
index_wants(struct shadowd *c, const struct stat *st)
{
    return P(c)->index_state == IX_HAVE && copy_without_asking(c, st, 0) == SHADOWD_COPIED_NOT;
}

/* The routed open of *src*, whose fstat is *given* (NULL: taken here):
 * tier, local rules, the daemon raced against a local copy. With
 * *want_label*, a missing label is read from /proc/self/fd (only when the
 * daemon is asked). With *pr*, *src* is -1: the caller gave an O_PATH fd
 * of the file (pr->at), which a tier hit needs only the fstat of and
 * may_read's word on; the file is opened for reading (pr->src, the
 * caller's to close) only when it must be read or passed to the daemon. */
static int
routed(struct shadowd *c, int src, struct proof *pr, const struct stat *given, const char *label,
       int want_label)
{
    struct stat st;
    struct shadowd_version_ v;

    shadowd_idle(c); /* what the last routed open left due, when the caller did not */
    clear(c);
    if (given != NULL) {
        st = *given;
    } else if (own_fstat(c, pr ? pr->at : src, &st) < 0) {
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        /* (Before any open: a FIFO or a device is never opened here.) */
        fail(c, "not-regular", EINVAL, "only regular files are served; this is not one");
        return -1;
    }
    version_of(&st, &v);
    after_fork(c);
    late_answers(c);
    know_the_daemon(c);
    int fd = held_take(c, &v, pr);
    if (fd >= 0) {
        c->route = SHADOWD_ROUTE_HELD;
        c->hit = 1;
        c->size = v.size;
        c->counts.held++;
        if (pr != NULL && pr->src < 0)
            c->counts.unopened++;
        return fd;
    }
    if (pr == NULL || pr->state >= 0) {
        if ((fd = index_served(c, &st, &v, pr)) >= 0) {
            if (pr != NULL && pr->src < 0)
                c->counts.unopened++;
            return fd;
        }
    }
    if (pr != NULL) {
        /* No tier serves it: the file must be read, or passed to the daemon. */
        if (pr->state < 0 || proof_open(c, pr) < 0) {
            int err = pr->state < 0 ? pr->errnum : errno;
            fail(c, "", err, "opening the file for reading: %s", strerror(err));
            return -1;
        }
        src = pr->src;
    }
    int why = copy_without_asking(c, &st, 1);
    char buf[LABEL_MAX + 1];
    if (why == SHADOWD_COPIED_NOT && !P(c)->live && P(c)->connect_later) {
        /* The daemon's backlog was full just now (know_the_daemon). */
        snprintf(c->error, sizeof c->error, "the daemon's backlog is full; copied here");
        return copy_here(c, src, v.size, SHADOWD_COPIED_FAILED);
    }
    int again = 0;
    if (why == SHADOWD_COPIED_NOT && (cold_now(c) || unindexed_is_cold(c))) {
        why = SHADOWD_COPIED_COLD;
        if (want_label)
            label = label_of(src, label, buf, sizeof buf);
        /* A file copied here and kept to be told, opened again before it
         * was: the program (a shell loop, a compiler's passes) opens it in
         * process after process, so the daemon is told once this copy is
         * made (at shadowd_idle, or at the next routed call), and its next
         * opens find it in the index. Not before this open returns: the
         * daemon, woken on this CPU, took the batch in first (about 2 ms
         * more for cc's second open of libc here: docs/performance.md).
         * A file opened once waits. */
        again = P(c)->index_state == IX_HAVE && hint_has(P(c), &v);
    } else if (why == SHADOWD_COPIED_NOT) {
        hint_flush(c, 0); /* the cold window is over: tell the daemon of what it missed */
        if (want_label)
            label = label_of(src, label, buf, sizeof buf);
        /* The race when asked for, and whenever the daemon's index is held
         * and lacks the file: the daemon then almost surely has no copy
         * either (a file it has is in its index but for the few it could
         * not place), so its answer would only say "miss" a round trip
         * later; copy at once, and take its fd in the rare case it comes
         * first. */
        if (P(c)->race || P(c)->index_state == IX_HAVE) {
            struct shadowd_slot_ *s = race_submit(c, src, label, &v);
            if (s != NULL)
                return race(c, src, &st, &v, s);
        } else {
            struct shadowd_served_ sv;
            long long asked = mono_us();
            fd = ask_daemon(c, src, label, &v, 1, &sv);
            if (fd >= 0) {
                cold_saw(c, &v, 0);
                if (may_keep(src, &v, &sv, c->hit, c->size))
                    held_put(c, fd, &v, asked);
                return fd;
            }
            if (c->miss && c->error[0] == '\0') {
                why = SHADOWD_COPIED_MISS;
                cold_saw(c, &v, c->filling);
            }
        }
        if (why == SHADOWD_COPIED_NOT)
            why = SHADOWD_COPIED_FAILED;
    }
    int told = (why == SHADOWD_COPIED_COLD && !again) ||
               (why == SHADOWD_COPIED_RULE && index_wants(c, &st));
    if (told && want_label && why == SHADOWD_COPIED_RULE)
        label = label_of(src, label, buf, sizeof buf);
    fd = copy_here(c, src, v.size, why);
    if (fd >= 0 && told)
        hint_add(c, src, &v, label);
    if (again)
        P(c)->hint_due = 1;
    return fd;
}

void
shadowd_idle(struct shadowd *c)
{
    if (!P(c)->hint_due)
        return; /* (a zero-filled struct too) */
    after_fork(c); /* a forked child's due batch is its parent's: let go of */
    if (P(c)->hint_due)
        hint_flush(c, 0);
}

int
shadowd_open_routed_fd(struct shadowd *c, int src, const char *label)
{
    ready(c);
    return routed(c, src, NULL, NULL, label, 0);
}

int
shadowd_open_routed_stat(struct shadowd *c, int src, const struct stat *st, const char *label)
{
    ready(c);
    return routed(c, src, NULL, st, label, 0);
}

int
shadowd_open_routed_opath(struct shadowd *c, int at, const struct stat *st, const char *label)
{
    ready(c);
    struct proof pr = {.at = at, .src = -1, .state = 0, .errnum = 0};
    int fd = routed(c, -1, &pr, st, label, 0);
    if (pr.src >= 0) {
        int err = errno;
        close(pr.src);
        errno = err;
    }
    return fd;
}

int
shadowd_open_routed(struct shadowd *c, const char *path)
{
    ready(c);
    int src = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
    if (src < 0) {
        fail(c, "", errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    int fd = routed(c, src, NULL, NULL, path, path[0] != '/');
    close(src);
    return fd;
}

int
shadowd_openat(struct shadowd *c, int dirfd, const char *path, int flags)
{
    ready(c);
    clear(c);
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC | O_PATH | O_TMPFILE))) {
        fail(c, "", EINVAL, "%s: shadowd serves read-only opens only", path);
        return -1;
    }
    int src = openat(dirfd, path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC | (flags & O_NOFOLLOW));
    if (src < 0) {
        fail(c, "", errno, "%s: %s", path, strerror(errno));
        return -1;
    }
    int fd = routed(c, src, NULL, NULL, path, path[0] != '/');
    close(src);
    return fd;
}

/* A routed batch item copied here, and why. */
static void
item_copy(struct shadowd *c, struct shadowd_item *it, int src, int why)
{
    int miss = it->miss, filling = it->filling;
    it->fd = copy_here(c, src, it->size, why);
    it->hit = 0;
    it->route = it->fd >= 0 ? SHADOWD_ROUTE_COPY : SHADOWD_ROUTE_NONE;
    it->copied_why = it->fd >= 0 ? why : SHADOWD_COPIED_NOT;
    it->miss = miss;
    it->filling = filling;
    it->errnum = it->fd >= 0 ? 0 : c->errnum;
    snprintf(it->code, sizeof it->code, "%s", it->fd >= 0 ? "" : c->code);
}

int
shadowd_open_batch_routed(struct shadowd *c, const int *srcs, const char *const *labels, int n,
                          struct shadowd_item *items)
{
    int fds[ROUTED_CHUNK], map[ROUTED_CHUNK];
    struct shadowd_version_ vs[ROUTED_CHUNK];
    int k = 0, served = 0;

    ready(c);
    clear(c);
    after_fork(c);
    if (n < 0) {
        fail(c, "", EINVAL, "a batch of %d files", n);
        return -1;
    }
    for (int i = 0; i <= n; i++) {
        if (i < n) {
            struct stat st;
            struct shadowd_item *it = &items[i];
            item_init(it);
            if (srcs[i] < 0 || fstat(srcs[i], &st) < 0) {
                it->errnum = srcs[i] < 0 ? EBADF : errno;
                continue;
            }
            if (!S_ISREG(st.st_mode)) {
                snprintf(it->code, sizeof it->code, "not-regular");
                it->errnum = EINVAL;
                continue;
            }
            version_of(&st, &vs[k]);
            it->size = vs[k].size;
            if ((it->fd = held_take(c, &vs[k], NULL)) >= 0) {
                it->route = SHADOWD_ROUTE_HELD;
                it->hit = 1;
                c->counts.held++;
                continue;
            }
            if ((it->fd = index_served(c, &st, &vs[k], NULL)) >= 0) {
                it->route = SHADOWD_ROUTE_INDEX;
                it->hit = 1;
                continue;
            }
            int why = copy_without_asking(c, &st, 1);
            if (why != SHADOWD_COPIED_NOT) {
                item_copy(c, it, srcs[i], why);
                continue;
            }
            fds[k] = srcs[i];
            map[k] = i;
            if (++k < ROUTED_CHUNK && i < n - 1)
                continue;
        }
        if (k == 0)
            continue;
        long long asked = mono_us();
        batch_send(c, fds, labels, map, k, vs, items, 1);
        for (int j = 0; j < k; j++) {
            struct shadowd_item *it = &items[map[j]];
            if (it->fd >= 0) {
                struct shadowd_served_ sv;
                served_of_item(it, c->protocol, &sv);
                c->counts.daemon++;
                if (may_keep(fds[j], &vs[j], &sv, it->hit, it->size))
                    held_put(c, it->fd, &vs[j], asked);
                continue;
            }
            item_copy(c, it, fds[j], it->miss && it->code[0] == '\0' ? SHADOWD_COPIED_MISS
                                                                      : SHADOWD_COPIED_FAILED);
        }
        k = 0;
    }
    for (int i = 0; i < n; i++)
        served += items[i].fd >= 0;
    clear(c);
    return served;
}

/* -- preload ---------------------------------------------------------------- */

struct slot_set {
    struct shadowd_slot_ **slots;
    int n;
};

static int
all_done(struct shadowd *c, const void *arg)
{
    const struct slot_set *set = arg;
    (void)c;
    for (int i = 0; i < set->n; i++)
        if (set->slots[i]->state == SENT)
            return 0;
    return 1;
}

/* Send the items in batches of max_batch, all before reading any reply
 * (one round trip for them all), then wait for every reply. What failed
 * stays without an fd. */
static void
preload_send(struct shadowd *c, const int *fds, const char *const *labels, const int *map, int n,
             const struct shadowd_version_ *befores, struct shadowd_item *items)
{
    struct shadowd_slot_ *sent[SHADOWD_MAX_PENDING];
    struct slot_set set = {sent, 0};
    int done = 0;
    if (start(c, CONNECT_WAIT))
        return;
    /* The index too, where this connection has none yet: its answer comes
     * with the batches', and the tier's entries are then checked against it. */
    index_poll(c);
    while (done < n && set.n < SHADOWD_MAX_PENDING && P(c)->live) {
        int chunk = n - done, failure;
        if ((uint64_t)chunk > c->max_batch)
            chunk = (int)c->max_batch;
        uint64_t size = 0;
        for (int k = done; k < done + chunk; k++)
            size += befores[k].size;
        struct request rq = {.kind = K_BATCH, .build = build_batch, .fds = fds + done,
                             .nfds = chunk, .size = size, .labels = labels, .map = map + done,
                             .items = items, .nowait = 1, .befores = befores + done};
        struct shadowd_slot_ *s = submit(c, &rq, 0, &failure);
        if (s == NULL)
            break;
        sent[set.n++] = s;
        done += chunk;
    }
    wait_until(c, all_done, &set);
    for (int i = 0; i < set.n; i++) {
        timed(c, sent[i]);
        slot_free(sent[i]); /* the fds are in the items */
    }
}

/* Preload up to PRELOAD_GROUP files; how many of them are held now. */
static int
preload_group(struct shadowd *c, const int *srcs, const char *const *labels, int m)
{
    struct shadowd_item items[PRELOAD_GROUP];
    struct shadowd_version_ vs[PRELOAD_GROUP], asked_vs[PRELOAD_GROUP];
    int fds[PRELOAD_GROUP], map[PRELOAD_GROUP];
    int k = 0, held = 0;

    for (int i = 0; i < m; i++) {
        struct stat st;
        item_init(&items[i]);
        if (srcs[i] < 0 || fstat(srcs[i], &st) < 0 || !S_ISREG(st.st_mode))
            continue;
        version_of(&st, &vs[i]);
        if (held_has(c, &vs[i])) {
            held++;
            continue;
        }
        /* Young or too large: the daemon would not cache it; breaker open. */
        if (copy_without_asking(c, &st, 0) != SHADOWD_COPIED_NOT)
            continue;
        fds[k] = srcs[i];
        map[k] = i;
        asked_vs[k++] = vs[i];
    }
    if (k == 0)
        return held;
    long long asked = mono_us();
    preload_send(c, fds, labels, map, k, asked_vs, items);
    for (int j = 0; j < k; j++) {
        struct shadowd_item *it = &items[map[j]];
        if (it->fd < 0)
            continue;
        struct shadowd_served_ sv;
        served_of_item(it, c->protocol, &sv);
        if (may_keep(fds[j], &vs[map[j]], &sv, it->hit, it->size) &&
            held_put(c, it->fd, &vs[map[j]], asked)) {
            held++;
            c->counts.preloaded++;
        }
        close(it->fd);
    }
    return held;
}

int
shadowd_preload_fds(struct shadowd *c, const int *srcs, const char *const *labels, int n)
{
    ready(c);
    clear(c);
    after_fork(c);
    if (n < 0) {
        fail(c, "", EINVAL, "a preload of %d files", n);
        return -1;
    }
    int held = 0;
    for (int done = 0; done < n; done += PRELOAD_GROUP) {
        int m = n - done < PRELOAD_GROUP ? n - done : PRELOAD_GROUP;
        held += preload_group(c, srcs + done, labels ? labels + done : NULL, m);
    }
    clear(c);
    return held;
}

int
shadowd_preload(struct shadowd *c, const char *const *paths, int n)
{
    int srcs[PRELOAD_GROUP];
    const char *labels[PRELOAD_GROUP];
    ready(c);
    clear(c);
    after_fork(c);
    if (n < 0) {
        fail(c, "", EINVAL, "a preload of %d files", n);
        return -1;
    }
    int held = 0;
    for (int done = 0; done < n; done += PRELOAD_GROUP) {
        int m = n - done < PRELOAD_GROUP ? n - done : PRELOAD_GROUP;
        for (int i = 0; i < m; i++) {
            const char *path = paths[done + i];
            srcs[i] = path ? open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) : -1;
            labels[i] = path && path[0] == '/' ? path : NULL;
        }
        held += preload_group(c, srcs, labels, m);
        for (int i = 0; i < m; i++)
            if (srcs[i] >= 0)
                close(srcs[i]);
    }
    clear(c);
    return held;
}

/* -- pipelined ------------------------------------------------------------ */

/* Send an open of *src* as an owned request, its version before it
 * *before* (the caller's own fstat); a connection that broke is made again
 * once.
 * The slot, or NULL (error set). */
static struct shadowd_slot_ *
submit_open(struct shadowd *c, int src, const char *label, const struct shadowd_version_ *before,
            int nowait)
{
    struct request rq = {.kind = K_OPEN, .build = build_open, .fds = &src, .nfds = 1,
                         .size = before->size, .label = label, .nowait = nowait,
                         .before = before};
    for (int attempt = 0; attempt < 2; attempt++) {
        int fresh = !P(c)->live, failure;
        /* A full backlog is a daemon busy for a moment, not one that is
         * down: refused here as busy (the routed calls copy), the breaker
         * shut, and the next request tries to connect again. */
        int r = start(c, CONNECT_EARLY);
        if (r == 1) {
            fail(c, "busy", EAGAIN, "the daemon's listen backlog is full; ask again shortly");
            return NULL;
        }
        if (r != 0)
            return NULL;
        struct shadowd_slot_ *s = submit(c, &rq, 1, &failure);
        if (s != NULL)
            return s;
        if (failure != F_BROKEN && failure != F_VERSION)
            return NULL;
        if (failure == F_BROKEN && (fresh || attempt == 1)) {
            trip(c, c->error, mono_us());
            return NULL;
        }
    }
    return NULL;
}

long long
shadowd_submit_open(struct shadowd *c, int src, const char *label, void *tag)
{
    struct stat st;
    struct shadowd_version_ v;
    ready(c);
    clear(c);
    if (own_fstat(c, src, &st) < 0)
        return -1;
    version_of(&st, &v);
    struct shadowd_slot_ *s = submit_open(c, src, label, &v, 0);
    if (s == NULL)
        return -1;
    s->tag = tag;
    return s->id;
}

long long
shadowd_submit_routed(struct shadowd *c, int src, const char *label, void *tag, int *fd_now)
{
    struct stat st;
    struct shadowd_version_ v;

    ready(c);
    clear(c);
    *fd_now = -1;
    if (own_fstat(c, src, &st) < 0)
        return -1;
    if (!S_ISREG(st.st_mode)) {
        fail(c, "not-regular", EINVAL, "only regular files are served; this is not one");
        return -1;
    }
    version_of(&st, &v);
    after_fork(c);
    if ((*fd_now = held_take(c, &v, NULL)) >= 0) {
        c->route = SHADOWD_ROUTE_HELD;
        c->hit = 1;
        c->size = v.size;
        c->counts.held++;
        return 0;
    }
    if ((*fd_now = index_served(c, &st, &v, NULL)) >= 0)
        return 0;
    int why = copy_without_asking(c, &st, 1);
    if (why == SHADOWD_COPIED_NOT) {
        /* A duplicate of src, to check its fstat (or copy it) at collect. */
        int keep = fcntl(src, F_DUPFD_CLOEXEC, 0);
        if (keep >= 0) {
            char buf[LABEL_MAX + 1];
            struct shadowd_slot_ *s = submit_open(c, src, label_of(src, label, buf, sizeof buf),
                                                  &v, 1);
            if (s != NULL) {
                s->tag = tag;
                s->routed = 1;
                s->src = keep;
                return s->id;
            }
            close(keep);
        }
        why = SHADOWD_COPIED_FAILED;
    }
    *fd_now = copy_here(c, src, v.size, why);
    return *fd_now >= 0 ? 0 : -1;
}

int
shadowd_fd(struct shadowd *c)
{
    ready(c);
    return P(c)->live ? c->sock : -1;
}

int
shadowd_poll_timeout(struct shadowd *c)
{
    ready(c);
    long long until = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        const struct shadowd_slot_ *s = &P(c)->slots[i];
        if (s->owned && s->state == READY)
            return 0;
    }
    if (P(c)->live)
        until = owed_deadline(c, 0);
    if (until == 0)
        return -1;
    long long left = until - mono_us();
    return left <= 0 ? 0 : (int)((left + 999) / 1000);
}

int
shadowd_collect(struct shadowd *c, struct shadowd_result *out)
{
    ready(c);
    after_fork(c);
    if (P(c)->live) {
        drain(c);
        check_deadlines(c, mono_us());
    }
    struct shadowd_slot_ *s = NULL;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        struct shadowd_slot_ *t = &P(c)->slots[i];
        if (t->owned && t->state == READY && (s == NULL || t->seq < s->seq))
            s = t;
    }
    if (s == NULL)
        return 0;
    memset(out, 0, sizeof *out);
    out->id = s->id;
    out->tag = s->tag;
    out->fd = s->fd;
    out->hit = s->hit;
    out->size = s->size;
    out->errnum = s->errnum;
    out->route = s->fd >= 0 ? SHADOWD_ROUTE_DAEMON : SHADOWD_ROUTE_NONE;
    out->miss = s->served.miss;
    out->filling = s->served.filling;
    out->cached = s->served.cached;
    out->has_version = s->served.has_version;
    out->version = s->served.version;
    snprintf(out->code, sizeof out->code, "%s", s->code);
    snprintf(out->error, sizeof out->error, "%s", s->error);
    if (s->fd >= 0) {
        c->counts.daemon++;
        if (s->routed && may_keep(s->src, &s->before, &s->served, s->hit, s->size))
            held_put(c, s->fd, &s->before, s->asked_us);
    } else if (s->routed) {
        /* The daemon did not serve it: copied here, as the routed open does. */
        int why = s->served.miss && s->failure == F_NONE ? SHADOWD_COPIED_MISS
                                                          : SHADOWD_COPIED_FAILED;
        clear(c);
        c->miss = out->miss;
        c->filling = out->filling;
        snprintf(c->error, sizeof c->error, "%s", s->error);
        out->fd = copy_here(c, s->src, s->before.size, why);
        out->route = out->fd >= 0 ? SHADOWD_ROUTE_COPY : SHADOWD_ROUTE_NONE;
        out->copied_why = out->fd >= 0 ? why : SHADOWD_COPIED_NOT;
        out->hit = 0;
        out->size = s->before.size;
        out->errnum = out->fd >= 0 ? 0 : c->errnum;
        snprintf(out->code, sizeof out->code, "%s", out->fd >= 0 ? "" : c->code);
        snprintf(out->error, sizeof out->error, "%.159s", c->error);
    }
    s->fd = -1; /* the caller's now */
    slot_free(s);
    return 1;
}

int
shadowd_cancel(struct shadowd *c, long long id)
{
    ready(c);
    struct shadowd_slot_ *s = id > 0 ? slot_find(c, (uint64_t)id) : NULL;
    if (s == NULL || !s->owned || s->state == CANCELLED) {
        fail(c, "", ENOENT, "no pending request %lld", id);
        return -1;
    }
    if (s->state == READY) {
        slot_free(s); /* closes its fd */
        return 0;
    }
    s->state = CANCELLED; /* its reply's fds are closed when it comes */
    if (s->src >= 0)
        close(s->src);
    s->src = -1;
    return 0;
}

int
shadowd_pending(struct shadowd *c)
{
    ready(c);
    int n = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++) {
        const struct shadowd_slot_ *s = &P(c)->slots[i];
        n += s->owned && (s->state == SENT || s->state == READY);
    }
    return n;
}

void
shadowd_close(struct shadowd *c)
{
    struct shadowd_private_ *p = P(c);
    if (p->magic != MAGIC)
        return; /* zero-filled or never used: nothing here is ours */
    if (p->self == current_self() && p->live) {
        /* Read what came first: a socket closed with a reply unread in it
         * resets the connection, and the daemon would drop what we send now. */
        drain(c);
        /* (hint_flush sends only on a connection whose hello said 2.) */
        report_last(c, p->nhint == 0 || p->hello != H_DONE || c->protocol < 2 || p->down);
        hint_flush(c, 1);
    }
    index_drop(c); /* (in a forked child: its copies of the parent's) */
    for (int i = 0; i < p->nhint; i++)
        close(p->hint_fd[i]);
    p->nhint = p->hint_used = 0;
    if (p->live)
        close(c->sock); /* (in a forked child: its own copy) */
    c->sock = -1;
    p->live = 0;
    p->hello = H_NONE;
    p->connect_later = 0;
    for (int i = 0; i < SHADOWD_MAX_PENDING; i++)
        if (p->slots[i].id != 0)
            slot_free(&p->slots[i]);
    while (p->nheld > 0)
        held_drop(c, p->nheld - 1);
    if (p->relay >= 0)
        close(p->relay); /* (in a forked child: its copy of the parent's) */
    p->relay = p->relay_of = -1;
    if (p->procfd >= 0)
        close(p->procfd); /* (in a forked child: its copy of the parent's) */
    p->procfd = -1;
}
