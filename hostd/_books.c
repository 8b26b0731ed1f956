/* Compiled passes over the host's books: the guests' EPT bitmaps, and a run of frames for one cluster.
 *
 * Every TickDone carries two bitmaps (np.packbits over the guest's gpfns:
 * bit 7 of byte 0 is gpfn 0). The host ORs them into the frames backing
 * those gpfns and samples the accessed one for its working-set estimate:
 * with numpy that is about a dozen calls on arrays of one guest's pages, per
 * guest per tick; here it is one loop that skips the zero bytes.
 *
 * An EPT fault of first touches (alloc_pages) takes a frame per page and writes
 * both books the same way.
 *
 * A disk cache miss loads a whole cluster (16 pages by default): 16 frames
 * taken off a free list and 16 entries of the frame pool's and the disk's
 * books written. alloc_run does that in one call, taking the frames in the
 * order 16 FramePool.alloc_one calls would; take_clusters takes a dropped
 * cluster's frames out of the disk's books and release_run clears them the
 * way FramePool.free_ones does.
 *
 * count_codes is np.bincount for the p2m's uint8 page states, which the
 * balloon targets read for every guest at every boundary; sample_touched is a
 * working-set period's close (the share of its sampled pages touched).
 *
 * Plain C over the buffer protocol, like guestd/_paging.c. The Python side
 * (hostd/memparts/bits.py, hostd/wss.py, hostd/framepool.py) checks sizes
 * first; tests hold each function to its Python definition.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
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

/* get_buf of objs[0..n) into views[0..n) (item sizes, writability and names from the tables); on failure
 * releases what it took and returns -1 */
