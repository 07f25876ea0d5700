/*
 * shadowd's wire protocol (docs/protocol.md, versions 1 and 2) from C, and
 * the open path a supervisor needs around it. Two files, no dependencies,
 * C99 with GNU extensions, Linux. Build: cc -O2 -c shadowd.c. See
 * client/c/README.md.
 *
 * Every fd it returns is a sealed (the four seals, checked here), read-only
 * memfd with its own file offset (a served one at offset 0, checked), of
 * the version the caller's fstat of the source saw (a served one whose
 * reply says another version, or whose size is another, is refused:
 * client/c/README.md, "The version served"), and is the caller's to close. It never
 * keeps an fd the caller was not given, except the ones it says it keeps:
 * its connection, the memfds of the process-local tier (the routed calls
 * and shadowd_preload), an O_PATH fd of /proc/self/fd (once a memfd was
 * reopened: the tier's reopens then skip the walk through /proc and self),
 * one more descriptor number the tier reopens its memfds through (once one
 * was: a duplicate of the memfd last reopened while that one is held),
 * while it holds the daemon's index an O_PATH fd of the daemon's
 * /proc/PID/fd (and a read-only mapping of the index), sources kept for a
 * cold daemon or for the daemon to cache (shadowd_set_cold, the index) and
 * the replies of pipelined requests not yet collected; shadowd_close closes
 * them all. Nothing here allocates memory: every table is a bounded array
 * inside struct shadowd (about 180 KiB: keep it static or on the heap
 * rather than on a small thread stack). Not thread-safe: one struct per
 * thread, or a lock around it.
 *
 * Protocol: the hello says version 2; a daemon that answers
 * "unsupported-version" is greeted again with version 1 on a new
 * connection, and spoken to in version 1 until that connection is lost (a
 * restart may be an upgrade). In version 2 the routed calls, the routed
 * pipelined submit and shadowd_preload send "wait": false: a miss is
 * answered at once without an fd ("miss", "filling") and copied here while
 * the daemon fills its cache, so no reply of theirs waits on a copy. A
 * served reply says the version its fd holds and whether the daemon cached
 * it (only such an fd, of the version the caller's fstat saw, goes into the
 * process-local tier); the hello gives the daemon's racy window, which the
 * routed open then uses to copy young files without asking. shadowd_open,
 * shadowd_open_fd, shadowd_request_fd, shadowd_open_batch and
 * shadowd_submit_open keep version 1's meaning: they ask the daemon and
 * wait for its copy on a miss (shadowd_open and shadowd_open_fd take an
 * index hit first, where there is one).
 *
 * The routed open, cheapest first (see "routed" below): the process-local
 * tier; the daemon's index, where the daemon gives one (no round trip: see
 * "the index" below); local copies of small, young and too large files;
 * the daemon, without waiting for its copy; a local copy whenever the
 * daemon does not serve the file. Three refinements, measured on the project's 2-vCPU
 * machines (client/c/README.md): a daemon that answers with a miss it is
 * filling is cold, and gets no routed request for a second (what a miss
 * costs it is paid by the program; the files are told to it later in one
 * cheap batch: shadowd_set_cold); a file that the daemon's index, when
 * held, lacks is raced (the daemon almost surely has no copy: its answer
 * is not waited for); and, off by default for the other files, a race that
 * copies while the answer is on its way (shadowd_set_race).

 * Never stalled by the daemon. Each call waits for the daemon at most:
 *   - connect + hello: 250 ms by default. A healthy daemon answers a hello
 *     in well under a millisecond; 250 ms covers a loaded host, and a daemon
 *     slower than that is better left alone for a while (local copies are
 *     the status quo, not an error).
 *   - a reply that does not wait on a copy (the routed calls and preload on
 *     a version 2 daemon): 250 ms, whatever the size. A hit or a miss is
 *     answered in well under a millisecond.
 *   - a reply that may wait while the daemon copies the file (the calls
 *     above that keep version 1's meaning, every request to a version 1
 *     daemon, a publish): 250 ms plus 4 ms per MiB of the file, a read at
 *     250 MB/s (a cold SSD; a copy from the page cache runs at several GB/s
 *     here), so that a legitimate miss of a 256 MiB file is not taken for a
 *     hung daemon.
 * All settable at run time (shadowd_set_timeouts); SHADOWD_TIMEOUT_SECONDS
 * (30 unless defined when compiling shadowd.c) is the ceiling of all.
 * Signals do not stretch a wait: it ends at its deadline.
 *
 * Circuit breaker: a timeout, a refused or broken connection (once a new one
 * also failed), a daemon that is gone or turns this client away opens it,
 * and so do three answers in a row that took half the reply timeout or
 * more (shadowd_set_slow).
 * Then every call that would talk to the daemon fails at once with code
 * "unavailable" (the routed calls copy locally instead) until the backoff
 * window ends: 1 s at first, doubled after every failed retry, at most
 * 30 s (shadowd_set_backoff). The first call after the window tries the
 * daemon again. One log line when the daemon goes away, one when it is
 * back (stderr; shadowd_set_log redirects or silences them).
 *
 * Codes in `code`: the daemon's error codes (docs/protocol.md: "not-regular",
 * "file-too-large", ...), and the client's own, which the daemon never
 * sends: "unavailable" (the daemon could not be reached, did not answer in
 * time, broke the connection, or the breaker is open) and "" (anything else
 * that went wrong here: then `errnum` holds the errno when a system call
 * failed, say opening the source, and `error` says what happened).
 */
