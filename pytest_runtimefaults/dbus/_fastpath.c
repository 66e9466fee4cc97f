/* The compiled part of the D-Bus proxy's relay (issue 17): three functions.
 *
 *   loop   the whole relay of the connections no rule concerns, GIL released,
 *          until Python is needed (below);
 *   frame  the framer's split of a byte stream into messages (below);
 *   relay  one fused read-and-relay (this comment).
 *
 * Built by setup.py as an optional extension; RUNTIMEFAULTS_PURE_PYTHON=1
 * makes the proxy ignore it.  Several proxies' loop threads may be in these
 * at once, GIL released: no buffer is static (loop's arena is the caller's).
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
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

#define BUFSIZE 65536
#define MAXFDS 253

#define CBUFSIZE CMSG_SPACE(MAXFDS * sizeof(int))

static PyObject *relay(PyObject *self, PyObject *args) {
    (void)self;
    int src, dst, want_fds;
    if (!PyArg_ParseTuple(args, "iip", &src, &dst, &want_fds)) return NULL;
    ssize_t r, sent = -1;
    int err = 0, werr = 0, nfds = 0, truncated = 0;
    int fds[MAXFDS];
    char *buf = PyMem_RawMalloc(BUFSIZE);
    if (!buf) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    char cbuf[CBUFSIZE];
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
    PyObject *result = NULL;
    if (r < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) {
            result = Py_None;
            Py_INCREF(result);
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        goto out;
    }
    PyObject *list = PyList_New(nfds);
    if (!list) goto out;
    for (int j = 0; j < nfds; j++) {
        PyObject *fd = PyLong_FromLong(fds[j]);
        if (!fd) {
            Py_DECREF(list);
            goto out;
        }
        PyList_SET_ITEM(list, j, fd);
    }
    result = Py_BuildValue("(y#nNO)", buf, (Py_ssize_t)r, (Py_ssize_t)sent, list,
                           truncated ? Py_True : Py_False);
out:
    PyMem_RawFree(buf);
    return result;
}


/* loop(epfd, wake_fd, table, gen, seen, limit, stamp, arena, members)
 *     -> (reason, records, pending)
 *
 * The whole relay of the connections no rule concerns, in C with the GIL
 * released, until Python is needed.  It waits on the proxy's own epoll set
 * (level-triggered) and relays every readable fd that *table* names:
 * table[fd] = dst << 2 | whole << 1 | want_fds, or -1 for an fd Python must
 * handle (the listener, the wake-up pipe, a connection in its handshake, with
 * a queue or fds pending).  whole: rules exist, and this direction's framer is
 * on a message boundary: a chunk goes on only if it is whole messages none of
 * which has a MEMBER header field naming one of *members* (NUL-terminated
 * names one after the other), as wire.whole_messages_without says; any other
 * is handed back unwritten, for the exact path.  What it relayed whole is recorded (time, fd, bytes) for the
 * trace's deferred framing, which Python does from the records in bulk.
 *
 * It returns, leaving every event it did not handle in the epoll set:
 *   reason 0  an event only Python handles (the wake-up pipe, an fd not in the
 *             table, a writable socket), or gen[0] != seen (a rule came);
 *   reason 1  *limit* chunks recorded, or the arena is full: frame them;
 *   reason 2  *pending* holds one chunk that Python must finish:
 *             (fd, data, sent, fds, truncated, t) with sent as relay()'s
 *             (-1 not written: fds came, or a rule came after the read).
 * gen is a buffer of one signed 64-bit int the proxy bumps when a rule is
 * added; a chunk read after the bump is not written, so a rule added at run
 * time takes effect for the next message as on the Python path.  stamp is
 * the trace's flag (array('q') of one): when it is 0 at a read, that chunk's
 * time is None and the trace does not take it, as on the Python path.
 * arena: the caller's bytearray (one per proxy) the chunks are read into.
 */
#define MINROOM 4096 /* less room than this left in the arena: hand it over */
#define MAXEV 64
#define MAXREC 4096