static int get_bufs(PyObject **objs, Py_buffer *views, int n, const Py_ssize_t *size, const int *writable,
                    const char **names) {
    for (int i = 0; i < n; i++) {
        if (get_buf(objs[i], &views[i], size[i], writable[i], names[i]) < 0) {
            while (i-- > 0) PyBuffer_Release(&views[i]);
            return -1;
        }
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


/* alloc_run(stack, top, count, kind, owner_guest, owner_index, token, pinned, kind_value, owner, first,
 *           src_token, src_pinned, out_loc, out_state, state_value)
 * Frame i (0 <= i < count) is stack[top - 1 - i]; it becomes kind_value, owned by (owner, first + i), holding
 * src_token[first + i], pinned as src_pinned[first + i] (owner_guest is int32, as in FramePool); out_loc[first + i] = frame, out_state[first + i] =
 * state_value. The caller moves the stack's top and the counts. */
static PyObject *mod_alloc_run(PyObject *self, PyObject *args) {
    PyObject *o[13];
    Py_ssize_t top, count, first;
    int kind_value, owner, state_value;
    if (!PyArg_ParseTuple(args, "OnnOOOOOiinOOOOi", &o[0], &top, &count, &o[1], &o[2], &o[3], &o[4], &o[5],
                          &kind_value, &owner, &first, &o[6], &o[7], &o[8], &o[9], &state_value)) return NULL;
    static const Py_ssize_t size[10] = {8, 1, 4, 8, 8, 1, 8, 1, 8, 1};
    static const int writable[10] = {0, 1, 1, 1, 1, 1, 0, 0, 1, 1};
    static const char *names[10] = {"stack", "kind", "owner_guest", "owner_index", "token", "pinned",
                                    "src_token", "src_pinned", "out_loc", "out_state"};
    Py_buffer b[10];
    if (get_bufs(o, b, 10, size, writable, names) < 0) return NULL;
    int got = 10;
    PyObject *result = NULL;
    Py_ssize_t n_frames = b[1].len, n_src = b[6].len / 8;
    if (b[2].len / 4 != n_frames || b[3].len / 8 != n_frames || b[4].len / 8 != n_frames || b[5].len != n_frames
        || b[7].len != n_src || b[8].len / 8 != n_src || b[9].len != n_src) {
        PyErr_SetString(PyExc_ValueError, "alloc_run: the pool's arrays or the disk's arrays differ in length");
        goto done;
    }
    if (count < 0 || top < count || top > b[0].len / 8 || first < 0 || first + count > n_src) {
        PyErr_Format(PyExc_ValueError, "alloc_run: %zd frames off a stack of %zd (top %zd) for entries "
                     "[%zd, %zd) of %zd", count, b[0].len / 8, top, first, first + count, n_src);
        goto done;
    }
    const int64_t *stack = b[0].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = stack[top - 1 - i];
        if (f < 0 || f >= n_frames) {
            PyErr_Format(PyExc_IndexError, "alloc_run: frame %lld on the stack is outside the pool's %zd",
                         (long long)f, n_frames);
            goto done;
        }
    }
    uint8_t *kind = b[1].buf, *pinned = b[5].buf, *out_state = b[9].buf;
    const uint8_t *src_pinned = b[7].buf;
    int32_t *owner_guest = b[2].buf;
    int64_t *owner_index = b[3].buf, *out_loc = b[8].buf;
    uint64_t *token = b[4].buf;
    const uint64_t *src_token = b[6].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = stack[top - 1 - i];
        Py_ssize_t e = first + i;
        kind[f] = (uint8_t)kind_value;
        owner_guest[f] = owner;
        owner_index[f] = e;
        token[f] = src_token[e];
        pinned[f] = src_pinned[e];
        out_loc[e] = f;
        out_state[e] = (uint8_t)state_value;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    while (got-- > 0) PyBuffer_Release(&b[got]);
    return result;
}

/* alloc_pages(stack, top, gpfns, kind, owner_guest, owner_index, token, pinned, accessed, kind_value, owner,
 *             p2m_pinned, p2m_state, p2m_loc, state_value)
 * An EPT fault's first touches: len(gpfns) frames off the stack's top (FramePool.alloc's order) for the
 * gpfns, ascending, each holding a zero page, accessed, pinned as its gpfn; then P2M.set(gpfns, state_value,
 * frames). Checked whole before anything changes. */
static PyObject *mod_alloc_pages(PyObject *self, PyObject *args) {
    PyObject *o[12];
    Py_ssize_t top;
    int kind_value, owner, state_value;
    if (!PyArg_ParseTuple(args, "OnOOOOOOOiiOOOi", &o[0], &top, &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &kind_value, &owner, &o[8], &o[9], &o[10], &state_value)) return NULL;
    static const Py_ssize_t size[11] = {8, 8, 1, 4, 8, 8, 1, 1, 1, 1, 8};
    static const int writable[11] = {0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1};
    static const char *names[11] = {"stack", "gpfns", "kind", "owner_guest", "owner_index", "token", "pinned",
                                    "accessed", "p2m_pinned", "p2m_state", "p2m_loc"};
    Py_buffer b[11];
    if (get_bufs(o, b, 11, size, writable, names) < 0) return NULL;
    int got = 11;
    PyObject *result = NULL;
    Py_ssize_t n_frames = b[2].len, count = b[1].len / 8, n_pages = b[8].len;
    if (b[3].len / 4 != n_frames || b[4].len / 8 != n_frames || b[5].len / 8 != n_frames || b[6].len != n_frames
        || b[7].len != n_frames || b[9].len != n_pages || b[10].len / 8 != n_pages) {
        PyErr_SetString(PyExc_ValueError, "alloc_pages: the pool's arrays or the p2m's arrays differ in length");
        goto done;
    }
    if (top < count || top > b[0].len / 8) {
        PyErr_Format(PyExc_ValueError, "alloc_pages: %zd frames off a stack of %zd (top %zd)", count,
                     b[0].len / 8, top);
        goto done;
    }
    const int64_t *stack = b[0].buf, *gpfns = b[1].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = stack[top - 1 - i], g = gpfns[i];
        if (f < 0 || f >= n_frames) {
            PyErr_Format(PyExc_IndexError, "alloc_pages: frame %lld on the stack is outside the pool's %zd",
                         (long long)f, n_frames);
            goto done;
        }
        if (g < 0 || g >= n_pages) {
            PyErr_Format(PyExc_IndexError, "alloc_pages: gpfn %lld outside the p2m's %zd", (long long)g, n_pages);
            goto done;
        }
        if (i > 0 && g <= gpfns[i - 1]) {   /* a gpfn twice would leave a frame that no gpfn maps */
            PyErr_Format(PyExc_ValueError, "alloc_pages: gpfns not strictly ascending at %lld", (long long)g);
            goto done;
        }
    }
    uint8_t *kind = b[2].buf, *pinned = b[6].buf, *accessed = b[7].buf, *p2m_state = b[9].buf;
    const uint8_t *p2m_pinned = b[8].buf;
    int32_t *owner_guest = b[3].buf;
    int64_t *owner_index = b[4].buf, *p2m_loc = b[10].buf;
    uint64_t *token = b[5].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = stack[top - 1 - i], g = gpfns[i];
        kind[f] = (uint8_t)kind_value;
        owner_guest[f] = owner;
        owner_index[f] = g;
        token[f] = 0;
        accessed[f] = 1;
        pinned[f] = p2m_pinned[g];
        p2m_state[g] = (uint8_t)state_value;
        p2m_loc[g] = f;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    while (got-- > 0) PyBuffer_Release(&b[got]);
    return result;
}