#ifndef SHADOWD_H
#define SHADOWD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHADOWD_HELD_SLOTS 1024   /* most files the process-local tier can hold */
#define SHADOWD_MAX_PENDING 64    /* most requests in flight (and replies uncollected) */
#define SHADOWD_HINTS 64          /* most files copied here to tell the daemon of (one batch) */
#define SHADOWD_REQUEST_BUF 16384 /* largest request this client writes */
#define SHADOWD_REPLY_BUF 65536   /* largest reply it reads (a batch of 250 errors fits) */
#define SHADOWD_REPORTS 256       /* most files whose index hits wait to be reported */
#define SHADOWD_MISS (-2)         /* shadowd_lookup: the daemon does not have the file */
#define SHADOWD_UNAVAILABLE "unavailable" /* the client's own code (see above) */

/* How a routed open was served (the `route` field). */
enum shadowd_route {
    SHADOWD_ROUTE_NONE = 0,
    SHADOWD_ROUTE_DAEMON = 1, /* the daemon's reply */
    SHADOWD_ROUTE_HELD = 2,   /* reopened from the process-local tier, no request */
    SHADOWD_ROUTE_COPY = 3,   /* copied here (shadowd_copy_fd) */
    SHADOWD_ROUTE_INDEX = 4,  /* reopened from the daemon's memfd through its index, no request */
};

/* Why a routed open copied the file here (the `copied_why` fields). */
enum shadowd_copied_why {
    SHADOWD_COPIED_NOT = 0,     /* not copied here */
    SHADOWD_COPIED_RULE = 1,    /* without asking: small, young or too large (shadowd_set_routing) */
    SHADOWD_COPIED_MISS = 2,    /* the daemon answered a miss (version 2): it fills its cache */
    SHADOWD_COPIED_BREAKER = 3, /* without asking: the breaker is open */
    SHADOWD_COPIED_FAILED = 4,  /* the daemon failed or refused (`error` says why) */
    SHADOWD_COPIED_FIRST = 5,   /* the copy was done before the daemon answered (race) */
    SHADOWD_COPIED_COLD = 6,    /* without asking: the daemon is filling (shadowd_set_cold) */
};

/* A file version as a served reply says it (version 2): whose bytes an fd holds. */
struct shadowd_version {
    uint64_t size;
    int64_t mtime_ns, ctime_ns;
};

/* A private file's key: what the caller's own fstat of it says. */
struct shadowd_key {
    uint64_t ino, size;
    int64_t mtime_ns, ctime_ns;
    int has_ctime; /* 0: the file system has no ctime (sent as nil) */
};

/* One item of a batch: an fd, or -1 and why not. */
struct shadowd_item {
    int fd;         /* the caller's; -1 when not served */
    int hit;        /* from the cache (or the process-local tier) */
    int route;      /* enum shadowd_route */
    int errnum;     /* errno when a system call failed for this item, else 0 */
    uint64_t size;
    char code[32];  /* as c->code, "" when served */
    int copied_why; /* enum shadowd_copied_why (routed calls) */
    int miss;       /* v2: the daemon answered a miss without an fd */
    int filling;    /* ... and is filling its cache with that version */
    int cached;     /* v2: the served version is in the daemon's cache */
    int has_version; /* v2: the reply said which version it served: */
    struct shadowd_version version;
};

/* A collected pipelined request. */
struct shadowd_result {
    long long id;   /* what the submit returned */
    void *tag;      /* what the caller passed to the submit */
    int fd;         /* the caller's; -1 when not served */
    int hit, route, errnum;
    uint64_t size;
    char code[32];
    char error[160];
    int copied_why, miss, filling, cached, has_version; /* as in shadowd_item */
    struct shadowd_version version;
};

/* Write one log line (no newline) somewhere; see shadowd_set_log. */
typedef void (*shadowd_log_fn)(void *arg, const char *line);

/* Write a private file's key->size bytes into *memfd* (offset 0 onwards;
 * write, ftruncate+mmap, whatever); 0, or -1 to give up (errno kept). */
typedef int (*shadowd_fill_fn)(void *arg, int memfd);

/* -- internals: use the functions below, never these fields ---------------- */
struct shadowd_held_ {
    uint64_t dev, ino, size, used;
    int64_t mtime_ns, ctime_ns;
    int fd;
    uint64_t memfd_dev, memfd_ino; /* the kept memfd: what the daemon's index must name */
    int64_t memfd_ctime_ns;
    long long vouched_us; /* when the daemon last vouched for it (CLOCK_MONOTONIC, us) */
};

/* What a reply said beyond fd, size and hit (version 2). */
struct shadowd_served_ {
    uint8_t miss, filling, cached, has_version, proto;
    struct shadowd_version version;
};

struct shadowd_version_ {
    uint64_t dev, ino, size;
    int64_t mtime_ns, ctime_ns;
};

struct shadowd_slot_ {
    uint32_t id;               /* 0: free */
    uint8_t state, kind, routed, owned, nowait, late;
    uint8_t check;             /* what a served fd must be: 0 anything, 1 `before`, 2 its size */
    int fd, src, hit, route, errnum, failure;
    uint64_t size, seq, src_size;
    long long deadline, asked_us; /* asked_us: when it was made, just before it was sent */
    long long answered_us;     /* when its answer was read (0: none came) */
    void *tag;
    struct shadowd_item *items;
    const int *map;
    const struct shadowd_version_ *befores; /* a batch's: each fd's source before the request */
    int nitems;
    struct shadowd_version_ before;
    struct shadowd_served_ served;
    char code[32];
    char error[160];
};

