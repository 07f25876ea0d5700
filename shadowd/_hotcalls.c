/*
 * The daemon's hit path in C. The system calls it makes on every request
 * (recvmsg with its descriptors, statx without sync, the reopen of a memfd
 * through /proc/self/fd, sendmsg with descriptors) without the
 * interpreter's overhead around each; and answer_hit, which answers a
 * whole cache hit in one call. And the client's side of a hit through the
 * index (index_open, index_open_fd): slot lookup, the open of the
 * daemon's descriptor (read-only at once in its descriptor range when the
 * view says the daemon is of our uid, else O_PATH and a read-only reopen),
 * its checks, seals and seq, in
 * one call for client/shadowd_client/index.py; and index_holds, the
 * process-local tier's check that a slot still names the memfd it keeps. shadowd/hotcalls.py loads
 * this module when it was built and offers the same functions in Python
 * otherwise; tests/test_hotcalls.py holds both to the same behaviour, and
 * tests/test_index.py the index's two paths.
 *
 * Must never: read a request other than the canonical `open`, or read one
 * differently from shadowd/protocol.py (anything else is declined and goes
 * to protocol.py); change the cache (the caller counts the hit); keep or
 * close a descriptor it does not own; lose a received descriptor (every fd
 * the kernel installed is returned, or closed); wait (every call is
 * MSG_DONTWAIT or cannot block on a client's file system); serve an entry
 * that is not watched (wd < 0) or whose memfd is not as it was sealed (its
 * stamp): those go to the Python path, which decides. The index calls must
 * never open a daemon's descriptor but O_PATH before its inode is checked,
 * except in its descriptor range (where every number is a memfd at every
 * instant) and then only when the view passed `direct` (the daemon is of
 * our uid: IndexView decides); differ from IndexView's Python path in any
 * check or its order; or leave an fd open on any refusal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Descriptors one message may carry: the protocol's largest batch is 64. */
#define MAX_FDS 253

#ifndef SYS_statx
#define SYS_statx 332 /* x86_64 */
#endif

/* The kernel's struct statx (include/uapi/linux/stat.h), declared here so
 * that the C library's headers, old or new, do not matter. */
struct kstatx_timestamp {
    int64_t tv_sec;
    uint32_t tv_nsec;
    int32_t reserved;
};

struct kstatx {
    uint32_t mask;
    uint32_t blksize;
    uint64_t attributes;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint16_t mode;
    uint16_t spare0;
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    uint64_t attributes_mask;
    struct kstatx_timestamp atime, btime, ctime, mtime;
    uint32_t rdev_major, rdev_minor;
    uint32_t dev_major, dev_minor;
    uint64_t mnt_id;
    uint64_t spare2[13];
};

#define K_AT_EMPTY_PATH 0x1000
#define K_AT_STATX_DONT_SYNC 0x4000
/* TYPE | MODE | MTIME | CTIME | INO | SIZE: what a key needs. */
#define K_STATX_WANTED (0x1 | 0x2 | 0x40 | 0x80 | 0x100 | 0x200)
#define K_STATX_MNT_ID_UNIQUE 0x4000
#define K_STATX_ASKED (0x7FF | K_STATX_MNT_ID_UNIQUE)

/* Python's os.makedev: glibc's encoding of a dev_t. */
static unsigned long long
makedev_glibc(uint32_t major, uint32_t minor)
{
    return (((unsigned long long)major & 0xfffff000ULL) << 32) |
           (((unsigned long long)major & 0x00000fffULL) << 8) |
           (((unsigned long long)minor & 0xffffff00ULL) << 12) |
           ((unsigned long long)minor & 0x000000ffULL);
}

static int
fd_arg(PyObject *obj, int *out)
{
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred())
        return 0;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range for a C int");
        return 0;
    }
    *out = (int)fd;
    return 1;
}

PyDoc_STRVAR(statx_nosync_doc,
"statx_nosync(fd) -> (dev, ino, mode, size, mtime_ns, ctime_ns, mnt) | None\n\n"
"statx(AT_EMPTY_PATH | AT_STATX_DONT_SYNC): the kernel's cached attributes.\n"
"None when the file system left a field of the key out; OSError on failure.");

/* sec * 10^9 + nsec into *out; 0 when it does not fit in 64 bits (a
 * timestamp before 1677 or after 2262, which a file may carry). */
static int
sec_nsec_ns(long long sec, long long nsec, long long *out)
{
    long long ns;
    if (__builtin_mul_overflow(sec, 1000000000LL, &ns) || __builtin_add_overflow(ns, nsec, &ns))
        return 0;
    *out = ns;
    return 1;
}

/* A statx timestamp in ns (sec_nsec_ns). */
static int
ns_of(const struct kstatx_timestamp *t, long long *out)
{
    return sec_nsec_ns((long long)t->tv_sec, (long long)t->tv_nsec, out);
}

/* The same as a Python int, exact for any timestamp. */
static PyObject *
ns_object(const struct kstatx_timestamp *t)
{
    long long ns;
    if (ns_of(t, &ns))
        return PyLong_FromLongLong(ns);
    PyObject *sec = PyLong_FromLongLong((long long)t->tv_sec);
    PyObject *giga = PyLong_FromLong(1000000000L);
    PyObject *nsec = PyLong_FromUnsignedLong(t->tv_nsec);
    PyObject *scaled = sec && giga ? PyNumber_Multiply(sec, giga) : NULL;
    PyObject *sum = scaled && nsec ? PyNumber_Add(scaled, nsec) : NULL;
    Py_XDECREF(sec);
    Py_XDECREF(giga);
    Py_XDECREF(nsec);
    Py_XDECREF(scaled);
    return sum;
}

static PyObject *
statx_nosync(PyObject *self, PyObject *arg)
{
    int fd;
    struct kstatx stx;
    long rc;

    if (!fd_arg(arg, &fd))
        return NULL;
    memset(&stx, 0, sizeof stx);
    rc = syscall(SYS_statx, fd, "", K_AT_EMPTY_PATH | K_AT_STATX_DONT_SYNC,
                 (unsigned)K_STATX_ASKED, &stx);
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if ((stx.mask & K_STATX_WANTED) != K_STATX_WANTED)
        Py_RETURN_NONE;
    unsigned long long dev = makedev_glibc(stx.dev_major, stx.dev_minor);
    PyObject *mtime = ns_object(&stx.mtime);
    PyObject *ctime = mtime ? ns_object(&stx.ctime) : NULL;
    if (ctime == NULL) {
        Py_XDECREF(mtime);
        return NULL;
    }
    return Py_BuildValue(
        "(KKIKNNK)", dev, (unsigned long long)stx.ino, (unsigned)stx.mode,
        (unsigned long long)stx.size, mtime, ctime,
        (unsigned long long)((stx.mask & K_STATX_MNT_ID_UNIQUE) ? stx.mnt_id : 0));
}

static void
close_fds(const int *fds, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        close(fds[i]);
}