/* release_run(frames, owner, kind, owner_guest, owner_index, token, accessed, dirty, pinned, busy, counts)
 * Every frame (each held by ``owner``, none free) becomes free with nothing in it; counts[kind] moves to
 * counts[0] (FREE). Checked whole before anything changes. The caller puts the frames on a free list. */
static PyObject *mod_release_run(PyObject *self, PyObject *args) {
    PyObject *o[10];
    int owner;
    if (!PyArg_ParseTuple(args, "OiOOOOOOOOO", &o[0], &owner, &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9])) return NULL;
    static const Py_ssize_t size[10] = {8, 1, 4, 8, 8, 1, 1, 1, 1, 8};
    static const int writable[10] = {0, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    static const char *names[10] = {"frames", "kind", "owner_guest", "owner_index", "token", "accessed", "dirty",
                                    "pinned", "busy", "counts"};
    Py_buffer b[10];
    if (get_bufs(o, b, 10, size, writable, names) < 0) return NULL;
    int got = 10;
    PyObject *result = NULL;
    Py_ssize_t n_frames = b[1].len, count = b[0].len / 8, n_kinds = b[9].len / 8;
    for (int k = 2; k <= 8; k++) {
        if (b[k].len / size[k] != n_frames) {
            PyErr_Format(PyExc_ValueError, "release_run: %s has %zd entries, the pool %zd", names[k],
                         b[k].len / size[k], n_frames);
            goto done;
        }
    }
    const int64_t *fr = b[0].buf;
    uint8_t *kind = b[1].buf;
    int32_t *owner_guest = b[2].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = fr[i];
        if (f < 0 || f >= n_frames) {
            PyErr_Format(PyExc_IndexError, "release_run: frame %lld outside the pool's %zd", (long long)f, n_frames);
            goto done;
        }
        if (kind[f] == 0 || kind[f] >= n_kinds) {
            PyErr_Format(PyExc_ValueError, "release_run: frame %lld %s", (long long)f,
                         kind[f] == 0 ? "freed twice" : "of an unknown kind");
            goto done;
        }
        if (owner_guest[f] != owner) {
            PyErr_Format(PyExc_ValueError, "release_run: frame %lld is held by guest %d, not %d", (long long)f,
                         (int)owner_guest[f], owner);
            goto done;
        }
    }
    int64_t *owner_index = b[3].buf, *counts = b[9].buf;
    uint64_t *token = b[4].buf;
    uint8_t *accessed = b[5].buf, *dirty = b[6].buf, *pinned = b[7].buf, *busy = b[8].buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        int64_t f = fr[i];
        if (kind[f] == 0) {   /* the same frame twice in this run: the second is a double free */
            PyErr_Format(PyExc_ValueError, "release_run: frame %lld appears twice", (long long)f);
            /* undo nothing: the earlier ones are free already, as free_ones would have left them */
            goto done;
        }
        counts[kind[f]] -= 1;
        counts[0] += 1;
        kind[f] = 0;
        owner_guest[f] = -1;
        owner_index[f] = -1;
        token[f] = 0;
        accessed[f] = dirty[f] = pinned[f] = busy[f] = 0;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    while (got-- > 0) PyBuffer_Release(&b[got]);
    return result;
}