/* One file's index hits not reported yet. */
struct shadowd_report_ {
    uint64_t dev, ino;
    uint64_t hits;
};

struct shadowd_private_ {
    uint64_t magic;
    int live, hello, explicit_path, log_set, last_failure, want_version, racy_known;
    int self; /* the process that set this up or last used it (shadowd.c, current_self) */
    int connect_later; /* shadowd_connect_start found the backlog full: connect_wait connects */
    int race, late_pending;
    int procfd, procfd_self; /* an O_PATH fd of /proc/self/fd, and whose (current_self) */
    int relay, relay_self, relay_of; /* the tier's reopen number (held_reopen), whose, and what
                                      * held fd it duplicates (-1: none) */
    int cold_misses, cold_ms, cold_streak, nhint;
    uint64_t cold_dev, cold_ino; /* the last file missed (a miss of it again is no news) */
    long long cold_until;
    int hint_fd[SHADOWD_HINTS];
    int hint_label[SHADOWD_HINTS]; /* offset in hint_labels, or -1 */
    uint64_t hint_dev[SHADOWD_HINTS], hint_ino[SHADOWD_HINTS]; /* each told file's identity */
    long long hint_since; /* when the oldest file kept was added (mono_us) */
    int hint_used;
    int hint_due; /* the files kept are to be told at shadowd_idle or the next routed call */
    char hint_labels[16384];
    long long hello_deadline;
    int connect_ms, reply_ms, reply_ms_per_mib, backoff_first_ms, backoff_max_ms, young_ms;
    int slow_percent, slow_in_a_row, slow_streak; /* the latency breaker (shadowd_set_slow) */
    long long slow_at; /* when the last slow answer counted came (mono_us) */
    long long local_below, held_max_bytes, held_recheck_us;
    int held_max;
    shadowd_log_fn log;
    void *log_arg;
    int down, backoff_ms;
    long long down_until, down_since;
    char down_why[200];
    char looked[300];
    int nheld;
    uint64_t held_bytes, clock, seq;
    struct shadowd_held_ held[SHADOWD_HELD_SLOTS];
    uint16_t held_index[2 * SHADOWD_HELD_SLOTS]; /* (dev, ino) -> held entry + 1 */
    struct shadowd_slot_ slots[SHADOWD_MAX_PENDING];
    /* The daemon's index (docs/protocol.md, "The index"), this connection's. */
    int index_use, index_keep, index_wanted, index_state, index_dirfd, index_pid, index_owner;
    uint32_t index_slots, index_probes;
    /* The daemon's range (memfds only, always: no O_PATH); 0, 0 unless the
     * daemon is of our effective uid (its SO_PEERCRED). */
    uint32_t index_range_base, index_range_count;
    uint64_t index_memfd_dev; /* the header's: the kernel's, as a memfd of ours says */
    uint64_t index_key;       /* the header's slot key: keys where a file's probe starts */
    int index_fd;              /* the daemon's own fd of the index (-1: not known) */
    uint64_t index_dev, index_ino; /* the index memfd's: what the daemon's index_fd must be */
    long long index_alive_us;  /* when the daemon was last seen alive (its index_fd there) */
    const uint8_t *index_map;
    size_t index_len;
    /* Index hits not reported yet, per file, and of files that found the
     * table full (reported as file 0, 0); kept until a report of them is
     * sent, for the daemon whose index they came through (its pid and the
     * index's generation). */
    int nreport, report_pid;
    uint32_t report_hits;
    uint64_t report_generation, report_spill;
    long long report_at;
    struct shadowd_report_ report[SHADOWD_REPORTS];
    uint16_t report_index[2 * SHADOWD_REPORTS]; /* (dev, ino) -> report entry + 1 */
    uint8_t wbuf[SHADOWD_REQUEST_BUF];
    uint8_t rbuf[SHADOWD_REPLY_BUF];
};
/* -------------------------------------------------------------------------- */

/*
 * One per thread. Start it zero-filled (`struct shadowd c = {0};`, or
 * `{.sock = -1}` as before) or with shadowd_init; any call sets it up on
 * first use. The fields below are for reading; they describe the last call.
 */
struct shadowd {
    int sock;               /* the connection; -1 when there is none */
    uint32_t next_id;       /* the next request's id */
    uint64_t max_request;   /* the daemon's limits, from its hello (0: not known yet) */
    uint64_t max_batch, max_file_size, max_inflight, max_namespace;
    uint64_t racy_window_ns; /* from a version 2 hello (0: not said) */
    /* (max_file_size and racy_window_ns stay the last hello's on a new
     * connection until its own hello answers.) */
    int protocol;           /* the version the daemon answered the hello with (0: none yet) */
    uint64_t size;          /* of the last file opened */
    int hit;                /* whether it came from the cache (daemon or tier) */
    int route;              /* enum shadowd_route, for the routed calls */
    int copied_why;         /* enum shadowd_copied_why, for the routed calls */
    int miss, filling;      /* v2: the daemon answered a miss (and is filling its cache) */
    int cached;             /* v2: the served version is in the daemon's cache */
    int has_version;        /* v2: the reply said which version it served: */
    struct shadowd_version version;
    int errnum;             /* errno of the system call that failed, or 0 */
    char code[32];          /* the daemon's code, the client's own, or "" (above) */
    char error[256];        /* what went wrong, for a person */
    char socket_path[108];  /* where it connects */
    struct {
        uint64_t daemon;    /* fds the daemon served */
        uint64_t held;      /* fds reopened from the process-local tier */
        uint64_t copied;    /* fds copied here by the routed calls */
        uint64_t fast;      /* calls failed (or routed local) at once by the breaker */
        uint64_t missed;    /* routed opens the daemon answered with a miss (copied here) */
        uint64_t preloaded; /* files shadowd_preload put in the tier */
        uint64_t index;     /* fds reopened through the daemon's index (no request) */
        uint64_t index_refused; /* index slots of the caller's version whose memfd failed a check */
        uint64_t reported;  /* index hits told to the daemon (report requests sent) */
        uint64_t read_opens; /* shadowd_open_routed_opath: files it opened for reading */
        uint64_t unopened;  /* ... and tier hits it served without that open (faccessat2) */
        uint64_t other_version; /* fds the daemon served that were not the version the
                                 * caller's fstat saw (refused: copied here, or the call
                                 * failed "unstable") */
        uint64_t slow;      /* answers that took the slow share of the reply timeout or more */
    } counts;
    struct shadowd_private_ priv_;
};

