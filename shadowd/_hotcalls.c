/*
 * The system calls of the daemon's hit path, without the interpreter's
 * per-call overhead: recvmsg with its descriptors, statx without sync, the
 * reopen of a memfd through /proc/self/fd, and sendmsg with descriptors.
 * shadowd/hotcalls.py loads this module when it was built and offers the
 * same functions in Python otherwise; tests/test_hotcalls.py holds both to
 * the same behaviour.
 *
 * Must never: parse the wire format (that is shadowd/protocol.py); keep or
 * close a descriptor it does not own; lose a received descriptor (every fd
 * the kernel installed is in the returned list, or closed when the list
 * cannot be made); wait (every call is MSG_DONTWAIT or cannot block on a
 * client's file system).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
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
    /* Python's os.makedev for glibc's encoding of dev_t. */
    unsigned long long dev =
        (((unsigned long long)stx.dev_major & 0xfffff000ULL) << 32) |
        (((unsigned long long)stx.dev_major & 0x00000fffULL) << 8) |
        (((unsigned long long)stx.dev_minor & 0xffffff00ULL) << 12) |
        ((unsigned long long)stx.dev_minor & 0x000000ffULL);
    return Py_BuildValue(
        "(KKIKLLK)", dev, (unsigned long long)stx.ino, (unsigned)stx.mode,
        (unsigned long long)stx.size,
        (long long)stx.mtime.tv_sec * 1000000000LL + stx.mtime.tv_nsec,
        (long long)stx.ctime.tv_sec * 1000000000LL + stx.ctime.tv_nsec,
        (unsigned long long)((stx.mask & K_STATX_MNT_ID_UNIQUE) ? stx.mnt_id : 0));
}

static void
close_fds(const int *fds, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        close(fds[i]);
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
    int sockfd;
    Py_buffer buf;
    Py_ssize_t ancsize;
    union {
        struct cmsghdr align;
        char bytes[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    int fds[MAX_FDS];
    Py_ssize_t nfds = 0;
    ssize_t n;

    if (!PyArg_ParseTuple(args, "Ow*n:recv", &sock, &buf, &ancsize))
        return NULL;
    sockfd = PyObject_AsFileDescriptor(sock);
    if (sockfd < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (ancsize < 0 || (size_t)ancsize > sizeof control.bytes) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "ancsize out of range");
        return NULL;
    }
    struct iovec iov = {.iov_base = buf.buf, .iov_len = (size_t)buf.len};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = ancsize ? control.bytes : NULL,
        .msg_controllen = (size_t)ancsize,
    };
    do {
        n = recvmsg(sockfd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    PyBuffer_Release(&buf);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (msg.msg_controllen > 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t len = c->cmsg_len - CMSG_LEN(0);
            size_t count = len / sizeof(int);
            /* The control space bounds count; the check keeps fds[] safe
             * whatever the kernel wrote. */
            if (count > (size_t)(MAX_FDS - nfds))
                count = (size_t)(MAX_FDS - nfds);
            memcpy(fds + nfds, CMSG_DATA(c), count * sizeof(int));
            nfds += (Py_ssize_t)count;
        }
    }
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
    PyObject *result = Py_BuildValue("(niN)", (Py_ssize_t)n, msg.msg_flags, list);
    if (result == NULL)
        close_fds(fds, nfds); /* the list went with the failed tuple */
    return result;
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
    PyObject *fast = PySequence_Fast(seq, "fds must be a sequence of ints");
    if (fast == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t nfds = PySequence_Fast_GET_SIZE(fast);
    if (nfds > MAX_FDS) {
        Py_DECREF(fast);
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "too many fds for one message");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nfds; i++) {
        if (!fd_arg(PySequence_Fast_GET_ITEM(fast, i), &fds[i])) {
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

PyDoc_STRVAR(reopen_doc,
"reopen(dirfd, fd) -> int\n\n"
"openat(dirfd, str(fd), O_RDONLY | O_CLOEXEC): with *dirfd* a handle on\n"
"/proc/self/fd, a new open file description of *fd*, with its own offset.");

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
    PyObject *result = PyLong_FromLong(out);
    if (result == NULL)
        close(out);
    return result;
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

static PyMethodDef methods[] = {
    {"send_reopened", send_reopened, METH_VARARGS, send_reopened_doc},
    {"statx_nosync", statx_nosync, METH_O, statx_nosync_doc},
    {"recv", recv_datagram, METH_VARARGS, recv_doc},
    {"send", send_datagram, METH_VARARGS, send_doc},
    {"reopen", reopen, METH_VARARGS, reopen_doc},
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
    return PyModule_Create(&module);
}