static double now_stamp(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline uint32_t u32(const unsigned char *p, int le);

/* wire.whole_messages_without: whole messages (fixed headers' lengths only), and
 * no MEMBER field (code 3, signature "s") naming one of the NUL-ended names. */
static int whole_without(const unsigned char *p, size_t n, const char *names, size_t nlen) {
    size_t pos = 0;
    while (n >= pos + 16) {
        const unsigned char *h = p + pos;
        int le = h[0] == 0x6C;
        if (!le && h[0] != 0x42) return 0;
        uint64_t total = ((16 + (uint64_t)u32(h + 12, le) + 7) & ~(uint64_t)7) + u32(h + 4, le);
        if (total > n - pos) return 0;
        pos += (size_t)total;
    }
    if (pos != n) return 0;
    static const unsigned char field[4] = {3, 1, 's', 0};
    const unsigned char *end = p + n;
    for (const unsigned char *q = p; q < end && (q = memmem(q, (size_t)(end - q), field, 4)); q++)
        for (const char *x = names; x < names + nlen;) {
            size_t len = strnlen(x, (size_t)(names + nlen - x)) + 1; /* with its NUL */
            if ((size_t)(end - q) >= 8 + len && !memcmp(q + 8, x, len)) return 0;
            x += len;
        }
    return 1;
}

struct rec {
    double t;
    int fd;
    size_t off, len;
};

static PyObject *loop(PyObject *self, PyObject *args) {
    (void)self;
    int epfd, wake_fd;
    Py_buffer table, genbuf, stampbuf, arenabuf, members;
    long long seen;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "iiy*w*Lny*w*y*", &epfd, &wake_fd, &table, &genbuf, &seen,
                          &limit, &stampbuf, &arenabuf, &members))
        return NULL;
    PyObject *result = NULL;
    struct rec *recs = NULL;
    if (table.itemsize != sizeof(int) || table.len % (Py_ssize_t)sizeof(int) ||
        genbuf.len < (Py_ssize_t)sizeof(long long) || stampbuf.len < (Py_ssize_t)sizeof(long long) ||
        arenabuf.len < 2 * MINROOM) {
        PyErr_SetString(PyExc_ValueError, "loop: table must be array('i'), gen and stamp "
                                          "array('q'), arena a bytearray of 8 KiB at least");
        goto done;
    }
    if (limit < 1) limit = 1;
    if (limit > MAXREC) limit = MAXREC; /* then it comes back to Python, which calls again */
    char *arena = arenabuf.buf;
    const size_t ARENA = (size_t)arenabuf.len;
    if (!(recs = PyMem_RawMalloc((size_t)limit * sizeof *recs))) {
        PyErr_NoMemory();
        goto done;
    }
    const int *tab = table.buf;
    int ntab = (int)(table.len / (Py_ssize_t)sizeof(int));
    const long long *gen = genbuf.buf;
    const long long *stamp = stampbuf.buf;
    Py_ssize_t nrec = 0;
    size_t used = 0;
    int reason = 0, err = 0;
    /* the pending chunk */
    int p_fd = -1, p_nfds = 0, p_trunc = 0;
    ssize_t p_len = 0, p_sent = -1;
    double p_t = 0;
    int p_fds[MAXFDS];

    Py_BEGIN_ALLOW_THREADS
    struct epoll_event ev[MAXEV];
    char cbuf[CBUFSIZE];
    for (;;) {
        if (__atomic_load_n(gen, __ATOMIC_ACQUIRE) != seen) break; /* reason 0 */
        if (nrec >= limit || ARENA - used < MINROOM) {
            reason = 1;
            break;
        }
        int n = epoll_wait(epfd, ev, MAXEV, -1);
        if (n < 0) {
            if (errno == EINTR) break; /* Python looks at signals, then comes back */
            err = errno;
            break;
        }
        int python = 0;
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            if (fd == wake_fd || fd < 0 || fd >= ntab || tab[fd] < 0 || (ev[i].events & EPOLLOUT))
                python = 1;
        }
        if (python) {
            /* Python first when the wake-up pipe is among them: it may carry a
             * rule change or a trace read that must see everything before. */
            int woken = 0;
            for (int i = 0; i < n; i++) woken |= ev[i].data.fd == wake_fd;
            if (woken) break;
        }
        for (int i = 0; i < n && reason != 2; i++) {
            int fd = ev[i].data.fd;
            if (fd == wake_fd || fd < 0 || fd >= ntab || tab[fd] < 0 || (ev[i].events & EPOLLOUT))
                continue;
            int dst = tab[fd] >> 2, whole = tab[fd] & 2, want_fds = tab[fd] & 1;
            /* Whether the trace takes it is decided before the peer can act on it. */
            double t = __atomic_load_n(stamp, __ATOMIC_ACQUIRE) ? now_stamp() : -1;
            size_t room = ARENA - used;
            if (room > BUFSIZE) room = BUFSIZE;
            struct iovec iov = {arena + used, room};
            struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
            if (want_fds) {
                m.msg_control = cbuf;
                m.msg_controllen = sizeof cbuf;
            }
            ssize_t r = recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
            int nfds = 0, trunc = 0;
            if (r > 0) {
                trunc = (m.msg_flags & MSG_CTRUNC) != 0;
                if (want_fds)
                    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
                        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                            for (int j = 0; j < k && nfds < MAXFDS; j++)
                                memcpy(&p_fds[nfds++], CMSG_DATA(c) + j * sizeof(int),
                                       sizeof(int));
                        }
            }
            ssize_t sent = -1;
            if (r > 0 && !nfds && !trunc && __atomic_load_n(gen, __ATOMIC_ACQUIRE) == seen &&
                (!whole || whole_without((const unsigned char *)arena + used, (size_t)r,
                                         members.buf, (size_t)members.len))) {
                sent = send(dst, arena + used, (size_t)r, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (sent < 0)
                    sent = (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -2;
                if (sent == r) {
                    recs[nrec].t = t;
                    recs[nrec].fd = fd;
                    recs[nrec].off = used;
                    recs[nrec].len = (size_t)r;
                    nrec++;
                    used += (size_t)r;
                    if (nrec >= limit || ARENA - used < MINROOM) break;
                    continue;
                }
            }
            /* end of stream, an error, fds, a rule, or dst would not take it all */
            reason = 2;
            p_fd = fd;
            p_len = r < 0 ? 0 : r;
            p_sent = sent;
            p_nfds = nfds;
            p_trunc = trunc;
            p_t = t;
        }
        if (reason == 2 || python) break;
    }
    Py_END_ALLOW_THREADS

    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    PyObject *records = PyList_New(nrec);
    if (!records) goto done;
    for (Py_ssize_t j = 0; j < nrec; j++) {
        PyObject *item = recs[j].t >= 0 ? Py_BuildValue("(diy#)", recs[j].t, recs[j].fd,
                                                        arena + recs[j].off, (Py_ssize_t)recs[j].len)
                                        : Py_BuildValue("(Oiy#)", Py_None, recs[j].fd,
                                                        arena + recs[j].off, (Py_ssize_t)recs[j].len);
        if (!item) {
            Py_DECREF(records);
            goto done;
        }
        PyList_SET_ITEM(records, j, item);
    }
    PyObject *pending;
    if (reason == 2) {
        PyObject *fds = PyList_New(p_nfds);
        if (!fds) {
            Py_DECREF(records);
            goto done;
        }
        for (int j = 0; j < p_nfds; j++) {
            PyObject *fd = PyLong_FromLong(p_fds[j]);
            if (!fd) {
                Py_DECREF(fds);
                Py_DECREF(records);
                goto done;
            }
            PyList_SET_ITEM(fds, j, fd);
        }
        pending = p_t >= 0 ? Py_BuildValue("(iy#nNOd)", p_fd, arena + used, (Py_ssize_t)p_len,
                                        (Py_ssize_t)p_sent, fds, p_trunc ? Py_True : Py_False, p_t)
                        : Py_BuildValue("(iy#nNOO)", p_fd, arena + used, (Py_ssize_t)p_len,
                                        (Py_ssize_t)p_sent, fds, p_trunc ? Py_True : Py_False,
                                        Py_None);
    } else {
        pending = Py_None;
        Py_INCREF(pending);
    }
    if (!pending) {
        Py_DECREF(records);
        goto done;
    }
    result = Py_BuildValue("(iNN)", reason, records, pending);
