/*
 * shadowd's wire protocol from C: see shadowd.h for the API and
 * docs/protocol.md for the messages. Only what a supervisor needs on its
 * open path: hello and open. msgpack is written and read by hand (maps,
 * strings, unsigned integers, booleans and nil are all that occur); the
 * reader checks every length against the datagram, skips what it does not
 * know, and never follows a reply further than 16 levels deep.
 *
 * Must never: return an fd without the four seals; leave an fd that came
 * with a reply open when the reply is not handed to the caller; block
 * forever (every call gives up after 30 s, signals or not).
 */
#define _GNU_SOURCE
#include "shadowd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
#endif
#define REQUIRED_SEALS 0xF /* F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE */
#define REPLY_MAX 16384    /* hello and open replies are far smaller */
#define LABEL_MAX 4000     /* longer paths go without a label */
#define MAX_FDS 64
#define MAX_DEPTH 16
#ifndef SHADOWD_TIMEOUT_SECONDS
#define SHADOWD_TIMEOUT_SECONDS 30 /* the tests build it with 1 */
#endif
#define TIMEOUT_SECONDS SHADOWD_TIMEOUT_SECONDS

static void fail(struct shadowd *c, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
fail(struct shadowd *c, const char *code, const char *fmt, ...)
{
    va_list ap;
    snprintf(c->code, sizeof c->code, "%s", code);
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
}

/* -- writing ------------------------------------------------------------ */

struct out {
    uint8_t buf[LABEL_MAX + 64];
    size_t len;
};

static void
put_u8(struct out *o, uint8_t b)
{
    o->buf[o->len++] = b;
}

static void
put_uint(struct out *o, uint32_t v)
{
    if (v < 0x80) {
        put_u8(o, (uint8_t)v);
    } else {
        put_u8(o, 0xce);
        put_u8(o, (uint8_t)(v >> 24));
        put_u8(o, (uint8_t)(v >> 16));
        put_u8(o, (uint8_t)(v >> 8));
        put_u8(o, (uint8_t)v);
    }
}

static void
put_str(struct out *o, const char *s, size_t n)
{
    if (n < 32) {
        put_u8(o, (uint8_t)(0xa0 | n));
    } else if (n < 256) {
        put_u8(o, 0xd9);
        put_u8(o, (uint8_t)n);
    } else {
        put_u8(o, 0xda);
        put_u8(o, (uint8_t)(n >> 8));
        put_u8(o, (uint8_t)n);
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
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
    if (b >= 0xe0) { *k = K_INT; *v = b; return 0; }
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
    case 0xd0: *k = K_INT; return get_be(r, 1, v);
    case 0xd1: *k = K_INT; return get_be(r, 2, v);
    case 0xd2: *k = K_INT; return get_be(r, 4, v);
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
        for (uint64_t i = 0; i < (k == K_MAP ? 2 * v : v); i++) {
            if (get_head(r, &k2, &v2) || skip_body(r, k2, v2, depth + 1))
                return -1;
        }
        return 0;
    default:
        return 0;
    }
}

struct reply {
    int has_id, ok, hit;
    uint64_t id, size, version, max_request;
    const char *code, *message;
    size_t code_len, message_len;
};

static int
key_is(const uint8_t *s, uint64_t n, const char *key)
{
    return n == strlen(key) && memcmp(s, key, n) == 0;
}

/* The fields of a reply map that these requests can get. */
static int
parse_reply(const uint8_t *data, size_t len, struct reply *out)
{
    struct in r = {data, data + len};
    enum kind k;
    uint64_t n, v;

    memset(out, 0, sizeof *out);
    out->ok = -1;
    if (get_head(&r, &k, &n) || k != K_MAP)
        return -1;
    for (uint64_t i = 0; i < n; i++) {
        if (get_head(&r, &k, &v) || k != K_STR || (uint64_t)(r.end - r.p) < v)
            return -1;
        const uint8_t *key = r.p;
        uint64_t key_len = v;
        r.p += v;
        if (get_head(&r, &k, &v))
            return -1;
        if (key_is(key, key_len, "id") && k == K_UINT) {
            out->has_id = 1;
            out->id = v;
        } else if (key_is(key, key_len, "ok") && k == K_BOOL) {
            out->ok = (int)v;
        } else if (key_is(key, key_len, "hit") && k == K_BOOL) {
            out->hit = (int)v;
        } else if (key_is(key, key_len, "size") && k == K_UINT) {
            out->size = v;
        } else if (key_is(key, key_len, "version") && k == K_UINT) {
            out->version = v;
        } else if (key_is(key, key_len, "limits") && k == K_MAP) {
            for (uint64_t j = 0; j < v; j++) {
                enum kind k2;
                uint64_t v2;
                if (get_head(&r, &k2, &v2) || k2 != K_STR || (uint64_t)(r.end - r.p) < v2)
                    return -1;
                const uint8_t *name = r.p;
                uint64_t name_len = v2;
                r.p += v2;
                if (get_head(&r, &k2, &v2))
                    return -1;
                if (key_is(name, name_len, "max_request") && k2 == K_UINT)
                    out->max_request = v2;
                else if (skip_body(&r, k2, v2, 2))
                    return -1;
            }
        } else if ((key_is(key, key_len, "code") || key_is(key, key_len, "message")) &&
                   k == K_STR) {
            if ((uint64_t)(r.end - r.p) < v)
                return -1;
            if (key[0] == 'c') {
                out->code = (const char *)r.p;
                out->code_len = (size_t)v;
            } else {
                out->message = (const char *)r.p;
                out->message_len = (size_t)v;
            }
            r.p += v;
        } else if (skip_body(&r, k, v, 1)) {
            return -1;
        }
    }
    return r.p == r.end && out->ok >= 0 ? 0 : -1;
}

/* -- the connection ----------------------------------------------------- */

static void
close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

static void
set_timeouts(int sock, long long us)
{
    struct timeval tv = {.tv_sec = us / 1000000, .tv_usec = us % 1000000};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static long long
now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

/* After EINTR: 1 to try again with the socket's timeouts cut to what is
 * left until *deadline* (the kernel would start the whole timeout anew, so
 * signals arriving faster than it could make a call wait for ever); 0 when
 * no time is left. */
static int
again_until(struct shadowd *c, long long deadline)
{
    long long left = deadline - now_us();
    if (left <= 0)
        return 0;
    set_timeouts(c->sock, left);
    c->shortened = 1;
    return 1;
}

/* How an exchange failed: the connection broke (worth one retry on a new
 * one), or anything else. */
enum failure { BROKEN = 1, OTHER = 2 };

/* Send one request with *src* (or none when src < 0); read its reply and
 * the fds that came with it. 0, or a failure with the error set and the
 * connection closed (a late reply would answer the next request). */
static int
exchange(struct shadowd *c, const struct out *req, int src, uint8_t *buf, struct reply *rep,
         int *fds, int *nfds)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = (void *)req->buf, .iov_len = req->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    long long deadline = now_us() + TIMEOUT_SECONDS * 1000000LL;
    ssize_t n;

    *nfds = 0;
    if (c->shortened) {
        set_timeouts(c->sock, TIMEOUT_SECONDS * 1000000LL);
        c->shortened = 0;
    }
    if (src >= 0) {
        memset(control.bytes, 0, sizeof control.bytes);
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int));
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &src, sizeof(int));
    }
    do {
        n = sendmsg(c->sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR && again_until(c, deadline));
    if (n < 0) {
        int err = errno == EINTR ? ETIMEDOUT : errno;
        fail(c, "", "sending a request to shadowd: %s",
             err == EAGAIN ? "timed out" : strerror(err));
        shadowd_close(c);
        return err == EPIPE || err == ECONNRESET || err == ENOTCONN ? BROKEN : OTHER;
    }
    struct iovec riov = {.iov_base = buf, .iov_len = REPLY_MAX};
    struct msghdr rmsg = {
        .msg_iov = &riov,
        .msg_iovlen = 1,
        .msg_control = control.bytes,
        .msg_controllen = sizeof control.bytes,
    };
    do {
        n = recvmsg(c->sock, &rmsg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR && again_until(c, deadline));
    if (n < 0) {
        int err = errno == EINTR ? ETIMEDOUT : errno;
        fail(c, "", "waiting for shadowd's reply: %s",
             err == EAGAIN ? "timed out" : strerror(err));
        shadowd_close(c);
        return err == ECONNRESET ? BROKEN : OTHER;
    }
    if (rmsg.msg_controllen > 0) {
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&rmsg); cm; cm = CMSG_NXTHDR(&rmsg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (count > MAX_FDS - *nfds)
                count = MAX_FDS - *nfds;
            memcpy(fds + *nfds, CMSG_DATA(cm), sizeof(int) * (size_t)count);
            *nfds += count;
        }
    }
    if (n == 0 && *nfds == 0) {
        fail(c, "", "shadowd closed the connection");
        shadowd_close(c);
        return BROKEN;
    }
    if (rmsg.msg_flags & (MSG_TRUNC | MSG_CTRUNC) || parse_reply(buf, (size_t)n, rep)) {
        close_fds(fds, *nfds);
        *nfds = 0;
        fail(c, "", "bad reply from shadowd");
        shadowd_close(c);
        return OTHER;
    }
    return 0;
}

