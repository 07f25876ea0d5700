/*
 * shadowd's wire protocol (docs/protocol.md, version 1) from C: connect, say
 * hello, open files. For supervisors written in C; two files, no
 * dependencies, no allocation. Build: cc -O2 -c shadowd.c
 *
 * Every fd it returns carries the four seals (checked here) and is the
 * caller's to close. It never keeps an fd the caller was not given.
 */
#ifndef SHADOWD_H
#define SHADOWD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct shadowd {
    int sock;               /* the connection; -1 when closed */
    uint32_t next_id;       /* the next request's id */
    uint64_t max_request;   /* the daemon's limit on a request, from its hello */
    int shortened;          /* the socket's timeouts were cut short (see shadowd.c) */
    uint64_t size;          /* of the last file opened */
    int hit;                /* whether it came from the cache */
    char code[32];          /* the daemon's error code of the last refusal, or "" */
    char error[256];        /* what went wrong, for a person */
    char socket_path[108];  /* where it connected, to connect again */
};

/* The socket path the daemon uses by default: $SHADOWD_SOCKET, else
 * $XDG_RUNTIME_DIR/shadowd/shadowd.sock (a user), /run/shadowd/shadowd.sock
 * (root). NULL when there is none (error in *out untouched). */
const char *shadowd_default_socket(char *buf, size_t len);

/* Connect to *socket_path* (NULL: the default) and say hello. 0, or -1 with
 * c->error set. Every call waits at most 30 s for the daemon, signals or
 * not. Not thread-safe: one struct per thread, or a lock around it. */
int shadowd_connect(struct shadowd *c, const char *socket_path);

/* A sealed, read-only fd with the bytes of *path*, opened here and passed
 * as the proof that we may read it. -1 on failure: c->code holds the
 * daemon's code when it refused (say "not-regular"), "" otherwise. A
 * connection that broke (the daemon restarted) is made again, once; one
 * that failed otherwise is closed, and the next call connects again. */
int shadowd_open(struct shadowd *c, const char *path);

/* Like shadowd_open for an fd the caller opened for reading (it stays the
 * caller's); *label* (may be NULL) names the file in the daemon's stats. */
int shadowd_open_fd(struct shadowd *c, int src, const char *label);

void shadowd_close(struct shadowd *c);

#ifdef __cplusplus
}
#endif

#endif