done:
    PyMem_RawFree(recs);
    PyBuffer_Release(&table);
    PyBuffer_Release(&genbuf);
    PyBuffer_Release(&stampbuf);
    PyBuffer_Release(&arenabuf);
    PyBuffer_Release(&members);
    return result;
}

/* frame(data, cls) -> (messages, pos, need): the framer's split, in C.
 *
 * What wire.Framer._frame does in Python, for the trace's deferred framing:
 * whole messages from the start of *data*, each a *cls* (wire.Message) with
 * the attributes wire._framed sets, the fixed header checked as
 * wire._fixed_header checks it.  pos: where it stopped; need: the bytes the
 * next decision needs (the message's total, or 16), or -1 when the header at
 * pos is one the checks refuse: Python frames from there, and raises the
 * precise error.
 */
static PyObject *s_raw, *s_e, *s_type, *s_serial, *s_fields, *s_hend, *s_le, *s_be, *zero;

static inline uint32_t u32(const unsigned char *p, int le) {
    return le ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24
              : (uint32_t)p[3] | (uint32_t)p[2] << 8 | (uint32_t)p[1] << 16 | (uint32_t)p[0] << 24;
}

static int set_all(PyObject *msg, PyObject *raw, int le, int type, uint32_t serial) {
    PyObject *t = PyLong_FromLong(type), *s = PyLong_FromUnsignedLong(serial);
    int rc = -1;
    if (t && s && !PyObject_SetAttr(msg, s_raw, raw) &&
        !PyObject_SetAttr(msg, s_e, le ? s_le : s_be) && !PyObject_SetAttr(msg, s_type, t) &&
        !PyObject_SetAttr(msg, s_serial, s) && !PyObject_SetAttr(msg, s_fields, Py_None) &&
        !PyObject_SetAttr(msg, s_hend, zero))
        rc = 0;
    Py_XDECREF(t);
    Py_XDECREF(s);
    return rc;
}