/* One recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT) into buf, with *ancsize*
 * bytes of control space; the fds of every SCM_RIGHTS message into fds.
 * -1 and errno on failure (then no fd was received). */
static int
recv_with_fds(int sockfd, void *buf, size_t len, size_t ancsize, ssize_t *n, int *flags,
              int *fds, Py_ssize_t *nfds)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = ancsize ? control.bytes : NULL,
        .msg_controllen = ancsize,
    };

    *nfds = 0;
    do {
        *n = recvmsg(sockfd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (*n < 0 && errno == EINTR);
    if (*n < 0)
        return -1;
    *flags = msg.msg_flags;
    if (msg.msg_controllen > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            /* The control space bounds count; the check keeps fds[] safe
             * whatever the kernel wrote. */
            if (count > (size_t)(MAX_FDS - *nfds))
                count = (size_t)(MAX_FDS - *nfds);
            memcpy(fds + *nfds, CMSG_DATA(c), count * sizeof(int));
            *nfds += (Py_ssize_t)count;
        }
    }
    return 0;
}

/* The fd of *sock* for recv_with_fds, with *ancsize* checked; -1 with an
 * exception set when either is wrong. */
static int
recv_args(PyObject *sock, Py_ssize_t ancsize)
{
    int sockfd = PyObject_AsFileDescriptor(sock);
    if (sockfd >= 0 && (ancsize < 0 || (size_t)ancsize > CMSG_SPACE(sizeof(int) * MAX_FDS))) {
        PyErr_SetString(PyExc_ValueError, "ancsize out of range");
        return -1;
    }
    return sockfd;
}