/* take_clusters(clusters, cp, state, loc, cluster_dirty, cluster_cached, frame_state, not_cached, no_loc, out)
 * -> n: a drop of clean clusters from a disk's books. Every block of each cluster (in the order given,
 * blocks ascending) that holds a frame gives it up: its frame goes to out (in that order), the block
 * becomes not_cached with no_loc, and the cluster counts no cached block. A dirty cluster (or one outside
 * the disk) changes nothing and raises. The caller frees out[:n]. */
static PyObject *mod_take_clusters(PyObject *self, PyObject *args) {
    PyObject *o[6];
    Py_ssize_t cp;
    int frame_state, not_cached;
    long long no_loc;
    if (!PyArg_ParseTuple(args, "OnOOOOiiLO", &o[0], &cp, &o[1], &o[2], &o[3], &o[4], &frame_state, &not_cached,
                          &no_loc, &o[5])) return NULL;
    static const Py_ssize_t size[6] = {8, 1, 8, 8, 8, 8};
    static const int writable[6] = {0, 1, 1, 0, 1, 1};
    static const char *names[6] = {"clusters", "state", "loc", "cluster_dirty", "cluster_cached", "out"};
    Py_buffer b[6];
    if (get_bufs(o, b, 6, size, writable, names) < 0) return NULL;
    int got = 6;
    PyObject *result = NULL;
    Py_ssize_t k = b[0].len / 8, n_blocks = b[1].len, n_clusters = b[3].len / 8;
    if (cp < 1 || b[2].len / 8 != n_blocks || b[4].len / 8 != n_clusters || b[5].len / 8 < k * cp) {
        PyErr_SetString(PyExc_ValueError, "take_clusters: the disk's arrays or out do not fit");
        goto done;
    }
    const int64_t *cl = b[0].buf, *cdirty = b[3].buf;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (cl[i] < 0 || cl[i] >= n_clusters) {
            PyErr_Format(PyExc_ValueError, "take_clusters: cluster %lld outside the disk's %zd", (long long)cl[i],
                         n_clusters);
            goto done;
        }
        if (cdirty[cl[i]]) {
            PyErr_SetString(PyExc_ValueError, "dropping a dirty cache page");
            goto done;
        }
    }
    uint8_t *state = b[1].buf;
    int64_t *loc = b[2].buf, *cached = b[4].buf, *out = b[5].buf;
    Py_ssize_t n = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        Py_ssize_t b0 = (Py_ssize_t)cl[i] * cp, b1 = b0 + cp < n_blocks ? b0 + cp : n_blocks;
        for (Py_ssize_t blk = b0; blk < b1; blk++) {
            if (state[blk] == (uint8_t)frame_state) {
                out[n++] = loc[blk];
                state[blk] = (uint8_t)not_cached;
                loc[blk] = no_loc;
            }
        }
        cached[cl[i]] = 0;
    }
    result = PyLong_FromSsize_t(n);
done:
    while (got-- > 0) PyBuffer_Release(&b[got]);
    return result;
}

/* count_codes(codes uint8, out int64): out[v] = how many codes are v; a code with no place in out is an error
 * (and out is left as it was). np.bincount would first copy a uint8 array to intp: 10x slower. */