/* ---- setting up --------------------------------------------------------- */

/* Set *c* up as if zero-filled, with the defaults: for a struct of unknown
 * contents (malloc, the stack). The request and reply buffers and the
 * arrays read only below a count are left as they are (150 KiB of the
 * struct, never touched before they are used). Never closes anything: not
 * for a struct in use. */
void shadowd_init(struct shadowd *c);

/* The socket path of the one rule every client follows: $SHADOWD_SOCKET
 * when set and not empty; else the first of these that is a socket
 * (lstat): $XDG_RUNTIME_DIR/shadowd/shadowd.sock, or without it (unset,
 * empty or relative) /run/user/<euid>/shadowd/shadowd.sock (not for root), then
 * /run/shadowd/shadowd.sock; else the first of them. Written to *buf*
 * unless it is $SHADOWD_SOCKET itself; NULL when *buf* is too small. */
const char *shadowd_default_socket(char *buf, size_t len);

/* Connect to *socket_path* (NULL: shadowd_default_socket, looked up again
 * at every reconnection) and say hello. 0, or -1 with code and error set
 * (the error names the places looked at). Drops a connection *c* had (its
 * pipelined requests fail); keeps the settings and the process-local tier.
 * Calling it is optional: every call below connects when it needs to. */
int shadowd_connect(struct shadowd *c, const char *socket_path);

/* The same, without waiting for the hello's answer: connect (without
 * waiting for room in the daemon's backlog), send the hello and, while the
 * index is in use (shadowd_set_index), the request for the index right
 * behind it; the next call that needs the answers reads them
 * (shadowd_connect_wait, shadowd_index_ready, an open). A caller starts
 * its connection early this way, say before it forks the tracee, so that
 * the daemon answers while it does. A daemon whose backlog is full (busy
 * accepting, not down) is no failure: then nothing is sent, and
 * shadowd_connect_wait connects, waiting for room up to the connect
 * timeout, and sends both requests. 0, or -1 with code and error set (then
 * the next call tries again, as every call does). */
int shadowd_connect_start(struct shadowd *c, const char *socket_path);

/* Wait for the answer to the hello shadowd_connect_start sent (connecting
 * first when there is no connection, or when shadowd_connect_start found
 * the backlog full: then the connect and the hello's answer together wait
 * at most the connect timeout, as in shadowd_connect): 0, or -1 with code
 * and error set, as shadowd_connect says. */
int shadowd_connect_wait(struct shadowd *c);

/* Where to connect, without connecting now: *socket_path*, or NULL for
 * the socket rule (looked up at every connection). 0, or -1 when the path
 * does not fit in a socket address. */
int shadowd_set_socket(struct shadowd *c, const char *socket_path);

/* Close the connection, every fd of an uncollected pipelined reply and of
 * the process-local tier. Fds already returned stay valid. Safe on a
 * zero-filled struct (it closes nothing) and twice; *c* can be used again
 * (settings and breaker kept). Waits for answers the daemon owes at most
 * the reply timeout, or an owed request's own later deadline (one that may
 * wait on the daemon's copy; client/c/README.md, "Reports"); reaching it
 * opens the breaker. */
void shadowd_close(struct shadowd *c);

/* Timeouts in ms (see the top of this file): connect + hello, a reply, and
 * what a reply that may wait on the daemon's copy gets per MiB of the file
 * besides; a negative value keeps the default (250, 250, 4). Clamped to
 * SHADOWD_TIMEOUT_SECONDS. */
void shadowd_set_timeouts(struct shadowd *c, int connect_ms, int reply_ms, int reply_ms_per_mib);

/* The breaker's first window and its cap, in ms; negative: the default
 * (1000, 30000). first_ms 0: never fail fast (every call tries the daemon;
 * the log lines still come). */
void shadowd_set_backoff(struct shadowd *c, int first_ms, int max_ms);

/* The latency breaker: an answer that took *percent* of the reply timeout
 * or more is slow, and *in_a_row* slow answers in a row open the breaker
 * as a failure does (negative: the defaults, 50 and 3; in_a_row 0: never),
 * so that a daemon answering every request just within the timeout costs
 * a supervisor at most about that many slow answers per backoff window,
 * not nearly a timeout per open. Timed: the routed calls' requests and
 * shadowd_preload's batches to a version 2 daemon (the requests that do
 * not wait on its copy), from just before each is sent to when its answer
 * is read while the call waits for it; not the connect nor the hello, and
 * not the pipelined calls' requests (when their answers are read is the
 * caller's doing). An answer asked before the last slow one counted came
 * (it waited behind it) is not counted again. The connection stays open;
 * after the window one more slow answer opens the breaker again (the
 * window doubled), an answer in time closes it. counts.slow counts the
 * slow answers. */