/* The error of a refusal, from the reply; its fds (there should be none) closed. */
static int
refused(struct shadowd *c, const struct reply *rep, const int *fds, int nfds)
{
    close_fds(fds, nfds);
    snprintf(c->code, sizeof c->code, "%.*s", (int)rep->code_len, rep->code ? rep->code : "");
    snprintf(c->error, sizeof c->error, "shadowd refused: %.*s (%.*s)", (int)rep->message_len,
             rep->message ? rep->message : "", (int)rep->code_len, rep->code ? rep->code : "");
    return -1;
}

const char *
shadowd_default_socket(char *buf, size_t len)
{
    const char *explicit = getenv("SHADOWD_SOCKET");
    if (explicit && *explicit)
        return explicit;
    if (geteuid() == 0)
        return "/run/shadowd/shadowd.sock";
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    if (!runtime || !*runtime)
        return NULL;
    int n = snprintf(buf, len, "%s/shadowd/shadowd.sock", runtime);
    return n > 0 && (size_t)n < len ? buf : NULL;
}

int
shadowd_connect(struct shadowd *c, const char *socket_path)
{
    char pathbuf[sizeof c->socket_path];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    uint8_t buf[REPLY_MAX];
    struct reply rep;
    int fds[MAX_FDS], nfds;

    if (socket_path == NULL)
        socket_path = shadowd_default_socket(pathbuf, sizeof pathbuf);
    else if (strlen(socket_path) < sizeof pathbuf)
        socket_path = strcpy(pathbuf, socket_path); /* it may be c->socket_path */
    memset(c, 0, sizeof *c);
    c->sock = -1;
    if (socket_path == NULL) {
        fail(c, "", "no socket path: set $SHADOWD_SOCKET or $XDG_RUNTIME_DIR");
        return -1;
    }
    if (strlen(socket_path) >= sizeof addr.sun_path) {
        fail(c, "", "socket path too long: %s", socket_path);
        return -1;
    }
    strcpy(addr.sun_path, socket_path);
    strcpy(c->socket_path, socket_path);
    c->sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->sock < 0) {
        fail(c, "", "socket: %s", strerror(errno));
        return -1;
    }
    /* Before connect: a daemon that does not accept must not hold us. */
    set_timeouts(c->sock, TIMEOUT_SECONDS * 1000000LL);
    if (connect(c->sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fail(c, "", "connecting to shadowd at %s: %s", socket_path,
             errno == EAGAIN ? "timed out" : strerror(errno));
        shadowd_close(c);
        return -1;
    }

    struct out req = {.len = 0};
    put_u8(&req, 0x84);
    put_str(&req, "op", 2);
    put_str(&req, "hello", 5);
    put_str(&req, "id", 2);
    put_uint(&req, 0);
    put_str(&req, "version", 7);
    put_uint(&req, 1);
    put_str(&req, "client", 6);
    put_str(&req, "shadowd.c/1", 11);
    if (exchange(c, &req, -1, buf, &rep, fds, &nfds))
        return -1;
    if (rep.ok != 1 || nfds != 0 || !rep.has_id || rep.id != 0 || rep.version != 1) {
        if (rep.ok == 1) {
            close_fds(fds, nfds);
            fail(c, "", "unexpected hello reply from shadowd");
        } else {
            refused(c, &rep, fds, nfds);
        }
        shadowd_close(c);
        return -1;
    }
    c->next_id = 1;
    c->max_request = rep.max_request ? rep.max_request : 65536;
    return 0;
}