static PyObject *mod_count_codes(PyObject *self, PyObject *args) {
    PyObject *o_codes, *o_out;
    if (!PyArg_ParseTuple(args, "OO", &o_codes, &o_out)) return NULL;
    Py_buffer codes, out;
    if (get_buf(o_codes, &codes, 1, 0, "codes") < 0) return NULL;
    if (get_buf(o_out, &out, 8, 1, "out") < 0) { PyBuffer_Release(&codes); return NULL; }
    Py_ssize_t n = codes.len, n_out = out.len / 8;
    const uint8_t *c = codes.buf;
    int64_t hist[256] = {0}, h[4][256] = {{0}};
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {     /* four counters: runs of one code do not wait on each other's increments */
        h[0][c[i]]++; h[1][c[i + 1]]++; h[2][c[i + 2]]++; h[3][c[i + 3]]++;
    }
    for (; i < n; i++) h[0][c[i]]++;
    for (int v = 0; v < 256; v++) hist[v] = h[0][v] + h[1][v] + h[2][v] + h[3][v];
    PyObject *result = Py_None;
    for (Py_ssize_t v = n_out; v < 256; v++) {
        if (hist[v]) {
            PyErr_Format(PyExc_ValueError, "count_codes: code %zd found, out has places for 0..%zd", v, n_out - 1);
            result = NULL;
            break;
        }
    }
    if (result != NULL) {
        int64_t *o = out.buf;
        for (Py_ssize_t v = 0; v < n_out; v++) o[v] = v < 256 ? hist[v] : 0;
    }
    PyBuffer_Release(&out); PyBuffer_Release(&codes);
    Py_XINCREF(result);
    return result;
}

/* sample_touched(state uint8, sample int64, touched bool, skip_code) -> (kept, touched_kept): of the sampled
 * gpfns whose state is not skip_code (ballooned), how many, and how many of those were touched: a working-set
 * period's close (hostd/wss.py), one pass instead of five numpy calls on a hundred entries. */
static PyObject *mod_sample_touched(PyObject *self, PyObject *args) {
    PyObject *o_state, *o_sample, *o_touched;
    int skip;
    if (!PyArg_ParseTuple(args, "OOOi", &o_state, &o_sample, &o_touched, &skip)) return NULL;
    Py_buffer state, sample, touched;
    if (get_buf(o_state, &state, 1, 0, "state") < 0) return NULL;
    if (get_buf(o_sample, &sample, 8, 0, "sample") < 0) { PyBuffer_Release(&state); return NULL; }
    if (get_buf(o_touched, &touched, 1, 0, "touched") < 0) {
        PyBuffer_Release(&sample); PyBuffer_Release(&state); return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = sample.len / 8, kept = 0, hit = 0;
    const int64_t *g = sample.buf;
    const uint8_t *st = state.buf, *t = touched.buf;
    if (touched.len != n) {
        PyErr_Format(PyExc_ValueError, "sample_touched: %zd sampled gpfns, %zd touched bits", n, touched.len);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (g[i] < 0 || g[i] >= state.len) {
            PyErr_Format(PyExc_IndexError, "sample_touched: gpfn %lld outside the guest's %zd", (long long)g[i],
                         state.len);
            goto done;
        }
        if (st[g[i]] != (uint8_t)skip) {
            kept++;
            hit += t[i] != 0;
        }
    }
    result = Py_BuildValue("(nn)", kept, hit);
done:
    PyBuffer_Release(&touched); PyBuffer_Release(&sample); PyBuffer_Release(&state);
    return result;
}

/* A stat value plainly plausible: exactly an int or a float in [0, max_value] (not NaN); an int is held
 * against max_int exactly, as Python compares them (2**53 + 1 > 2.0**53). An int beyond 64 bits is not
 * plain (Python's check decides it). */
static int plausible_number(PyObject *value, double max_value, long long max_int) {
    if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        return d >= 0.0 && d <= max_value;      /* (NaN fails both) */
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        return x >= 0 && x <= max_int;
    }
    return 0;
}

/* plausible_stats(stats, max_keys, max_key_chars, max_value) -> a copy of stats, or None.
 *
 * hostd/session.py's sanitize_stats for the stats every TickDone brings (all plausible): a dict of at
 * most max_keys str keys of at most max_key_chars characters, each value exactly an int or a float in
 * [0, max_value] (not NaN); the copy in one pass. None for anything else (a refusal to word, an int
 * beyond 64 bits): sanitize_stats's own checks then decide. */