void shadowd_set_slow(struct shadowd *c, int percent, int in_a_row);

/* Where the breaker's two log lines go: fn(arg, line); fn NULL: nowhere.
 * Never called: stderr, as "shadowd: ..." lines. fn runs inside a call on
 * *c* and must not call shadowd functions on *c* itself. */
void shadowd_set_log(struct shadowd *c, shadowd_log_fn fn, void *arg);

/* 1 when a call would try the daemon now, 0 while the breaker is open. */
int shadowd_available(struct shadowd *c);

/* ---- through the daemon ------------------------------------------------- */

/* A sealed, read-only fd with the bytes of *path*, opened here
 * (O_RDONLY|O_NONBLOCK|O_CLOEXEC) and passed as the proof that we may read
 * it. -1 on failure: code holds the daemon's code when it refused (say
 * "not-regular"), "unavailable" when the daemon was not reached or did not
 * answer in time, "unstable" when it served another version than this
 * client's fstat of the file just before the request saw, "" otherwise. A connection that broke (the daemon
 * restarted) is made again, once; one that failed otherwise is closed, and
 * a later call connects again (after the breaker's window). */
int shadowd_open(struct shadowd *c, const char *path);

/* Like shadowd_open for an fd the caller opened for reading (it stays the
 * caller's); *label* (may be NULL) names the file in the daemon's stats:
 * it is sent only when absolute, valid UTF-8 and within max_request.
 * Where this connection holds the daemon's index (a peer of the daemon's
 * uid or root: "the index" below), a cached file of the version the
 * caller's fstat of *src* sees is reopened from it, with no request (route
 * SHADOWD_ROUTE_INDEX; the hit is counted and reported to the daemon like
 * the routed calls' index hits); anything else is one request that the
 * daemon answers, waiting for its copy on a miss. It never uses the
 * process-local tier and never adds to it. A supervisor wants
 * shadowd_open_routed_fd: the same fd, from the tier when this process
 * holds that version, copied here where that is cheaper or the daemon
 * misses. In version 2, `version` and `cached` say what a reply said.
 * Every served fd is checked against the caller's own fstat of *src*, so
 * a source whose fstat fails is refused before anything is asked (errnum
 * its errno; as every call that takes a source, shadowd_open_batch's
 * items included: client/c/README.md, "The version served"). */
int shadowd_open_fd(struct shadowd *c, int src, const char *label);

/* shadowd_open_fd without the index: always one request that the daemon
 * answers (and counts), so that what it measures and what the daemon's
 * stats say is the daemon (shadowd bench and the crossover time it so). */
int shadowd_request_fd(struct shadowd *c, int src, const char *label);

/* Open n files: items[i] for srcs[i] (labels may be NULL, or hold NULLs).
 * One round trip per max_batch files. Returns how many were served (each
 * item says why not: the daemon's code, or "unavailable"; a src < 0 gets
 * errnum EBADF); -1 only for n < 0. */
int shadowd_open_batch(struct shadowd *c, const int *srcs, const char *const *labels, int n,
                       struct shadowd_item *items);

/* ---- private files (no host fd: say, a disk image's) -------------------- */

/* The daemon's copy of the file of this uid, *ns* (1 to 255 bytes of UTF-8,
 * say a digest of the image) and *key*: an fd, SHADOWD_MISS, or -1. */
int shadowd_lookup(struct shadowd *c, const char *ns, const struct shadowd_key *key);

/* Hand *memfd* (holding exactly key->size bytes; best a memfd made with
 * MFD_ALLOW_SEALING, read-write) to the daemon, which seals it in place or
 * copies it; returns a sealed read-only fd of what it keeps (another
 * publisher's copy when one was first: then hit is 1), or -1. *memfd*
 * stays the caller's. */
int shadowd_publish(struct shadowd *c, const char *ns, const struct shadowd_key *key, int memfd);

/* lookup; on a miss, fill(arg, memfd) into a fresh memfd made here
 * (executable iff *executable*), checked to hold key->size bytes, then
 * publish. Never fails because of the daemon: when it cannot help, the
 * filled memfd is sealed here (fill runs at most once per call). -1 when
 * fill fails (errnum) or writes the wrong size (code "size-mismatch"). */
int shadowd_open_private(struct shadowd *c, const char *ns, const struct shadowd_key *key,
                         int executable, shadowd_fill_fn fill, void *arg);

/* ---- routed: what a supervisor calls on its open path --------------------
 *
 * Never fails because of the daemon; -1 only when the file itself cannot
 * be opened or read (errnum), or is not a regular file (code
 * "not-regular"). Cheapest first:
 *   1. the process-local tier: a version of this file (st_dev, st_ino) this
 *      process got from the daemon, whose (size, mtime_ns, ctime_ns) equal
 *      the caller's fstat now, and which the daemon still serves as that
 *      very memfd (see shadowd_set_held_recheck), is reopened through
 *      /proc/self/fd/N (a new open file description; seals checked): no
 *      request at all;
 *   1b. the daemon's index (below): the daemon's memfd of that very
 *      version, reopened through /proc/PID/fd/N: no request either, and
 *      small files too (an index hit costs less than any copy);
 *   2. copied here (shadowd_copy_fd) without asking: while the breaker is
 *      open; files below `local_below` bytes (cheaper to copy than to ask);
 *      files above the daemon's max_file_size; files whose ctime is younger
 *      than the daemon's racy window (it would not cache them);
 *   3. the daemon, without waiting for its copy (version 2): a served fd of
 *      the caller's version is returned (one of another version, or size,
 *      is refused), a miss is copied here while the daemon fills its cache;
 *      and when the daemon fails for any reason, copied here.
 * `copied_why` says why a file was copied. A served fd goes into the tier
 * when the reply says `cached` and its `version` equals the caller's fstat
 * before the request (ctime never goes back: a same-size rewrite with the
 * old mtime put back has another version). From a version 1 daemon, which
 * says neither, a hit goes into the tier when the caller's fstat after the
 * reply equals the one before it. The tier is bounded by entries and bytes
 * (least recently used goes first) and holds only memfds. While the index
 * is in use, a file that rule 2 copies because it is small is also told
 * to the daemon (one batch later, as a cold daemon's files are) so that the
 * next process finds it in the index. */
