/* The proxy's fused read-and-relay for connections no rule concerns (issue 17).
 *
 * relay(src, dst, want_fds) reads once from the socket src (recvmsg when fd
 * passing was negotiated, so fds can be received) and, when no fd came,
 * writes what it read to dst at once, both with the GIL released; Python gets
 * the bytes (for the trace's deferred framing) and how much dst took.  When
 * fds came (or were truncated) nothing is written: the proxy's exact path
 * takes the bytes and the fds, as with the pure-Python read.
 *
 * Returns None (nothing to read now), or (data, sent, fds, truncated):
 *   data  bytes read (b"" at end of stream)
 *   sent  bytes dst took (0 if it would block), -1 if not written (fds came),
 *         -2 if writing failed (the proxy closes the connection)
 *   fds   list of received fds (empty if none)
 *   truncated  MSG_CTRUNC was set
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>

#define BUFSIZE 65536
#define MAXFDS 253

static char buf[BUFSIZE]; /* one reader: the proxy's loop thread */
static char cbuf[CMSG_SPACE(MAXFDS * sizeof(int))];

static PyObject *relay(PyObject *self, PyObject *args) {
    int src, dst, want_fds;
    if (!PyArg_ParseTuple(args, "iip", &src, &dst, &want_fds)) return NULL;
    ssize_t r, sent = -1;
    int err = 0, werr = 0, nfds = 0, truncated = 0;
    int fds[MAXFDS];
    Py_BEGIN_ALLOW_THREADS
    struct iovec iov = {buf, BUFSIZE};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (want_fds) {
        m.msg_control = cbuf;
        m.msg_controllen = sizeof cbuf;
    }
    r = recvmsg(src, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (r < 0) {
        err = errno;
    } else {
        truncated = (m.msg_flags & MSG_CTRUNC) != 0;
        if (want_fds)
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                    for (int j = 0; j < k && nfds < MAXFDS; j++)
                        memcpy(&fds[nfds++], CMSG_DATA(c) + j * sizeof(int), sizeof(int));
                }
        if (r > 0 && !nfds && !truncated) {
            sent = send(dst, buf, (size_t)r, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (sent < 0) {
                werr = errno;
                sent = (werr == EAGAIN || werr == EWOULDBLOCK || werr == EINTR) ? 0 : -2;
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (r < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) Py_RETURN_NONE;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New(nfds);
    if (!list) return NULL;
    for (int j = 0; j < nfds; j++) {
        PyObject *fd = PyLong_FromLong(fds[j]);
        if (!fd) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, j, fd);
    }
    return Py_BuildValue("(y#nNO)", buf, (Py_ssize_t)r, (Py_ssize_t)sent, list,
                         truncated ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"relay", relay, METH_VARARGS,
     "relay(src, dst, want_fds) -> None | (data, sent, fds, truncated): read once, write it on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The D-Bus proxy's fused read-and-relay (see pytest_runtimefaults/dbus/proxy.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