static PyObject *mod_plausible_stats(PyObject *self, PyObject *args) {
    PyObject *stats;
    Py_ssize_t max_keys, max_chars;
    double max_value;
    if (!PyArg_ParseTuple(args, "O!nnd", &PyDict_Type, &stats, &max_keys, &max_chars, &max_value)) return NULL;
    Py_ssize_t n = PyDict_GET_SIZE(stats), pos = 0;
    if (n < 1 || n > max_keys || !(max_value >= 0.0 && max_value < 9.0e18)) Py_RETURN_NONE;
    /* an int against the bound exactly, as Python compares them (2**53 + 1 > 2.0**53) */
    long long max_int = (long long)max_value;
    PyObject *key, *value;
    while (PyDict_Next(stats, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) > max_chars) Py_RETURN_NONE;
        if (!plausible_number(value, max_value, max_int)) Py_RETURN_NONE;
    }
    return PyDict_Copy(stats);
}

/* plausible_values(keys, values, max_keys, max_key_chars, max_value) -> {keys[i]: values[i]}, or None.
 *
 * A TickDone's stats as an array of the values of the keys the guest's last map named (those keys as
 * that map sent them): plausible_stats's tests of each key and value, the dict built in the same pass. None when the lengths differ or anything is not plainly plausible: sanitize_stats's own
 * checks then decide. */