int shadowd_open_routed(struct shadowd *c, const char *path);
int shadowd_open_routed_fd(struct shadowd *c, int src, const char *label);

/* shadowd_open_routed_fd with the caller's own fstat of *src*, *st*, as a
 * supervisor has just made it to check the file is regular: one system
 * call less per open. *st* must be fstat(src) made just before the call,
 * as shadowd_index_open's: the tier and the index serve the version it
 * says, exactly as they would the version of the call's own fstat. */
int shadowd_open_routed_stat(struct shadowd *c, int src, const struct stat *st,
                             const char *label);

/* shadowd_open_routed_stat for a caller that holds the file as an O_PATH
 * descriptor, *at* (as a supervisor resolves a tracee's path: an O_PATH
 * open looks without opening, so a FIFO or a device is never opened for
 * reading), with its fstat *st* (NULL: fstat(at) here). A tier hit (the
 * process-local tier, the daemon's index) needs the file's stat, not its
 * bytes: it is served without opening the file for reading, once
 *   faccessat2(at, "", R_OK, AT_EMPTY_PATH | AT_EACCESS)
 * says the caller may read it (Linux 5.8; the permission check open
 * makes, with the credentials open uses). The file is opened for reading
 * (O_RDONLY | O_NONBLOCK | O_NOCTTY, through /proc/self/fd/AT: the very
 * inode *st* describes) only when no tier serves it (it is copied here or
 * passed to the daemon) or that check says no or cannot be made; that open
 * then decides, and it is closed before the call returns. The check is not
 * all of open: an LSM that decides at file_open (Landlock, AppArmor), a
 * fanotify permission listener and the file system's own open see nothing
 * of a hit; a caller for whom they matter opens the file itself and calls
 * shadowd_open_routed_stat (client/c/README.md, "The O_PATH source"). -1
 * as the routed open (errnum EACCES when the caller may not read the
 * file); counts.read_opens and counts.unopened say which way each file
 * went. */
int shadowd_open_routed_opath(struct shadowd *c, int at, const struct stat *st, const char *label);

/* The routed open of *path* relative to *dirfd* (AT_FDCWD, or a directory
 * fd), as openat would: the source is opened with
 * O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC plus the caller's O_NOFOLLOW.
 * *flags* must ask for reading only (no O_WRONLY/O_RDWR, O_CREAT, O_TRUNC,
 * O_PATH, O_TMPFILE): EINVAL otherwise. */
int shadowd_openat(struct shadowd *c, int dirfd, const char *path, int flags);

/* The routed calls of n files at once: items[i] for srcs[i]; those that go
 * to the daemon go in batches. Returns how many were served. */
int shadowd_open_batch_routed(struct shadowd *c, const int *srcs, const char *const *labels,
                              int n, struct shadowd_item *items);

/* Routing settings: files below *local_below* bytes are copied here
 * (negative: the default, measured on the project's machines; 0: never by
 * size); files whose ctime is younger than *young_ms* are copied here
 * (negative: the daemon's racy window, from its version 2 hello, 1000 ms
 * until it says; 0: never by age). */
void shadowd_set_routing(struct shadowd *c, long long local_below, int young_ms);

/* Whether the routed open copies the file while it waits for the daemon's
 * answer and takes whichever is done first (1), or waits for the answer (up
 * to the reply timeout) and copies only when the daemon does not serve the
 * file (0, the default). On a host with idle cores the race makes an open
 * cost the lesser of a copy and a hit; on the 2-vCPU machines this project
 * is measured on the copy competes with the daemon for the CPU and delays
 * its answer, so the race did not pay (client/c/README.md). */
void shadowd_set_race(struct shadowd *c, int on);

/* A cold daemon: after misses of *misses* files in a row that the daemon is
 * filling (version 2), the routed open copies here without asking for
 * *window_ms* (copied_why SHADOWD_COPIED_COLD; the tier still serves what
 * it holds), then asks again; and while the daemon's index is held, a file
 * the index lacks is copied so at once, with no miss first (unless the race
 * is asked for). A miss costs the program a round trip to a daemon that
 * does far more for it than for an item of a batch, so the files copied
 * meanwhile are told to the daemon later in one batch that does not wait
 * ("wait": false; at most SHADOWD_HINTS files, each an fd kept until then):
 * when the list is full, when the window is over, when the first was kept
 * *window_ms* ago, when one of them is opened again (while the index is
 * held: its next opens are then index hits), and at shadowd_close.
 * Negative: the defaults (1 miss, 1000 ms); misses 0: never (a file the
 * index lacks is then raced). */
void shadowd_set_cold(struct shadowd *c, int misses, int window_ms);