/* One open request on the connection there is; a failure's kind in *failed. */
static int
open_once(struct shadowd *c, int src, const char *label, int *failed)
{
    uint8_t buf[REPLY_MAX];
    struct reply rep;
    int fds[MAX_FDS], nfds;
    struct out req = {.len = 0};
    size_t label_len = label ? strlen(label) : 0;
    /* A label goes only if the request stays within the daemon's limit
     * (the rest of the map takes at most 20 bytes). */
    int with_label = label && label[0] == '/' && label_len <= LABEL_MAX &&
                     label_len + 3 + 20 <= c->max_request &&
                     utf8_ok((const unsigned char *)label, label_len);
    uint32_t id = c->next_id;

    c->next_id = (id + 1) & 0x7fffffff;
    put_u8(&req, with_label ? 0x83 : 0x82);
    put_str(&req, "op", 2);
    put_str(&req, "open", 4);
    put_str(&req, "id", 2);
    put_uint(&req, id);
    if (with_label) {
        put_str(&req, "path", 4);
        put_str(&req, label, label_len);
    }
    *failed = exchange(c, &req, src, buf, &rep, fds, &nfds);
    if (*failed)
        return -1;
    *failed = OTHER;
    if (rep.ok == 0 && !rep.has_id) {
        /* Refused before its id could be read; the daemon closes the
         * connection after such a refusal. */
        refused(c, &rep, fds, nfds);
        shadowd_close(c);
        return -1;
    }
    if (!rep.has_id || rep.id != id) {
        close_fds(fds, nfds);
        fail(c, "", "shadowd answered another request (%llu, not %u)",
             (unsigned long long)rep.id, id);
        shadowd_close(c);
        return -1;
    }
    if (rep.ok != 1)
        return refused(c, &rep, fds, nfds);
    if (nfds != 1) {
        close_fds(fds, nfds);
        fail(c, "", "shadowd's reply carried %d fds, not 1", nfds);
        return -1;
    }
    int seals = fcntl(fds[0], F_GET_SEALS);
    if (seals < 0 || (seals & REQUIRED_SEALS) != REQUIRED_SEALS) {
        close(fds[0]);
        fail(c, "", "shadowd sent a descriptor that is not sealed; refused it");
        return -1;
    }
    *failed = 0;
    c->size = rep.size;
    c->hit = rep.hit;
    return fds[0];
}

int
shadowd_open_fd(struct shadowd *c, int src, const char *label)
{
    int failed = 0;

    c->code[0] = c->error[0] = '\0';
    for (int attempt = 0; attempt < 2; attempt++) {
        int fresh = c->sock < 0;
        if (fresh && (c->socket_path[0] == '\0' || shadowd_connect(c, c->socket_path) < 0)) {
            if (c->error[0] == '\0')
                fail(c, "", "not connected");
            return -1;
        }
        int fd = open_once(c, src, label, &failed);
        if (fd >= 0 || failed != BROKEN || fresh)
            return fd;
        /* The connection we had broke (the daemon restarted?): once more. */
    }
    return -1;
}

int
shadowd_open(struct shadowd *c, const char *path)
{
    int src = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (src < 0) {
        fail(c, "", "%s: %s", path, strerror(errno));
        return -1;
    }
    int fd = shadowd_open_fd(c, src, path);
    close(src);
    return fd;
}

void
shadowd_close(struct shadowd *c)
{
    if (c->sock >= 0)
        close(c->sock);
    c->sock = -1;
}