static PyObject *frame(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *data;
    PyTypeObject *cls;
    if (!PyArg_ParseTuple(args, "SO!", &data, &PyType_Type, &cls)) return NULL;
    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, need = 16;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    while (n - pos >= 16) {
        const unsigned char *h = b + pos;
        int le = h[0] == 0x6C;
        if ((!le && h[0] != 0x42) || h[3] != 1 || !h[1]) {
            need = -1;
            break;
        }
        uint32_t body = u32(h + 4, le), serial = u32(h + 8, le), fields = u32(h + 12, le);
        uint64_t total = ((16 + (uint64_t)fields + 7) & ~(uint64_t)7) + body;
        if (fields > (1u << 26) || total > (1u << 27) || !serial) {
            need = -1;
            break;
        }
        if ((uint64_t)(n - pos) < total) {
            need = (Py_ssize_t)total;
            break;
        }
        PyObject *raw;
        if (pos == 0 && (Py_ssize_t)total == n) {
            raw = data;
            Py_INCREF(raw);
        } else if (!(raw = PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)total))) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *msg = cls->tp_alloc(cls, 0);
        if (!msg || set_all(msg, raw, le, h[1], serial) || PyList_Append(out, msg)) {
            Py_XDECREF(msg);
            Py_DECREF(raw);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(msg);
        Py_DECREF(raw);
        pos += (Py_ssize_t)total;
    }
    return Py_BuildValue("(Nnn)", out, pos, need);
}

static PyMethodDef methods[] = {
    {"relay", relay, METH_VARARGS,
     "relay(src, dst, want_fds) -> None | (data, sent, fds, truncated): read once, write it on."},
    {"loop", loop, METH_VARARGS,
     "loop(epfd, wake_fd, table, gen, seen, limit, stamp, arena, members) -> "
     "(reason, records, pending): "
     "relay every connection no rule concerns until Python is needed."},
    {"frame", frame, METH_VARARGS,
     "frame(data, cls) -> (messages, pos, need): whole messages from the start of data."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath",
    "The D-Bus proxy's fused read-and-relay (see pytest_runtimefaults/dbus/proxy.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (!(s_raw = PyUnicode_InternFromString("raw")) || !(s_e = PyUnicode_InternFromString("_e")) ||
        !(s_type = PyUnicode_InternFromString("type")) ||
        !(s_serial = PyUnicode_InternFromString("serial")) ||
        !(s_fields = PyUnicode_InternFromString("_fields")) ||
        !(s_hend = PyUnicode_InternFromString("_hend")) ||
        !(s_le = PyUnicode_InternFromString("<")) || !(s_be = PyUnicode_InternFromString(">")) ||
        !(zero = PyLong_FromLong(0)))
        return NULL;
    return PyModule_Create(&module);
}