/* The process-local tier's bounds: at most *max_entries* files (up to
 * SHADOWD_HELD_SLOTS; 0 turns it off) and *max_bytes* bytes of them;
 * negative: the defaults (128 files, 64 MiB). Shrinking evicts. Each held
 * file is an open fd of this process: keep *max_entries* well below
 * RLIMIT_NOFILE. */
void shadowd_set_held(struct shadowd *c, int max_entries, long long max_bytes);

/* How long the process-local tier serves a version without the daemon
 * vouching for it again, in ms (negative: the default, 1000; 0: never
 * without it). A held memfd is served only while the daemon still serves
 * that very memfd for that version, so that a change the daemon saw but
 * stat cannot show (bytes written through a shared writable mapping on
 * tmpfs, seen at the writer's last munmap or close) ends it:
 *   - while the daemon's index is held (its uid, or root): at each open,
 *     the file's slot must be live, of the caller's version, and name the
 *     held memfd (its inode and ctime; read as an index hit reads a slot).
 *     Otherwise the entry is dropped and the open goes on down the tiers:
 *     no later than the daemon's own drop. The daemon is looked at once per
 *     bound (its descriptor of the index in its /proc/PID/fd): a daemon
 *     that is gone no longer changes its index, which then no longer
 *     vouches (its connection and index are dropped);
 *   - without an index (another uid's daemon, the index not come yet or
 *     turned off, a forked child until its own connection has one, the
 *     daemon gone), an entry the daemon vouched for (a reply that served
 *     it, an index that named it) more than *ms* ago is dropped and the
 *     open goes on down the tiers: the daemon is asked again, and what it
 *     serves in that version is kept again (the same memfd when the
 *     daemon still has it; a reply of a memfd still held only vouches for
 *     it again). While the breaker is open nothing is asked: such entries
 *     are dropped and their files copied here.
 * What it costs: one request per held file and bound, measured in
 * client/c/README.md. */
void shadowd_set_held_recheck(struct shadowd *c, int ms);

/* Fill the process-local tier before the opens that will want it (the DSOs
 * a loader will map, the files a previous run opened): the files the daemon
 * has cached, in the version this process's fstat sees, are kept, so that
 * their routed opens need no request. One open_batch request per max_batch
 * files, all sent before any reply is read, with "wait": false: misses are
 * not waited for (the daemon fills its cache meanwhile). Files below
 * `local_below` are asked for too (a batch costs one round trip however
 * many files it carries, and a tier hit is cheaper than any copy); files
 * already held, young, too large, not regular or not readable are not.
 * Returns how many of the files are in the tier now; -1 only for n < 0.
 * Never fails because of the daemon (breaker open, a timeout: fewer kept).
 * *paths* are opened here (O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC) and
 * sent as their labels when absolute; the fds variant takes the caller's
 * fds (they stay the caller's) and labels (NULL, or NULLs). */
int shadowd_preload(struct shadowd *c, const char *const *paths, int n);
int shadowd_preload_fds(struct shadowd *c, const int *srcs, const char *const *labels, int n);

/* The local copy: the same kind of fd the daemon serves, made here from the
 * regular file open at *src* (kept the caller's): a memfd created with
 * MFD_EXEC or MFD_NOEXEC_SEAL (plain on kernels without them), mode 0555
 * when the source has an execute bit else 0444, the four seals (EBUSY
 * retried for 70 ms), reopened read-only. A copy during which the source's
 * fstat changed is made again (three tries). *c* may be NULL (errno then
 * says what failed). */
int shadowd_copy_fd(struct shadowd *c, int src);

/* ---- the index: hits without a round trip -------------------------------
 *
 * A daemon gives its index of its cache (docs/protocol.md, "The index") to
 * peers that may read its descriptors anyway: its own uid, or root. The
 * routed calls use it after their process-local tier and before any rule,
 * shadowd_open_fd and shadowd_open before their request:
 * the caller's own fstat of the source finds the file's slot, and the
 * daemon's memfd is reopened through /proc/PID/fd/N, no request at all
 * (route SHADOWD_ROUTE_INDEX). An fd comes from the index only when every
 * check holds:
 *   - the slot is live, names the source's (st_dev, st_ino), and its
 *     version (size, mtime_ns, ctime_ns) is the caller's fstat; its seq is
 *     even (no write under way) and the same after the reopen, so the slot
 *     held still while it was used (the daemon changes it before it may
 *     close that memfd: a descriptor number reused since cannot pass);
 *   - /proc/PID/fd/N, opened read-only at once when N is in the daemon's
 *     descriptor range (every number there is a memfd at every instant),
 *     else O_PATH (no driver's open runs, whatever N is by then: a FIFO,
 *     a device), is a regular file whose st_dev is the daemon's memfd
 *     device and whose inode, size, mode and ctime are the slot's (a
 *     holder that changed the memfd moved its ctime);
 *   - the read-only fd (outside the range, a reopen of the O_PATH one
 *     through /proc/self/fd: its own open file description and offset)
 *     has the four seals.
 * Anything else: the file goes on down the routed open (rules, the
 * daemon, a local copy), and `counts.index_refused` counts a slot of the
 * caller's version that failed a check.
 *
 * The index belongs to a connection: it is asked for once per connection
 * ({"op": "index"}), after a hello of version 2, by the first routed call
 * that finds none, without waiting for the answer (the calls until it
 * comes go on without it); a daemon that answers "not-permitted" (another
 * uid), "no-index" or anything but an index gives none on that
 * connection, which is never an error to the caller. It is mapped
 * read-only, only when sealed against shrinking (F_SEAL_SHRINK: cut short
 * under the mapping, it would kill this process with SIGBUS; the daemon
 * sealed it: nobody else can write or grow it either) and
 * dropped with its connection: after a daemon restart the new connection
 * asks the new daemon for its own. Index hits are counted per file and
 * told to the daemon ({"op": "report"}, not waited for) after 256 hits or
 * when a hit comes a second after the last report, and at shadowd_close,
 * so that its stats (`index_hits`) and LRU order stay true. A report is
 * never waited for when sent; what one could not carry (no request slot
 * free, the socket full) is kept, bounded, and goes with the next report
 * to that same daemon (client/c/README.md, "Reports"). Files copied here
 * by the size rule while the index is in use are told to the daemon (as a
 * cold daemon's are, shadowd_set_cold) so that the next process finds them
 * in the index. Only on little-endian hosts (the layout is). While it holds
 * an index the client keeps one more fd (an O_PATH fd of the daemon's
 * /proc/PID/fd) and a read-only mapping. */

