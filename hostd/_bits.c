/* The guests' EPT accessed/dirty bitmaps read into the host's books, in one pass each.
 *
 * Every TickDone carries two bitmaps (np.packbits over the guest's gpfns:
 * bit 7 of byte 0 is gpfn 0). The host ORs them into the frames backing
 * those gpfns and samples the accessed one for its working-set estimate:
 * with numpy that is about a dozen calls on arrays of one guest's pages, per
 * guest per tick; here it is one loop that skips the zero bytes.
 *
 * Plain C over the buffer protocol, like guestd/_paging.c. The Python side
 * (hostd/memparts/bits.py, hostd/wss.py) checks the bitmap's length first,
 * and keeps a numpy reference of each function for the tests.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int get_buf(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes, got %zd", name, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* or_backed(packed, state, frame_state, loc, target) -> int */
static PyObject *mod_or_backed(PyObject *self, PyObject *args) {
    PyObject *o_packed, *o_state, *o_loc, *o_target;
    int frame_state;
    if (!PyArg_ParseTuple(args, "OOiOO", &o_packed, &o_state, &frame_state, &o_loc, &o_target)) return NULL;
    Py_buffer packed, state, loc, target;
    if (get_buf(o_packed, &packed, 1, 0, "packed") < 0) return NULL;
    if (get_buf(o_state, &state, 1, 0, "state") < 0) goto fail_packed;
    if (get_buf(o_loc, &loc, 8, 0, "loc") < 0) goto fail_state;
    if (get_buf(o_target, &target, 1, 1, "target") < 0) goto fail_loc;
    Py_ssize_t n = state.len, n_target = target.len, set = 0;
    if (loc.len / 8 != n || packed.len != (n + 7) / 8) {
        PyErr_Format(PyExc_ValueError, "or_backed: %zd gpfns of state, %zd of loc, %zd bitmap bytes",
                     n, loc.len / 8, packed.len);
        goto fail;
    }
    const uint8_t *p = packed.buf, *st = state.buf;
    const int64_t *lc = loc.buf;
    uint8_t *tg = target.buf;
    for (Py_ssize_t i = 0; i < packed.len; i++) {
        uint8_t b = p[i];
        if (!b) continue;
        for (int j = 0; j < 8; j++) {
            if (!(b & (0x80u >> j))) continue;
            Py_ssize_t g = i * 8 + j;
            if (g >= n) break;          /* the padding bits of the last byte */
            set++;
            if (st[g] != (uint8_t)frame_state) continue;
            int64_t f = lc[g];
            if (f < 0 || f >= n_target) {
                PyErr_Format(PyExc_IndexError, "or_backed: gpfn %zd is backed by frame %lld, outside [0, %zd)",
                             g, (long long)f, n_target);
                goto fail;
            }
            tg[f] = 1;
        }
    }
    PyBuffer_Release(&target); PyBuffer_Release(&loc); PyBuffer_Release(&state); PyBuffer_Release(&packed);
    return PyLong_FromSsize_t(set);
fail:
    PyBuffer_Release(&target);
fail_loc:
    PyBuffer_Release(&loc);
fail_state:
    PyBuffer_Release(&state);
fail_packed:
    PyBuffer_Release(&packed);
    return NULL;
}

/* gather_or(packed, idx, out): out[i] |= bit idx[i] of packed */
static PyObject *mod_gather_or(PyObject *self, PyObject *args) {
    PyObject *o_packed, *o_idx, *o_out;
    if (!PyArg_ParseTuple(args, "OOO", &o_packed, &o_idx, &o_out)) return NULL;
    Py_buffer packed, idx, out;
    if (get_buf(o_packed, &packed, 1, 0, "packed") < 0) return NULL;
    if (get_buf(o_idx, &idx, 8, 0, "idx") < 0) { PyBuffer_Release(&packed); return NULL; }
    if (get_buf(o_out, &out, 1, 1, "out") < 0) { PyBuffer_Release(&idx); PyBuffer_Release(&packed); return NULL; }
    Py_ssize_t k = idx.len / 8, nbits = packed.len * 8;
    PyObject *result = Py_None;
    if (out.len != k) {
        PyErr_Format(PyExc_ValueError, "gather_or: %zd indices, %zd outputs", k, out.len);
        result = NULL;
    } else {
        const uint8_t *p = packed.buf;
        const int64_t *ix = idx.buf;
        uint8_t *o = out.buf;
        for (Py_ssize_t i = 0; i < k; i++) {
            int64_t g = ix[i];
            if (g < 0 || g >= nbits) {
                PyErr_Format(PyExc_IndexError, "gather_or: gpfn %lld outside the bitmap's %zd bits",
                             (long long)g, nbits);
                result = NULL;
                break;
            }
            if ((p[g >> 3] >> (7 - (g & 7))) & 1) o[i] = 1;
        }
    }
    PyBuffer_Release(&out); PyBuffer_Release(&idx); PyBuffer_Release(&packed);
    Py_XINCREF(result);
    return result;
}

static PyMethodDef bits_functions[] = {
    {"or_backed", mod_or_backed, METH_VARARGS,
     "or_backed(packed, state uint8, frame_state, loc int64, target bool) -> bits set: target[loc[g]] = 1 for "
     "each gpfn g whose bit is set and whose state is frame_state"},
    {"gather_or", mod_gather_or, METH_VARARGS,
     "gather_or(packed, idx int64, out bool): out[i] |= the bit of gpfn idx[i]"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef bits_module = {
    PyModuleDef_HEAD_INIT, "_bits", "EPT accessed/dirty bitmaps into the host's books.", -1, bits_functions};

PyMODINIT_FUNC PyInit__bits(void) { return PyModule_Create(&bits_module); }