/* (nbytes, flags, [fds]) for Python; the fds are closed if it cannot be made. */
static PyObject *
received(ssize_t n, int flags, const int *fds, Py_ssize_t nfds)
{
    PyObject *list = PyList_New(nfds);
    if (list == NULL) {
        close_fds(fds, nfds);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        PyObject *item = PyLong_FromLong(fds[i]);
        if (item == NULL) {
            Py_DECREF(list);
            close_fds(fds, nfds);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    PyObject *result = Py_BuildValue("(niN)", (Py_ssize_t)n, flags, list);
    if (result == NULL)
        close_fds(fds, nfds); /* the list went with the failed tuple */
    return result;
}

PyDoc_STRVAR(recv_doc,
"recv(sock, buffer, ancsize) -> (nbytes, flags, fds)\n\n"
"One recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT) into *buffer*, with control\n"
"space for *ancsize* bytes (as socket.CMSG_SPACE gives). *fds* are the\n"
"descriptors of every SCM_RIGHTS message, now the caller's. OSError\n"
"(BlockingIOError when nothing is queued) on failure.");

static PyObject *
recv_datagram(PyObject *self, PyObject *args)
{
    PyObject *sock;
    Py_buffer buf;
    Py_ssize_t ancsize, nfds;
    int sockfd, flags, fds[MAX_FDS];
    ssize_t n;

    if (!PyArg_ParseTuple(args, "Ow*n:recv", &sock, &buf, &ancsize))
        return NULL;
    sockfd = recv_args(sock, ancsize);
    if (sockfd < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int rc = recv_with_fds(sockfd, buf.buf, (size_t)buf.len, (size_t)ancsize, &n, &flags, fds,
                           &nfds);
    PyBuffer_Release(&buf);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return received(n, flags, fds, nfds);
}

/* sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of *data* with *nfds* fds; -1 and
 * errno on failure. */
static ssize_t
send_with_fds(int sockfd, const void *data, size_t len, const int *fds, size_t nfds)
{
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;

    if (nfds > 0) {
        memset(control.bytes, 0, CMSG_SPACE(sizeof(int) * nfds));
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    do {
        n = sendmsg(sockfd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n;
}

PyDoc_STRVAR(send_doc,
"send(sock, data, fds) -> nbytes\n\n"
"One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of *data* with *fds* (a sequence\n"
"of ints, possibly empty) as SCM_RIGHTS. The fds stay the caller's.");

static PyObject *
send_datagram(PyObject *self, PyObject *args)
{
    PyObject *sock;
    int sockfd;
    Py_buffer data;
    PyObject *seq;
    int fds[MAX_FDS];
    ssize_t n;

    if (!PyArg_ParseTuple(args, "Oy*O:send", &sock, &data, &seq))
        return NULL;
    sockfd = PyObject_AsFileDescriptor(sock);
    if (sockfd < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    /* A tuple of our own: a list could change under us while an item's
     * __index__ runs. */
    PyObject *fast = PySequence_Tuple(seq);
    if (fast == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t nfds = PyTuple_GET_SIZE(fast);
    if (nfds > MAX_FDS) {
        Py_DECREF(fast);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "too many fds for one message");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        PyObject *item = PyTuple_GET_ITEM(fast, i);
        if (!PyLong_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "fds must be ints");
            Py_DECREF(fast);
            PyBuffer_Release(&data);
            return NULL;
        }
        if (!fd_arg(item, &fds[i])) {
            Py_DECREF(fast);
            PyBuffer_Release(&data);
            return NULL;
        }
    }
    Py_DECREF(fast);
    n = send_with_fds(sockfd, data.buf, (size_t)data.len, fds, (size_t)nfds);
    PyBuffer_Release(&data);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromSsize_t((Py_ssize_t)n);
}

PyDoc_STRVAR(accept_peer_doc,
"accept_peer(fd, base) -> (fd, pid, uid, gid) or None\n\n"
"accept4 on the listening socket *fd* (SOCK_NONBLOCK | SOCK_CLOEXEC):\n"
"None when no connection waits. The new socket is renumbered to *base* or\n"
"above (F_DUPFD_CLOEXEC, the old number closed; kept where it was when no\n"
"such number is free) and its peer read with SO_PEERCRED. OSError for a\n"
"failed accept; ECONNABORTED when SO_PEERCRED fails (the socket is closed).");

static PyObject *
accept_peer(PyObject *self, PyObject *args)
{
    int lfd, base, fd;
    if (!PyArg_ParseTuple(args, "ii:accept_peer", &lfd, &base))
        return NULL;
    do
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int high = fcntl(fd, F_DUPFD_CLOEXEC, base);
    if (high >= 0) {
        close(fd);
        fd = high;
    }
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || len != sizeof cred) {
        close(fd);
        errno = ECONNABORTED;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    /* The pid signed, the uid and gid not (uid_t: 3000000000 is a uid), as
     * struct ucred's "iII" reads them in Python (access.Peer). */
    PyObject *result = Py_BuildValue("(iiII)", fd, (int)cred.pid, (unsigned int)cred.uid,
                                     (unsigned int)cred.gid);
    if (result == NULL)
        close(fd); /* never lost */
    return result;
}

PyDoc_STRVAR(reopen_doc,
"reopen(dirfd, fd) -> int\n\n"
"openat(dirfd, str(fd), O_RDONLY | O_CLOEXEC): with *dirfd* a handle on\n"
"/proc/self/fd, a new open file description of *fd*, with its own offset.");

/* A descriptor this module opened, as the caller's int; closed when even
 * that fails (NULL, MemoryError set), so it is never lost. */
static PyObject *
new_fd(int fd)
{
    PyObject *result = PyLong_FromLong(fd);
    if (result == NULL)
        close(fd);
    return result;
}

/* openat(dirfd, "<fd>", O_RDONLY | O_CLOEXEC); -1 and errno on failure. */
static int
reopen_fd(int dirfd, int fd)
{
    char name[16];
    int out;

    if (fd < 0) {
        errno = EBADF;
        return -1;
    }
    snprintf(name, sizeof name, "%d", fd);
    do {
        out = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
    } while (out < 0 && errno == EINTR);
    return out;
}

static PyObject *
reopen(PyObject *self, PyObject *args)
{
    int dirfd, fd, out;

    if (!PyArg_ParseTuple(args, "ii:reopen", &dirfd, &fd))
        return NULL;
    out = reopen_fd(dirfd, fd);
    if (out < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return new_fd(out);
}

PyDoc_STRVAR(send_reopened_doc,
"send_reopened(sock, data, dirfd, fd) -> int\n\n"
"reopen(dirfd, fd), send *data* with that one new descriptor, close it: a\n"
"hit's reply in one call. Returns 0 when sent; the errno when the reopen\n"
"failed (nothing was sent). Raises OSError when the send failed\n"
"(BlockingIOError: no room in the socket); the new descriptor is closed\n"
"in every case.");

static PyObject *
send_reopened(PyObject *self, PyObject *args)
{
    PyObject *sock;
    Py_buffer data;
    int sockfd, dirfd, fd, served, err;
    ssize_t n;

    if (!PyArg_ParseTuple(args, "Oy*ii:send_reopened", &sock, &data, &dirfd, &fd))
        return NULL;
    sockfd = PyObject_AsFileDescriptor(sock);
    if (sockfd < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    served = reopen_fd(dirfd, fd);
    if (served < 0) {
        err = errno;
        PyBuffer_Release(&data);
        return PyLong_FromLong(err);
    }
    n = send_with_fds(sockfd, data.buf, (size_t)data.len, &served, 1);
    err = errno;
    close(served); /* the message in flight holds its own reference */
    PyBuffer_Release(&data);
    if (n < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(0);
}

/* -- a whole hit --------------------------------------------------------- */

/* The canonical `open` request, read as shadowd/protocol.py reads it; any
 * datagram this does not recognise is declined and goes to protocol.py, so
 * it only has to agree with protocol.py on what it accepts. */

struct rd {
    const unsigned char *p, *end;
};

static int
rd_be(struct rd *r, size_t n, uint64_t *v)
{
    if ((size_t)(r->end - r->p) < n)
        return -1;
    *v = 0;
    for (size_t i = 0; i < n; i++)
        *v = (*v << 8) | r->p[i];
    r->p += n;
    return 0;
}

/* A msgpack str of any width; -1 for anything else. */
static int
rd_str(struct rd *r, const unsigned char **s, uint64_t *len)
{
    if (r->p >= r->end)
        return -1;
    unsigned char b = *r->p++;
    if ((b & 0xe0) == 0xa0)
        *len = b & 0x1f;
    else if (b < 0xd9 || b > 0xdb || rd_be(r, (size_t)1 << (b - 0xd9), len) < 0)
        return -1;
    if ((uint64_t)(r->end - r->p) < *len)
        return -1;
    *s = r->p;
    r->p += *len;
    return 0;
}

/* A msgpack integer, of any width, that is not negative; -1 otherwise. */
static int
rd_uint(struct rd *r, uint64_t *v)
{
    if (r->p >= r->end)
        return -1;
    unsigned char b = *r->p++;
    if (b < 0x80) {
        *v = b;
        return 0;
    }
    if (b >= 0xcc && b <= 0xcf)
        return rd_be(r, (size_t)1 << (b - 0xcc), v);
    if (b >= 0xd0 && b <= 0xd3) {
        size_t width = (size_t)1 << (b - 0xd0);
        if (rd_be(r, width, v) < 0 || (*v >> (width * 8 - 1)) & 1)
            return -1; /* negative */
        return 0;
    }
    return -1;
}

/* Whether s is valid UTF-8 as Python's strict decoder has it: no overlong
 * forms, no surrogates, nothing past U+10FFFF. */
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

/* protocol.MAX_LABEL_BYTES: a label of at most a quarter of it in bytes
 * is short enough in characters, whatever they are. */
#define LABEL_BYTES_OK (4096 / 4)

static int
key_is(const unsigned char *s, uint64_t n, const char *key)
{
    return n == strlen(key) && memcmp(s, key, n) == 0;
}

/* The id of {"op": "open", "id": N[, "path": str | nil]} in any order and
 * any msgpack width, with nothing else in the map or after it; -1 for
 * every other datagram. */
static int
parse_open(const unsigned char *data, size_t len, uint64_t *id)
{
    struct rd r = {data, data + len};
    uint64_t count, v;
    int seen_op = 0, seen_id = 0, seen_path = 0, seen_wait = 0;

    if (r.p >= r.end)
        return -1;
    unsigned char b = *r.p++;
    if ((b & 0xf0) == 0x80)
        count = b & 0x0f;
    else if (b == 0xde || b == 0xdf) {
        if (rd_be(&r, b == 0xde ? 2 : 4, &count) < 0)
            return -1;
    } else
        return -1;
    if (count > 4)
        return -1;
    for (uint64_t i = 0; i < count; i++) {
        const unsigned char *key, *val;
        uint64_t key_len, val_len;
        if (rd_str(&r, &key, &key_len) < 0)
            return -1;
        if (key_is(key, key_len, "op") && !seen_op) {
            seen_op = 1;
            if (rd_str(&r, &val, &val_len) < 0 || !key_is(val, val_len, "open"))
                return -1;
        } else if (key_is(key, key_len, "id") && !seen_id) {
            seen_id = 1;
            if (rd_uint(&r, &v) < 0)
                return -1;
            *id = v;
        } else if (key_is(key, key_len, "wait") && !seen_wait) {
            seen_wait = 1; /* version 2: a hit is answered at once either way */
            if (r.p >= r.end || (*r.p != 0xc2 && *r.p != 0xc3))
                return -1;
            r.p++;
        } else if (key_is(key, key_len, "path") && !seen_path) {
            seen_path = 1;
            if (r.p < r.end && *r.p == 0xc0) {
                r.p++; /* nil: no label */
            } else if (rd_str(&r, &val, &val_len) < 0 || val_len > LABEL_BYTES_OK ||
                       !utf8_ok(val, (size_t)val_len)) {
                return -1;
            }
        } else {
            return -1; /* another key, or one seen twice */
        }
    }
    return seen_op && seen_id && r.p == r.end ? 0 : -1;
}

static size_t
put_uint(unsigned char *o, uint64_t v)
{
    if (v < 0x80) {
        o[0] = (unsigned char)v;
        return 1;
    }
    size_t width = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffULL ? 4 : 8;
    o[0] = (unsigned char)(width == 1 ? 0xcc : width == 2 ? 0xcd : width == 4 ? 0xce : 0xcf);
    for (size_t i = 0; i < width; i++)
        o[1 + i] = (unsigned char)(v >> (8 * (width - 1 - i)));
    return 1 + width;
}

/* A signed integer as msgpack-python packs it: the narrowest form. */
static size_t
put_int(unsigned char *o, int64_t v)
{
    if (v >= 0)
        return put_uint(o, (uint64_t)v);
    if (v >= -32) {
        o[0] = (unsigned char)(0xe0 | (v & 0x1f));
        return 1;
    }
    size_t width = v >= -128 ? 1 : v >= -32768 ? 2 : v >= -2147483648LL ? 4 : 8;
    o[0] = (unsigned char)(width == 1 ? 0xd0 : width == 2 ? 0xd1 : width == 4 ? 0xd2 : 0xd3);
    uint64_t u = (uint64_t)v;
    for (size_t i = 0; i < width; i++)
        o[1 + i] = (unsigned char)(u >> (8 * (width - 1 - i)));
    return 1 + width;
}

/* protocol.ServerConnection.send_opened(id, size, True[, version]), byte for
 * byte: with *v2*, the version served and "cached" (protocol version 2). */
static size_t
opened_reply(unsigned char *o, uint64_t id, uint64_t size, int v2, long long mtime_ns,
             long long ctime_ns)
{
    size_t k = 0;
    o[k++] = v2 ? 0x86 : 0x84;
    memcpy(o + k, "\xa2id", 3);
    k += 3;
    k += put_uint(o + k, id);
    memcpy(o + k, "\xa2ok\xc3", 4);
    k += 4;
    memcpy(o + k, "\xa4size", 5);
    k += 5;
    k += put_uint(o + k, size);
    memcpy(o + k, "\xa3hit\xc3", 5);
    k += 5;
    if (v2) {
        memcpy(o + k, "\xa7version\x93", 9);
        k += 9;
        k += put_uint(o + k, size);
        k += put_int(o + k, mtime_ns);
        k += put_int(o + k, ctime_ns);
        memcpy(o + k, "\xa6" "cached\xc3", 8); /* split: "\xa6c" would be one escape */
        k += 8;
    }
    return k;
}

/* The attribute names answer_hit reads on every hit, made once (interned)
 * instead of a new string per lookup. */
static PyObject *name_version, *name_file, *name_fd, *name_dir_fd, *name_wd, *name_stamp,
    *name_pin_wd, *name_attr_changed;

static int
int_attr(PyObject *obj, PyObject *name, long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* file.stamp, the (mode, ctime_ns) a cached memfd was sealed with. */
static int
stamp_of(PyObject *file, long long *mode, long long *ctime_ns)
{
    PyObject *stamp = PyObject_GetAttr(file, name_stamp);
    if (stamp == NULL)
        return -1;
    if (!PyTuple_Check(stamp) || PyTuple_GET_SIZE(stamp) != 2) {
        Py_DECREF(stamp);
        PyErr_SetString(PyExc_TypeError, "stamp must be a (mode, ctime_ns) tuple");
        return -1;
    }
    *mode = PyLong_AsLongLong(PyTuple_GET_ITEM(stamp, 0));
    *ctime_ns = PyLong_AsLongLong(PyTuple_GET_ITEM(stamp, 1));
    Py_DECREF(stamp);
    return PyErr_Occurred() ? -1 : 0;
}

#define DECLINED ((PyObject *)1)

/* The cache entry of the hit that was answered (a new reference); DECLINED
 * when this is not a hit this function answers (nothing was sent); NULL
 * with an exception set when Python code it called raised. */
static PyObject *
try_hit(int sockfd, const unsigned char *data, size_t len, int src, PyObject *entries,
        PyObject *is_local, unsigned long long max_file_size, int v2, int watch_fd,
        int *served_out)
{
    struct kstatx stx;
    uint64_t id = 0;
    unsigned char reply[128];

    if (parse_open(data, len, &id) < 0)
        return DECLINED;
    /* An inotify event not yet read may end the entry this hit would use
     * (a write, a writer letting go, an unmount): the Python path reads the
     * events first. Checked after the request was read, so every event of a
     * change made before the request was sent is seen. */
    if (watch_fd >= 0) {
        int pending = 0;
        if (ioctl(watch_fd, FIONREAD, &pending) != 0 || pending > 0)
            return DECLINED;
    }
    memset(&stx, 0, sizeof stx);
    if (syscall(SYS_statx, src, "", K_AT_EMPTY_PATH | K_AT_STATX_DONT_SYNC,
                (unsigned)K_STATX_ASKED, &stx) != 0 ||
        (stx.mask & K_STATX_WANTED) != K_STATX_WANTED)
        return DECLINED;
    int fl = fcntl(src, F_GETFL);
    if (fl < 0 || fl & O_PATH || (fl & O_ACCMODE) == O_WRONLY)
        return DECLINED;
    if ((stx.mode & 0170000) != 0100000 || stx.size > max_file_size)
        return DECLINED; /* not a regular file, or too large: protocol.py says so */
    long long mtime_ns, ctime_ns;
    if (!ns_of(&stx.mtime, &mtime_ns) || !ns_of(&stx.ctime, &ctime_ns))
        return DECLINED; /* a timestamp past 2262: Python's ints take it */
    unsigned long long dev = makedev_glibc(stx.dev_major, stx.dev_minor);
    unsigned long long mnt = (stx.mask & K_STATX_MNT_ID_UNIQUE) ? stx.mnt_id : 0;

    PyObject *local = PyObject_CallFunction(is_local, "KK", dev, mnt);
    if (local == NULL)
        return NULL;
    int trusted = PyObject_IsTrue(local);
    Py_DECREF(local);
    if (trusted <= 0)
        return trusted < 0 ? NULL : DECLINED;

    PyObject *key = Py_BuildValue("(KK)", dev, (unsigned long long)stx.ino);
    if (key == NULL)
        return NULL;
    PyObject *entry = PyDict_GetItemWithError(entries, key); /* borrowed */
    Py_DECREF(key);
    if (entry == NULL)
        return PyErr_Occurred() ? NULL : DECLINED;
    Py_INCREF(entry);

    PyObject *version = PyObject_GetAttr(entry, name_version);
    PyObject *want = Py_BuildValue("(KLL)", (unsigned long long)stx.size, mtime_ns, ctime_ns);
    int same = version && want ? PyObject_RichCompareBool(version, want, Py_EQ) : -1;
    Py_XDECREF(version);
    Py_XDECREF(want);
    if (same <= 0) {
        Py_DECREF(entry);
        return same < 0 ? NULL : DECLINED; /* another version: protocol.py's path drops it */
    }
    long wd;
    if (int_attr(entry, name_wd, &wd) < 0) {
        Py_DECREF(entry);
        return NULL;
    }
    if (wd < 0) {
        Py_DECREF(entry);
        return DECLINED; /* not watched yet (restored at start): Python vouches for it */
    }
    PyObject *file = PyObject_GetAttr(entry, name_file);
    long memfd, dirfd;
    if (file == NULL || int_attr(file, name_fd, &memfd) < 0 || int_attr(file, name_dir_fd, &dirfd) < 0) {
        Py_XDECREF(file);
        Py_DECREF(entry);
        return NULL;
    }
    long long stamp_mode, stamp_ctime;
    int stamped = stamp_of(file, &stamp_mode, &stamp_ctime);
    /* A memfd watched for IN_ATTRIB (pin_wd) with none read is as sealed:
     * every change to its stamp comes as IN_ATTRIB, and none is pending
     * (FIONREAD above). Else the inode is asked. */
    long pin_wd = -1;
    int changed = 1;
    if (stamped == 0 && int_attr(file, name_pin_wd, &pin_wd) == 0) {
        PyObject *flag = PyObject_GetAttr(file, name_attr_changed);
        changed = flag == NULL ? -1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
    } else {
        stamped = -1;
    }
    Py_DECREF(file);
    if (stamped < 0 || changed < 0) {
        Py_DECREF(entry);
        return NULL;
    }
    if (memfd < 0 || memfd > INT_MAX || dirfd < INT_MIN || dirfd > INT_MAX) {
        Py_DECREF(entry);
        return DECLINED;
    }
    /* The memfd as it was sealed? A holder of its uid can change its mode,
     * ACL or times through a served fd; then Python replaces the entry. */
    if (pin_wd < 0 || changed || stamp_mode < 0 || watch_fd < 0) {
        struct kstatx mstx;
        long long mctime;
        memset(&mstx, 0, sizeof mstx);
        if (syscall(SYS_statx, (int)memfd, "", K_AT_EMPTY_PATH, (unsigned)(0x2 | 0x80), &mstx) != 0 ||
            !ns_of(&mstx.ctime, &mctime) || (long long)mstx.mode != stamp_mode ||
            mctime != stamp_ctime) {
            Py_DECREF(entry);
            return DECLINED;
        }
    }

    size_t k = opened_reply(reply, id, stx.size, v2, mtime_ns, ctime_ns);
    int served = reopen_fd((int)dirfd, (int)memfd);
    if (served < 0) {
        Py_DECREF(entry);
        return DECLINED; /* protocol.py's path tries again and refuses */
    }
    ssize_t n = send_with_fds(sockfd, reply, k, &served, 1);
    if (n < 0) {
        close(served);
        Py_DECREF(entry);
        return DECLINED; /* no room (it waits its turn) or the peer left: same path */
    }
    *served_out = served; /* the message in flight holds its own reference */
    return entry;
}

PyDoc_STRVAR(answer_hit_doc,
"answer_hit(sock, buffer, ancsize, entries, is_local, max_file_size, closing, v2=False,\n"
"           watch_fd=-1)\n"
"    -> Entry | tuple\n\n"
"Read one datagram as recv() does. When it is a canonical `open` of a\n"
"regular, readable file of a trusted file system (is_local(dev, mnt)) whose\n"
"version is cached in *entries* under (dev, ino), answer it: a fresh\n"
"read-only open of the entry's file, sent with protocol.py's exact reply\n"
"(with the version served when *v2*: a protocol version 2 connection),\n"
"declined while the inotify fd *watch_fd* has events unread,\n"
"return the entry, whose hit the caller counts. The passed fd and the new\n"
"one are appended to *closing*, for the caller to close (the poller closes\n"
"a round's fds together, usually with one close_range).\n"
"Otherwise nothing is sent and it returns recv()'s (nbytes, flags, fds)\n"
"for the ordinary path, which decides everything again.");

static PyObject *
answer_hit(PyObject *self, PyObject *args)
{
    PyObject *sock, *entries, *is_local, *closing;
    Py_buffer buf;
    Py_ssize_t ancsize, nfds;
    unsigned long long max_file_size;
    int sockfd, flags, fds[MAX_FDS], served = -1, v2 = 0, watch_fd = -1;
    ssize_t n;

    if (!PyArg_ParseTuple(args, "Ow*nO!OKO!|pi:answer_hit", &sock, &buf, &ancsize, &PyDict_Type,
                          &entries, &is_local, &max_file_size, &PyList_Type, &closing, &v2,
                          &watch_fd))
        return NULL;
    sockfd = recv_args(sock, ancsize);
    if (sockfd < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (recv_with_fds(sockfd, buf.buf, (size_t)buf.len, (size_t)ancsize, &n, &flags, fds,
                      &nfds) < 0) {
        PyBuffer_Release(&buf);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *entry = DECLINED;
    if (nfds == 1 && !(flags & (MSG_TRUNC | MSG_CTRUNC)) && n > 0)
        entry = try_hit(sockfd, buf.buf, (size_t)n, fds[0], entries, is_local, max_file_size,
                        v2, watch_fd, &served);
    PyBuffer_Release(&buf);
    if (entry == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            close_fds(fds, nfds); /* KeyboardInterrupt, SystemExit: not ours to keep */
            return NULL;
        }
        /* Python code it called raised (the trust check, an attribute):
         * the Python path meets the same error and answers the request. */
        PyErr_Clear();
        entry = DECLINED;
    }
    if (entry != DECLINED) {
        int pair[2] = {fds[0], served};
        for (int i = 0; i < 2; i++) {
            PyObject *fd = PyLong_FromLong(pair[i]);
            if (fd == NULL || PyList_Append(closing, fd) < 0) {
                Py_XDECREF(fd);
                close_fds(pair + i, 2 - i); /* the rest, now */
                Py_DECREF(entry);
                return NULL;
            }
            Py_DECREF(fd);
        }
        return entry;
    }
    return received(n, flags, fds, nfds);
}

/* -- a hit through the index --------------------------------------------- */

/* The client's side of the daemon's index (shadowd/index.py writes it;
 * client/shadowd_client/index.py's IndexView reads it, and its Python
 * _open_py is the reference this follows check for check, in its order;
 * client/c/shadowd.c's index_lookup and index_reopen do the same). */

#define INDEX_LAYOUT 2
/* The calls' arguments: 2, the view's `direct` before the file's
 * (shadowd/hotcalls.py offers the calls only to a view that passes it). */
#define INDEX_CALLS 2
#define INDEX_HEADER 4096
#define INDEX_RANGE_OFFSET 48 /* u32 first number, u32 count */
#define INDEX_KEY_OFFSET 64   /* u64 the slot key */
/* The open of a number in the range: a memfd at every instant, by the
 * daemon's promise. Should a daemon bug break it (a number closed, then
 * given to a FIFO it received), O_NONBLOCK keeps a FIFO's open from waiting
 * for a writer and O_NOCTTY a terminal's from becoming ours; the fstat then
 * refuses either. O_NOCTTY is not kept in the open file description;
 * O_NONBLOCK is (F_GETFL shows it, a tracee would too), so a served fd has
 * it cleared (F_SETFL 0: one more system call, measured in
 * docs/performance.md). */
#define INDEX_RANGE_FLAGS (O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
#define INDEX_SLOT 128
#define INDEX_LIVE 1
/* F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL (shadowd/memfd.py). */
#define INDEX_SEALS (0x0008 | 0x0004 | 0x0002 | 0x0001)
#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
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
             offsetof(struct index_slot, memfd_ctime_ns) == 64 &&
             sizeof(struct index_slot) <= INDEX_SLOT
         ? 1
         : -1];

/* The daemon writes slots while they are read: each field is one atomic
 * load (relaxed; seq's first with acquire, its second after a fence), so
 * the compiler neither tears nor reorders them. */
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* shadowd.index._mix: splitmix64's finaliser. */
static uint64_t
index_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* shadowd.index.slot_of: where a file's probe starts, under the slot key. */
static uint32_t
index_home(uint64_t key, uint64_t dev, uint64_t ino, uint32_t slots)
{
    return (uint32_t)(index_mix(index_mix(key ^ dev) ^ ino) & (slots - 1));
}

/* The header's slot key (written once, before the index is handed out). */
static uint64_t
index_key(const unsigned char *map)
{
    uint64_t key;
    memcpy(&key, map + INDEX_KEY_OFFSET, 8);
    return key;
}

/* A struct stat's timestamp in ns (sec_nsec_ns); 0 when it does not fit
 * in 64 bits (then it equals no slot's, as Python's exact int would not). */
static int
timespec_ns(const struct timespec *t, long long *out)
{
    return sec_nsec_ns((long long)t->tv_sec, (long long)t->tv_nsec, out);
}

/* What a view passes on every call, after the file's own arguments. */
struct index_view {
    const unsigned char *map;
    int daemon_fds, own_fds; /* /proc/PID/fd of the daemon, /proc/self/fd */
    uint32_t slots, probes;
    uint64_t memfd_dev;
    /* The daemon's descriptor range (shadowd/fdrange.py), from the header:
     * numbers that hold memfds at every instant, opened at once. 0, 0: none,
     * also when the view is not `direct` (a daemon of another uid). */
    uint32_t range_base, range_count;
};

/* The version a caller's fstat says: (dev, ino, size, mtime_ns, ctime_ns). */
struct index_want {
    uint64_t dev, ino, size;
    long long mtime_ns, ctime_ns;
};

static int
openat_retry(int dirfd, const char *name, int flags)
{
    int out;
    do {
        out = openat(dirfd, name, flags);
    } while (out < 0 && errno == EINTR);
    return out;
}

/* IndexView._reopen: the memfd slot *s* names (copied into *got*),
 * checked, reopened read-only; -1 when any check fails. Only this
 * process's descriptors are closed, and every one it opened is closed or
 * returned. Runs without the GIL: it touches no Python object. */
static int
index_reopen(const struct index_view *v, const struct index_slot *s, uint32_t seq,
             const struct index_slot *got)
{
    char name[16];
    struct stat m;
    long long m_ctime;

    if (got->fd < 0)
        return -1; /* no such name in /proc/PID/fd: Python's open of "-1" fails */
    snprintf(name, sizeof name, "%d", (int)got->fd);
    int in_range = (uint32_t)got->fd >= v->range_base &&
                   (uint32_t)got->fd - v->range_base < v->range_count;
    /* In the range (of a daemon of our uid), N is a memfd whatever it holds
     * by now: open it at once (INDEX_RANGE_FLAGS). Elsewhere O_PATH first:
     * no driver's open runs, whatever N is now. */
    int first = openat_retry(v->daemon_fds, name, in_range ? INDEX_RANGE_FLAGS : O_PATH | O_CLOEXEC);
    if (first < 0)
        return -1; /* the daemon is gone, or N was closed meanwhile */
    if (fstat(first, &m) != 0 || !S_ISREG(m.st_mode) || (uint64_t)m.st_dev != v->memfd_dev ||
        (uint64_t)m.st_ino != got->memfd_ino || (uint64_t)m.st_size != got->size ||
        (uint32_t)m.st_mode != got->mode || !timespec_ns(&m.st_ctim, &m_ctime) ||
        m_ctime != got->memfd_ctime_ns) {
        close(first); /* N is something else now, or a holder changed the memfd */
        return -1;
    }
    int served = first;
    if (in_range) {
        if (fcntl(served, F_SETFL, 0) != 0) { /* served as a plain O_RDONLY open */
            close(served);
            return -1;
        }
    } else {
        snprintf(name, sizeof name, "%d", first);
        served = openat_retry(v->own_fds, name, O_RDONLY | O_CLOEXEC);
        close(first);
        if (served < 0)
            return -1;
    }
    /* The slot must have held still while it was used: the daemon changes
     * it before it may close the memfd. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    int seals = fcntl(served, F_GET_SEALS);
    if (seals < 0 || (seals & INDEX_SEALS) != INDEX_SEALS ||
        __atomic_load_n(&s->seq, __ATOMIC_RELAXED) != seq) {
        close(served); /* not sealed, or the slot changed while we looked */
        return -1;
    }
    return served;
}

/* The live slot of *w*'s (dev, ino) in the index *map*, its seq (as read,
 * to be read again after the slot's use) in *seq*; NULL: not in its probe
 * run. */
static const struct index_slot *
index_live_slot(const unsigned char *map, uint32_t slots, uint32_t probes,
                const struct index_want *w, uint32_t *seq)
{
    uint32_t mask = slots - 1, start = index_home(index_key(map), w->dev, w->ino, slots);
    for (uint32_t i = 0; i < probes; i++) {
        const struct index_slot *s =
            (const void *)(map + INDEX_HEADER + (size_t)((start + i) & mask) * INDEX_SLOT);
        *seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (*seq == 0)
            return NULL; /* never used: the file is not further on */
        if ((*seq & 1) || LOAD(s->state) != INDEX_LIVE || LOAD(s->dev) != w->dev ||
            LOAD(s->ino) != w->ino)
            continue;
        return s;
    }
    return NULL;
}

/* IndexView.open: the slot of *w*'s file, found and reopened, or -1. */
static int
index_find(const struct index_view *v, const struct index_want *w)
{
    uint32_t seq;
    const struct index_slot *s = index_live_slot(v->map, v->slots, v->probes, w, &seq);
    if (s == NULL)
        return -1;
    struct index_slot got;
    got.size = LOAD(s->size);
    got.mtime_ns = LOAD(s->mtime_ns);
    got.ctime_ns = LOAD(s->ctime_ns);
    if (got.size != w->size || got.mtime_ns != w->mtime_ns || got.ctime_ns != w->ctime_ns)
        return -1; /* another version is cached: ask the daemon */
    got.fd = LOAD(s->fd);
    got.mode = LOAD(s->mode);
    got.memfd_ino = LOAD(s->memfd_ino);
    got.memfd_ctime_ns = LOAD(s->memfd_ctime_ns);
    return index_reopen(v, s, seq, &got);
}

/* An unsigned field of the caller's stat: 1 read, 0 out of range (equal to
 * no slot's), -1 with an exception (not an int). */
static int
want_u64(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a stat field must be an int, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* A signed field: 1 read, 0 not an int in range (equal to no slot's: a
 * stat_result made from a tuple has None for its _ns fields), -1 with an
 * exception. */
static int
want_i64(PyObject *o, long long *out)
{
    if (!PyLong_Check(o))
        return 0;
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return overflow ? 0 : 1;
}

static PyObject *name_st_dev, *name_st_ino, *name_st_size, *name_st_mtime_ns, *name_st_ctime_ns;

/* The five fields of a stat result *st*: 1 read; 0 when one cannot equal a
 * slot's (the answer is None, as in Python); -1 with an exception. dev and
 * ino come first and must be ints, as shadowd.index.slot_of needs them. */
static int
want_of_stat(PyObject *st, struct index_want *w)
{
    PyObject *names[5] = {name_st_dev, name_st_ino, name_st_size, name_st_mtime_ns,
                          name_st_ctime_ns};
    int fits = 1;
    for (int i = 0; i < 5; i++) {
        PyObject *o = PyObject_GetAttr(st, names[i]);
        if (o == NULL)
            return -1;
        int rc = i == 0   ? want_u64(o, &w->dev)
                 : i == 1 ? want_u64(o, &w->ino)
                 : i == 2 ? want_u64(o, &w->size)
                 : i == 3 ? want_i64(o, &w->mtime_ns)
                          : want_i64(o, &w->ctime_ns);
        Py_DECREF(o);
        if (rc < 0)
            return -1;
        if (rc == 0)
            fits = 0;
    }
    return fits;
}

/* The view's arguments (map, daemon_fds, own_fds, slots, probes,
 * memfd_dev, direct); *buf* holds the map while it is read, to be released. */
static int
view_args(PyObject *const *args, struct index_view *v, Py_buffer *buf)
{
    int daemon_fds, own_fds, direct;
    unsigned long slots, probes;
    unsigned long long memfd_dev;

    if (!fd_arg(args[1], &daemon_fds) || !fd_arg(args[2], &own_fds))
        return -1;
    slots = PyLong_AsUnsignedLong(args[3]);
    if (slots == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    probes = PyLong_AsUnsignedLong(args[4]);
    if (probes == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    memfd_dev = PyLong_AsUnsignedLongLong(args[5]);
    if (memfd_dev == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    direct = PyObject_IsTrue(args[6]);
    if (direct < 0)
        return -1;
    if (slots < 1 || slots > UINT32_MAX || (slots & (slots - 1)) || probes > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "slots must be a power of two, probes a u32");
        return -1;
    }
    if (PyObject_GetBuffer(args[0], buf, PyBUF_SIMPLE) < 0)
        return -1;
    if ((size_t)buf->len < INDEX_HEADER + (size_t)slots * INDEX_SLOT) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "the map is smaller than its slots");
        return -1;
    }
    v->map = buf->buf;
    v->daemon_fds = daemon_fds;
    v->own_fds = own_fds;
    v->slots = (uint32_t)slots;
    v->probes = (uint32_t)probes;
    v->memfd_dev = memfd_dev;
    /* Written once, before the index is handed out; a range that does not
     * fit the descriptor numbers is no range, nor that of a daemon the view
     * does not take at its word (IndexView.direct: another uid's). */
    memcpy(&v->range_base, v->map + INDEX_RANGE_OFFSET, 4);
    memcpy(&v->range_count, v->map + INDEX_RANGE_OFFSET + 4, 4);
    if (!direct || v->range_base == 0 || v->range_count > (uint32_t)INT_MAX - v->range_base)
        v->range_base = v->range_count = 0;
    return 0;
}

/* The fd found for *w*, or None; every fd opened on a failure is closed. */
static PyObject *
index_answer(struct index_view *v, Py_buffer *buf, const struct index_want *w)
{
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = index_find(v, w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(buf);
    if (fd < 0)
        Py_RETURN_NONE;
    return new_fd(fd);
}

PyDoc_STRVAR(index_open_doc,
"index_open(map, daemon_fds, own_fds, slots, probes, memfd_dev, direct, st) -> int | None\n\n"
"IndexView.open in one call: the slot of the file whose stat result is *st*\n"
"in the index mapped at *map* (a buffer: the header, then *slots* slots),\n"
"probed at most *probes* slots; the daemon's memfd it names, opened\n"
"through *daemon_fds* (its /proc/PID/fd: read-only at once when *direct* is\n"
"true and the number is in the header's descriptor range, else O_PATH),\n"
"checked (a regular file of *memfd_dev* with the slot's inode, size, mode\n"
"and ctime), reopened read-only through *own_fds* (/proc/self/fd) after an\n"
"O_PATH; all four seals and the slot unchanged after. A new fd, the\n"
"caller's; None when any step fails.");

static PyObject *
index_open(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct index_view v;
    struct index_want w;
    Py_buffer buf;

    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "index_open takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    int fits = want_of_stat(args[7], &w);
    if (fits < 0)
        return NULL;
    if (view_args(args, &v, &buf) < 0)
        return NULL;
    if (!fits) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE; /* no slot holds such a version: nothing is opened */
    }
    return index_answer(&v, &buf, &w);
}

PyDoc_STRVAR(index_open_fd_doc,
"index_open_fd(map, daemon_fds, own_fds, slots, probes, memfd_dev, direct, src) -> int | None\n\n"
"index_open for the file open at *src*, whose fstat it takes itself\n"
"(OSError when that fails). *src* stays the caller's.");

static PyObject *
index_open_fd(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct index_view v;
    struct index_want w;
    struct stat st;
    Py_buffer buf;
    int src, rc;

    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "index_open_fd takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!fd_arg(args[7], &src))
        return NULL;
    if (view_args(args, &v, &buf) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat(src, &st);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyBuffer_Release(&buf);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    w.dev = (uint64_t)st.st_dev;
    w.ino = (uint64_t)st.st_ino;
    w.size = (uint64_t)st.st_size;
    if (!timespec_ns(&st.st_mtim, &w.mtime_ns) || !timespec_ns(&st.st_ctim, &w.ctime_ns)) {
        PyBuffer_Release(&buf);
        Py_RETURN_NONE; /* a timestamp past 2262: no slot holds it */
    }
    return index_answer(&v, &buf, &w);
}

/* IndexView.holds: whether the slot of the file *w* names is live, of that
 * version, and names the memfd of inode *memfd_ino* and ctime
 * *memfd_ctime*: the process-local tier's check of a memfd it keeps. The
 * slot is read as index_find reads it (seq even and unchanged after the
 * fields: a slot being written is not the file's). Opens nothing. */
static int
index_holds_slot(const unsigned char *map, uint32_t slots, uint32_t probes,
                 const struct index_want *w, uint64_t memfd_ino, long long memfd_ctime)
{
    uint32_t seq;
    const struct index_slot *s = index_live_slot(map, slots, probes, w, &seq);
    if (s == NULL)
        return 0;
    int same = LOAD(s->size) == w->size && LOAD(s->mtime_ns) == w->mtime_ns &&
               LOAD(s->ctime_ns) == w->ctime_ns && LOAD(s->memfd_ino) == memfd_ino &&
               LOAD(s->memfd_ctime_ns) == memfd_ctime;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return same && __atomic_load_n(&s->seq, __ATOMIC_RELAXED) == seq;
}

PyDoc_STRVAR(index_holds_doc,
"index_holds(map, slots, probes, memfd_dev, what) -> bool\n\n"
"IndexView.holds in one call: *what* is (dev, ino, size, mtime_ns,\n"
"ctime_ns, memfd_dev, memfd_ino, memfd_ctime_ns), a file's version and the\n"
"memfd a client keeps of it. True when *memfd_dev* (the index's) is the\n"
"kept memfd's device and the file's slot in the index mapped at *map*\n"
"(probed at most *probes* of its *slots* slots) is live, of that version,\n"
"and names that memfd's inode and ctime, read while the slot held still.\n"
"Opens nothing.");

static PyObject *
index_holds(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer buf;
    struct index_want w;
    uint64_t memfd_dev, held_dev = 0, memfd_ino = 0;
    long long memfd_ctime = 0;
    unsigned long slots, probes;

    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "index_holds takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *what = args[4];
    if (!PyTuple_Check(what) || PyTuple_GET_SIZE(what) != 8) {
        PyErr_SetString(PyExc_TypeError, "what must be a tuple of 8 ints");
        return NULL;
    }
    slots = PyLong_AsUnsignedLong(args[1]);
    if (slots == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    probes = PyLong_AsUnsignedLong(args[2]);
    if (probes == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    memfd_dev = PyLong_AsUnsignedLongLong(args[3]);
    if (memfd_dev == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (slots < 1 || slots > UINT32_MAX || (slots & (slots - 1)) || probes > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "slots must be a power of two, probes a u32");
        return NULL;
    }
    /* A field out of range equals no slot's: the answer is False, as in Python. */
    int fits = 1;
    for (int i = 0; i < 8; i++) {
        PyObject *o = PyTuple_GET_ITEM(what, i);
        int rc = i == 0   ? want_u64(o, &w.dev)
                 : i == 1 ? want_u64(o, &w.ino)
                 : i == 2 ? want_u64(o, &w.size)
                 : i == 3 ? want_i64(o, &w.mtime_ns)
                 : i == 4 ? want_i64(o, &w.ctime_ns)
                 : i == 5 ? want_u64(o, &held_dev)
                 : i == 6 ? want_u64(o, &memfd_ino)
                          : want_i64(o, &memfd_ctime);
        if (rc < 0)
            return NULL;
        if (rc == 0)
            fits = 0;
    }
    if (!fits || held_dev != memfd_dev)
        Py_RETURN_FALSE;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if ((size_t)buf.len < INDEX_HEADER + (size_t)slots * INDEX_SLOT) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "the map is smaller than its slots");
        return NULL;
    }
    int holds =
        index_holds_slot(buf.buf, (uint32_t)slots, (uint32_t)probes, &w, memfd_ino, memfd_ctime);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(holds);
}

static PyMethodDef methods[] = {
    {"answer_hit", answer_hit, METH_VARARGS, answer_hit_doc},
    {"send_reopened", send_reopened, METH_VARARGS, send_reopened_doc},
    {"statx_nosync", statx_nosync, METH_O, statx_nosync_doc},
    {"recv", recv_datagram, METH_VARARGS, recv_doc},
    {"send", send_datagram, METH_VARARGS, send_doc},
    {"reopen", reopen, METH_VARARGS, reopen_doc},
    {"accept_peer", accept_peer, METH_VARARGS, accept_peer_doc},
    {"index_open", (PyCFunction)(void (*)(void))index_open, METH_FASTCALL, index_open_doc},
    {"index_open_fd", (PyCFunction)(void (*)(void))index_open_fd, METH_FASTCALL, index_open_fd_doc},
    {"index_holds", (PyCFunction)(void (*)(void))index_holds, METH_FASTCALL, index_holds_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "shadowd._hotcalls",
    "The hit path's system calls in C; see shadowd/hotcalls.py.",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__hotcalls(void)
{
    if (name_version == NULL) {
        name_version = PyUnicode_InternFromString("version");
        name_file = PyUnicode_InternFromString("file");
        name_fd = PyUnicode_InternFromString("fd");
        name_dir_fd = PyUnicode_InternFromString("dir_fd");
        name_wd = PyUnicode_InternFromString("wd");
        name_stamp = PyUnicode_InternFromString("stamp");
        name_pin_wd = PyUnicode_InternFromString("pin_wd");
        name_attr_changed = PyUnicode_InternFromString("attr_changed");
        if (!name_version || !name_file || !name_fd || !name_dir_fd || !name_wd || !name_stamp ||
            !name_pin_wd || !name_attr_changed) {
            Py_CLEAR(name_version);
            Py_CLEAR(name_file);
            Py_CLEAR(name_fd);
            Py_CLEAR(name_dir_fd);
            Py_CLEAR(name_wd);
            Py_CLEAR(name_stamp);
            Py_CLEAR(name_pin_wd);
            Py_CLEAR(name_attr_changed);
            return NULL;
        }
    }
    if (name_st_dev == NULL) {
        name_st_dev = PyUnicode_InternFromString("st_dev");
        name_st_ino = PyUnicode_InternFromString("st_ino");
        name_st_size = PyUnicode_InternFromString("st_size");
        name_st_mtime_ns = PyUnicode_InternFromString("st_mtime_ns");
        name_st_ctime_ns = PyUnicode_InternFromString("st_ctime_ns");
        if (!name_st_dev || !name_st_ino || !name_st_size || !name_st_mtime_ns ||
            !name_st_ctime_ns) {
            Py_CLEAR(name_st_dev);
            Py_CLEAR(name_st_ino);
            Py_CLEAR(name_st_size);
            Py_CLEAR(name_st_mtime_ns);
            Py_CLEAR(name_st_ctime_ns);
            return NULL;
        }
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* The index layout index_open reads: shadowd/hotcalls.py offers it only
     * when this is the layout shadowd/index.py writes. */
    PyObject *layout = Py_BuildValue("(iii)", INDEX_LAYOUT, INDEX_HEADER, INDEX_SLOT);
    if (layout == NULL || PyModule_AddObject(m, "INDEX_LAYOUT", layout) < 0) {
        Py_XDECREF(layout); /* (AddObject takes it only when it succeeds) */
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "INDEX_CALLS", INDEX_CALLS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