/* Whether the routed calls and shadowd_open_fd (shadowd_open) use the
 * daemon's index (*use*: 1, the default;
 * 0 never asks for it) and whether an index hit also goes into the
 * process-local tier (*keep*: 1, or 0, the default; negative: the
 * default), so that the next open of that version reopens the tier's fd
 * instead (client/c/README.md says what each costs). Turning it off drops
 * the index held. */
void shadowd_set_index(struct shadowd *c, int use, int keep);

/* Get the index now if this connection has none yet: connect and say
 * hello if needed (the breaker allowing), ask, and wait for the answer up
 * to the reply timeout. 1 when an index is held, 0 when not (the daemon
 * gives none or is not reachable; or it did not answer in time, which is
 * a timeout as any request's: the connection is dropped and the breaker
 * opens). A supervisor calls it once before its tracee starts, so that no
 * open pays the round trip. */
int shadowd_index_ready(struct shadowd *c);

/* The plain index hit: a sealed, read-only fd of the version *st* says
 * (the caller's own fstat of *src*; NULL: fstat here) from the daemon's
 * index, or -1: not there (code "", error empty), no index (error says
 * why), or the breaker is open (code "unavailable"). The index is fetched as shadowd_index_ready does when this
 * connection has none; the hit is counted and reported like the routed
 * calls' hits. Never uses or fills the process-local tier. */
int shadowd_index_open(struct shadowd *c, int src, const struct stat *st);

/* Tell the daemon of the index hits not reported yet, now (not waiting for
 * its answer). The calls above do it by themselves. */
void shadowd_index_report(struct shadowd *c);

/* Send what a routed open left due, never waiting for an answer: the files
 * copied here and kept to be told, once one of them was opened again (the
 * next process will want it from the index). For a supervisor to call once
 * it has answered the program, so that the daemon, woken on the caller's
 * CPU, takes the batch in while the program runs, not while it waits for
 * an open; otherwise the next routed call sends it first. A forked child
 * sends nothing of its parent's (the parent tells its own). Safe on a
 * zero-filled struct. */
void shadowd_idle(struct shadowd *c);

/* ---- pipelined, for poll loops ------------------------------------------
 *
 * Submit now, poll shadowd_fd(c) for POLLIN with shadowd_poll_timeout(c),
 * then shadowd_collect until it returns 0. Replies are matched by id, in
 * any order. Nothing here waits on the daemon: connecting is non-blocking
 * and the hello goes out with the first request. A request not answered
 * within its timeout fails (and opens the breaker) when shadowd_collect
 * runs after its deadline. The fd of a reply nobody collects is closed:
 * at its arrival when the request was cancelled, by shadowd_cancel when it
 * had arrived, by shadowd_close otherwise. The sync calls above may be
 * mixed in; replies to pipelined requests that arrive meanwhile wait.
 */

/* Send an open of *src* (the caller may close it once this returns);
 * *tag* comes back with the result. The id (> 0), or -1 (code, error:
 * "unavailable" from the breaker, errnum EAGAIN when SHADOWD_MAX_PENDING
 * requests are pending or the socket is full; "busy" with EAGAIN when the
 * daemon's listen backlog is full, the breaker left shut). */
long long shadowd_submit_open(struct shadowd *c, int src, const char *label, void *tag);

/* The routed open, pipelined: 0 with *fd_now set when the file is served
 * at once (tier or local copy, `route` says which); an id (> 0) when a
 * request went to the daemon, without waiting for its copy (its result
 * always has an fd unless the file cannot be read: a miss or a failed
 * request is copied here when collected, from a duplicate of *src* kept
 * until then); -1 on failure as the routed open. */
long long shadowd_submit_routed(struct shadowd *c, int src, const char *label, void *tag,
                                int *fd_now);

/* The fd to poll for POLLIN, or -1 when there is no connection. It may
 * change after any call (a reconnection): ask again before each poll. */
int shadowd_fd(struct shadowd *c);

/* How long a poll may sleep, in ms: 0 when a result is ready to collect,
 * the time to the earliest deadline of a pending request, -1 when none. */
int shadowd_poll_timeout(struct shadowd *c);

/* Read what has arrived (never waits) and hand out one finished request:
 * 1 with *out filled, 0 when none is finished. */
int shadowd_collect(struct shadowd *c, struct shadowd_result *out);

/* Forget a pending request: 0, or -1 when *id* is not pending. */
int shadowd_cancel(struct shadowd *c, long long id);

/* How many submitted requests are not collected yet. */
int shadowd_pending(struct shadowd *c);

#ifdef __cplusplus
}
#endif

#endif