static PyObject *mod_plausible_values(PyObject *self, PyObject *args) {
    PyObject *keys, *values;
    Py_ssize_t max_keys, max_chars;
    double max_value;
    if (!PyArg_ParseTuple(args, "O!O!nnd", &PyTuple_Type, &keys, &PyList_Type, &values, &max_keys, &max_chars,
                          &max_value))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n < 1 || n > max_keys || PyList_GET_SIZE(values) != n || !(max_value >= 0.0 && max_value < 9.0e18))
        Py_RETURN_NONE;
    long long max_int = (long long)max_value;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_CheckExact(key) || PyUnicode_GET_LENGTH(key) > max_chars) Py_RETURN_NONE;
        PyObject *value = PyList_GET_ITEM(values, i);
        if (!plausible_number(value, max_value, max_int)) Py_RETURN_NONE;
    }
    PyObject *out = _PyDict_NewPresized(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyDict_SetItem(out, PyTuple_GET_ITEM(keys, i), PyList_GET_ITEM(values, i)) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* stat_numbers(stats, keys, kinds) -> tuple: each key's value in stats as the history monitor reads it.
 *
 * kinds[i] is 'i' (an int: an int as it is, a float truncated by int(), a bool or anything else 0, a
 * missing key 0), 'f' (a float: a finite int or float as float(), anything else or a missing key 0.0) or
 * 'o' (as 'f', but None for a missing key). hostd/monitors/history.py's _int and _float are the
 * definition, raising where they raise (int() of a NaN, an int too large for a float); one call per guest
 * and tick instead of a Python call per key. */
static PyObject *mod_stat_numbers(PyObject *self, PyObject *args) {
    PyObject *stats, *keys;
    const char *kinds;
    Py_ssize_t n_kinds;
    if (!PyArg_ParseTuple(args, "O!O!s#", &PyDict_Type, &stats, &PyTuple_Type, &keys, &kinds, &n_kinds))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n_kinds != n) {
        PyErr_Format(PyExc_ValueError, "stat_numbers: %zd keys, %zd kinds", n, n_kinds);
        return NULL;
    }
    PyObject *out = PyTuple_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyDict_GetItemWithError(stats, PyTuple_GET_ITEM(keys, i));   /* borrowed */
        if (v == NULL && PyErr_Occurred()) goto fail;
        PyObject *r;
        char kind = kinds[i];
        if (kind == 'i') {
            if (v != NULL && PyLong_CheckExact(v)) {
                Py_INCREF(v);
                r = v;
            } else if (v != NULL && !PyBool_Check(v) && (PyLong_Check(v) || PyFloat_Check(v))) {
                r = PyNumber_Long(v);
            } else {
                r = PyLong_FromLong(0);
            }
        } else if (kind == 'f' || kind == 'o') {
            if (v == NULL && kind == 'o') {
                Py_INCREF(Py_None);
                r = Py_None;
            } else if (v != NULL && !PyBool_Check(v) && PyFloat_Check(v)) {
                double d = PyFloat_AS_DOUBLE(v);
                r = !isfinite(d) ? PyFloat_FromDouble(0.0) : PyFloat_CheckExact(v) ? (Py_INCREF(v), v)
                                                                                  : PyNumber_Float(v);
            } else if (v != NULL && !PyBool_Check(v) && PyLong_Check(v)) {
                /* math.isfinite(v) converts it first: OverflowError for an int beyond a float */
                double d = PyLong_CheckExact(v) ? PyLong_AsDouble(v) : PyFloat_AsDouble(v);
                if (d == -1.0 && PyErr_Occurred()) goto fail;
                r = !isfinite(d) ? PyFloat_FromDouble(0.0) : PyLong_CheckExact(v) ? PyFloat_FromDouble(d)
                                                                                 : PyNumber_Float(v);
            } else {
                r = PyFloat_FromDouble(0.0);
            }
        } else {
            PyErr_Format(PyExc_ValueError, "stat_numbers: kind %c is not one of i, f, o", kind);
            goto fail;
        }
        if (r == NULL) goto fail;
        PyTuple_SET_ITEM(out, i, r);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef books_functions[] = {
    {"stat_numbers", mod_stat_numbers, METH_VARARGS,
     "stat_numbers(stats dict, keys tuple, kinds str) -> tuple: each key's value as an int ('i'), a float "
     "('f') or a float or None when missing ('o'), by the history monitor's rules"},
    {"plausible_stats", mod_plausible_stats, METH_VARARGS,
     "plausible_stats(stats, max_keys, max_key_chars, max_value) -> a copy of stats when every key and value "
     "is plausible (sanitize_stats's common case), else None"},
    {"plausible_values", mod_plausible_values, METH_VARARGS,
     "plausible_values(keys tuple, values list, max_keys, max_key_chars, max_value) -> dict(zip(keys, values)) "
     "when the lengths agree and every key and value is plausible (as plausible_stats), else None"},
    {"sample_touched", mod_sample_touched, METH_VARARGS,
     "sample_touched(state uint8, sample int64, touched bool, skip_code) -> (kept, touched_kept): of the sampled "
     "gpfns not in state skip_code, how many, and how many of them were touched"},
    {"count_codes", mod_count_codes, METH_VARARGS,
     "count_codes(codes uint8, out int64): out[v] = how many codes are v (np.bincount without its copy)"},
    {"or_backed", mod_or_backed, METH_VARARGS,
     "or_backed(packed, state uint8, frame_state, loc int64, target bool) -> bits set: target[loc[g]] = 1 for "
     "each gpfn g whose bit is set and whose state is frame_state"},
    {"gather_or", mod_gather_or, METH_VARARGS,
     "gather_or(packed, idx int64, out bool): out[i] |= the bit of gpfn idx[i]"},
    {"alloc_run", mod_alloc_run, METH_VARARGS,
     "alloc_run(stack, top, count, kind, owner_guest, owner_index, token, pinned, kind_value, owner, first, "
     "src_token, src_pinned, out_loc, out_state, state_value): count frames off the stack's top for entries "
     "first.. of a disk"},
    {"alloc_pages", mod_alloc_pages, METH_VARARGS,
     "alloc_pages(stack, top, gpfns int64, kind, owner_guest, owner_index, token, pinned, accessed, kind_value, "
     "owner, p2m_pinned, p2m_state, p2m_loc, state_value): frames off the stack's top for first touches of "
     "gpfns, zero-filled and accessed, set in the p2m"},
    {"release_run", mod_release_run, METH_VARARGS,
     "release_run(frames int64, owner, kind, owner_guest, owner_index, token, accessed, dirty, pinned, busy, "
     "counts): free frames held by owner, clearing what they held"},
    {"take_clusters", mod_take_clusters, METH_VARARGS,
     "take_clusters(clusters int64, cp, state, loc, cluster_dirty, cluster_cached, frame_state, not_cached, "
     "no_loc, out int64) -> n: the frames of clean clusters dropped from a disk's books, into out"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef books_module = {
    PyModuleDef_HEAD_INIT, "_books", "Compiled passes over the host's books.", -1, books_functions};

PyMODINIT_FUNC PyInit__books(void) { return PyModule_Create(&books_module); }
