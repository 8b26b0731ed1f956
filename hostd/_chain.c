/* A read chain's usual steps, compiled: the host's side of hostd/readchain.py for one guest's disk.
 *
 * A guest's read chain (hostd/readchain.py) is a program of clock steps and
 * one-block reads that the host runs from a read's completion. In Python
 * every read went through about fifteen functions (the disk's allowance, the
 * LRU heap, the frame pool's grant and books, the device's channel heap, the
 * counters): ~9.5 us a read, the largest part of the host's CPU in a run of
 * many guests. serve_reads runs the program's WIN, CHECK, ADD and READ steps
 * in one pass over the same state:
 *
 *   - the disk's books (VirtualDisk: block and cluster arrays, the LRU heap, the
 *     in-flight list, the counters);
 *   - the frame pool's books and this guest's grant (FramePool, _Grant);
 *   - the guest's lane on its disk device (Device, _Lane).
 *
 * It does what VirtualDisk.fit_one + read_one_frame and Device.submit do for a
 * hit or for a miss that loads a fresh cluster (dropping the disk's own least
 * recently used clean clusters first when its allowance is full), the same
 * operations in the same order: the same frames, heap entries, float sums and
 * counts. The heaps are the Python lists themselves, changed through the
 * _heapq module's own functions, so their order is exactly the Python one.
 *
 * Anything else hands the step back to Python before changing anything for it
 * (status NEED_PYTHON at that step): an EPT fault, a read that would wait for
 * the disk's queue depth, a miss in a partly cached cluster, a clean drop that
 * would fall short (the dirty write-back path; the heap is put back as it was).
 * The Python loop (run_chain) serves that step and calls again.
 *
 * serve_reads(vd, pool, grant, lane, device, svc, no_frames, prog, k, vt, reads, limit, gate, toks, times)
 *   -> (k, vt, reads, status)
 * svc: the device's service time at full speed of a cluster's read, sequential and not, and of the disk's
 * last (shorter) cluster's. status: 0 NEED_PYTHON (the step at k, or k == len(prog): the end), 1 STOP
 * (the chain ends before step k), 2 WAITED (a miss at k found its grant short after making room: an
 * invariant violation the caller reports).
 *
 * Compiled with -ffp-contract=off: every virtual time is the Python expression's, bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OP_WIN = 0, OP_CHECK = 1, OP_ADD = 2, OP_READ = 3, OP_EPT = 4, OP_EPT_PAGE = 5 };
enum { NEED_PYTHON = 0, STOP = 1, WAITED = 2 };
enum { NOT_CACHED = 0, FRAME = 1 };
enum { KIND_FREE = 0, KIND_CACHE = 2 };
#define NO_LOC (-1)
#define NO_OWNER (-1)

static PyObject *heappush, *heappop, *heapreplace;

/* --- attributes, read into C locals and written back -------------------------------------------------- */

/* A call reads and writes back some fifty attributes: each name (a string literal, known by its address) is
 * made an interned str once, not decoded from C at every lookup as PyObject_GetAttrString would. */
#define N_NAMES 256
static struct { const char *key; PyObject *name; } names[N_NAMES];

/* The interned name (a borrowed reference), or NULL: an error set, or none when the table is full (there
 * are far fewer names than slots; the caller then looks the name up as PyObject_GetAttrString does). */
static PyObject *name_of(const char *s) {
    size_t i = ((uintptr_t)s >> 3) % N_NAMES;
    for (size_t probes = 0; probes < N_NAMES; probes++, i = (i + 1) % N_NAMES) {
        if (names[i].key == s) return names[i].name;
        if (names[i].key == NULL) {
            PyObject *o = PyUnicode_InternFromString(s);
            if (o == NULL) return NULL;
            names[i].key = s;
            names[i].name = o;   /* kept for the life of the module */
            return o;
        }
    }
    return NULL;
}

static PyObject *get_attr(PyObject *obj, const char *s) {
    PyObject *name = name_of(s);
    if (name == NULL)
        return PyErr_Occurred() ? NULL : PyObject_GetAttrString(obj, s);
    return PyObject_GetAttr(obj, name);
}

static int set_attr(PyObject *obj, const char *s, PyObject *v) {
    PyObject *name = name_of(s);
    if (name == NULL)
        return PyErr_Occurred() ? -1 : PyObject_SetAttrString(obj, s, v);
    return PyObject_SetAttr(obj, name, v);
}

static int get_ll(PyObject *obj, const char *name, long long *out) {
    PyObject *v = get_attr(obj, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_d(PyObject *obj, const char *name, double *out) {
    PyObject *v = get_attr(obj, name);
    if (v == NULL) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int set_ll(PyObject *obj, const char *name, long long value) {
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL) return -1;
    int r = set_attr(obj, name, v);
    Py_DECREF(v);
    return r;
}

static int set_d(PyObject *obj, const char *name, double value) {
    PyObject *v = PyFloat_FromDouble(value);
    if (v == NULL) return -1;
    int r = set_attr(obj, name, v);
    Py_DECREF(v);
    return r;
}

static int add_ll(PyObject *obj, const char *name, long long delta) {
    if (delta == 0) return 0;
    long long v;
    if (get_ll(obj, name, &v) < 0) return -1;
    return set_ll(obj, name, v + delta);
}

/* --- buffers ---------------------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_array(PyObject *owner, const char *name, Buf *b, Py_ssize_t itemsize, Py_ssize_t min_items) {
    PyObject *arr = get_attr(owner, name);
    if (arr == NULL) return -1;
    int r = PyObject_GetBuffer(arr, &b->view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE);
    Py_DECREF(arr);   /* the owner keeps the array alive for the call */
    if (r < 0) return -1;
    b->held = 1;
    if (b->view.itemsize != itemsize || b->view.len / itemsize < min_items) {
        PyErr_Format(PyExc_TypeError, "serve_reads: %s has %zd items of %zd bytes; want %zd-byte items, "
                     "at least %zd", name, b->view.len / (b->view.itemsize ? b->view.itemsize : 1),
                     b->view.itemsize, itemsize, min_items);
        return -1;
    }
    return 0;
}

/* --- the state of one call -------------------------------------------------------------------------------- */

enum { V_STATE, V_LOC, V_STAMP, V_CACHED, V_CDIRTY, V_CPINNED, V_TOKENS, V_PINNED,
       P_KIND, P_OWNER, P_INDEX, P_TOKEN, P_PINNED, P_ACCESSED, P_DIRTY, P_BUSY, P_COUNTS, G_STACK,
       E_STATE, E_LOC, E_PINNED, N_BUFS };

/* Where each array comes from (the disk or the pool), its item size and the least length it must have. */
enum { LEN_ANY, LEN_BLOCKS, LEN_CLUSTERS, LEN_FRAMES, LEN_KINDS };
static const struct { int pool; const char *name; Py_ssize_t itemsize; int len; } ARRAYS[N_BUFS] = {
    [V_STATE] = {0, "cache_state", 1, LEN_BLOCKS}, [V_LOC] = {0, "cache_loc", 8, LEN_BLOCKS},
    [V_STAMP] = {0, "cluster_stamp_us", 8, LEN_CLUSTERS}, [V_CACHED] = {0, "cluster_cached", 8, LEN_CLUSTERS},
    [V_CDIRTY] = {0, "cluster_dirty", 8, LEN_CLUSTERS}, [V_CPINNED] = {0, "cluster_pinned", 1, LEN_CLUSTERS},
    [V_TOKENS] = {0, "tokens", 8, LEN_BLOCKS}, [V_PINNED] = {0, "pinned", 1, LEN_BLOCKS},
    [P_KIND] = {1, "kind", 1, LEN_ANY}, [P_OWNER] = {1, "owner_guest", 4, LEN_FRAMES},
    [P_INDEX] = {1, "owner_index", 8, LEN_FRAMES}, [P_TOKEN] = {1, "token", 8, LEN_FRAMES},
    [P_PINNED] = {1, "pinned", 1, LEN_FRAMES}, [P_ACCESSED] = {1, "accessed", 1, LEN_FRAMES},
    [P_DIRTY] = {1, "dirty", 1, LEN_FRAMES}, [P_BUSY] = {1, "busy", 1, LEN_FRAMES},
    [P_COUNTS] = {1, "_kind_frames", 8, LEN_KINDS}, [G_STACK] = {2, "stack", 8, LEN_ANY},
};

typedef struct {
    Buf b[N_BUFS];
    /* the disk */
    PyObject *vd, *lru, *inflight_done, *inflight_frames, *no_frames;
    long long gid, cp, n_blocks, n_clusters, allowance, max_inflight, offset_base, swap_lo, swap_hi;
    long long cached_pages, fill_pages_tick, inflight_len;
    double page_copy_us;
    /* counter deltas */
    long long c_read_requests, c_read_pages, c_swap_read, c_hit, c_miss, c_loads, c_load_pages, c_device_read,
        c_dropped;
    /* the pool and the grant */
    PyObject *pool, *grant;
    long long n_frames, n_kinds, n_granted, g_n, g_taken, g_cap;
    /* the device lane */
    PyObject *lane, *device, *chans;
    long long l_next_offset, l_seeks, l_requests, l_pages, d_requests, d_pages, d_read_pages;
    double l_demand_us, l_busy_us, l_speed;
    int dev_seeks;
    double svc_seq, svc_seek, svc_last_seq, svc_last_seek;
    long long last_cluster_blocks;
    int pooled;              /* a frame was taken or given back: the pool, grant, lane and device change */
    unsigned char *seen;     /* clusters met in one drop (calloc'd on the first drop) */
    /* EPT faults of first touches: the ept tuple, read at the first one (E_* buffers: the guest's p2m) */
    PyObject *ept, *hc, *gc, *can_fault_fn;
    int ept_loaded, can_fault, guest_kind, frame_state, granted;   /* can_fault: -1 not asked yet */
    double each_us, fault_gate;
    unsigned long long later_token;
    long long guest_pages, e_calls, e_faults, e_cut, e_later, faults;
    int64_t *pages;          /* a fault's gpfns, and the ones it serves sorted (malloc'd at the first) */
    Py_ssize_t pages_cap;
} Ctx;

#define U8(c, i) ((uint8_t *)(c)->b[i].view.buf)
#define I64(c, i) ((int64_t *)(c)->b[i].view.buf)
#define U64(c, i) ((uint64_t *)(c)->b[i].view.buf)
#define F64(c, i) ((double *)(c)->b[i].view.buf)
#define I32(c, i) ((int32_t *)(c)->b[i].view.buf)

static void ctx_release(Ctx *c) {
    for (int i = 0; i < N_BUFS; i++)
        if (c->b[i].held) PyBuffer_Release(&c->b[i].view);
    Py_XDECREF(c->lru);
    Py_XDECREF(c->inflight_done);
    Py_XDECREF(c->inflight_frames);
    Py_XDECREF(c->chans);
    free(c->seen);
    free(c->pages);
}

static int ctx_load(Ctx *c) {
    PyObject *vd = c->vd, *pool = c->pool;
    PyObject *sw = NULL;
    if (get_ll(vd, "guest_id", &c->gid) < 0 || get_ll(vd, "cluster_pages", &c->cp) < 0
        || get_ll(vd, "n_blocks", &c->n_blocks) < 0 || get_ll(vd, "allowance_pages", &c->allowance) < 0
        || get_ll(vd, "max_inflight_requests", &c->max_inflight) < 0 || get_ll(vd, "offset_base", &c->offset_base) < 0
        || get_ll(vd, "cached_pages", &c->cached_pages) < 0 || get_ll(vd, "fill_pages_tick", &c->fill_pages_tick) < 0)
        return -1;
    if (c->cp < 1) {
        PyErr_SetString(PyExc_ValueError, "serve_reads: cluster_pages < 1");
        return -1;
    }
    c->n_clusters = (c->n_blocks + c->cp - 1) / c->cp;
    c->last_cluster_blocks = c->n_blocks - (c->n_clusters - 1) * c->cp;
    sw = get_attr(vd, "swap_area");
    if (sw == NULL) return -1;
    if (!PyArg_ParseTuple(sw, "LL", &c->swap_lo, &c->swap_hi)) { Py_DECREF(sw); return -1; }
    Py_DECREF(sw);
    PyObject *costs = get_attr(vd, "costs");
    if (costs == NULL) return -1;
    int r = get_d(costs, "page_copy_us", &c->page_copy_us);
    Py_DECREF(costs);
    if (r < 0) return -1;
    if ((c->lru = get_attr(vd, "_lru")) == NULL
        || (c->inflight_done = get_attr(vd, "_inflight_done_us")) == NULL
        || (c->inflight_frames = get_attr(vd, "_inflight_frames")) == NULL) return -1;
    if (!PyList_CheckExact(c->lru) || !PyList_CheckExact(c->inflight_done) || !PyList_CheckExact(c->inflight_frames)) {
        PyErr_SetString(PyExc_TypeError, "serve_reads: the disk's LRU heap and in-flight books must be lists");
        return -1;
    }
    c->inflight_len = PyList_GET_SIZE(c->inflight_done);
    for (int i = V_STATE; i <= P_COUNTS; i++) {
        long long want = ARRAYS[i].len == LEN_BLOCKS ? c->n_blocks : ARRAYS[i].len == LEN_CLUSTERS ? c->n_clusters
                         : ARRAYS[i].len == LEN_FRAMES ? c->n_frames : ARRAYS[i].len == LEN_KINDS ? KIND_CACHE + 1 : 0;
        if (get_array(ARRAYS[i].pool ? pool : vd, ARRAYS[i].name, &c->b[i], ARRAYS[i].itemsize, want) < 0) return -1;
        if (i == P_KIND) c->n_frames = c->b[P_KIND].view.len;
    }
    if (get_ll(pool, "_n_granted", &c->n_granted) < 0) return -1;
    c->n_kinds = c->b[P_COUNTS].view.len / 8;
    if (c->grant != Py_None) {
        if (get_ll(c->grant, "n", &c->g_n) < 0 || get_ll(c->grant, "taken", &c->g_taken) < 0
            || get_array(c->grant, "stack", &c->b[G_STACK], 8, 0) < 0) return -1;
        c->g_cap = c->b[G_STACK].view.len / 8;
    } else {
        c->g_n = -1;   /* grant_left: no grant */
    }
    if (c->lane != Py_None) {
        if ((c->chans = get_attr(c->lane, "free_at_us")) == NULL) return -1;
        if (!PyList_CheckExact(c->chans) || PyList_GET_SIZE(c->chans) < 1) {
            PyErr_SetString(PyExc_TypeError, "serve_reads: a lane's channels must be a non-empty list");
            return -1;
        }
        PyObject *seeks = get_attr(c->device, "_seeks");
        if (seeks == NULL) return -1;
        c->dev_seeks = PyObject_IsTrue(seeks);
        Py_DECREF(seeks);
        if (c->dev_seeks < 0
            || get_ll(c->lane, "next_offset", &c->l_next_offset) < 0 || get_ll(c->lane, "seeks", &c->l_seeks) < 0
            || get_ll(c->lane, "requests", &c->l_requests) < 0 || get_ll(c->lane, "pages", &c->l_pages) < 0
            || get_d(c->lane, "demand_us", &c->l_demand_us) < 0 || get_d(c->lane, "busy_us", &c->l_busy_us) < 0
            || get_d(c->lane, "speed", &c->l_speed) < 0
            || get_ll(c->device, "requests", &c->d_requests) < 0 || get_ll(c->device, "pages", &c->d_pages) < 0
            || get_ll(c->device, "read_pages", &c->d_read_pages) < 0) return -1;
    }
    return 0;
}

/* What the call changed, back into the Python objects. */
static int ctx_store(Ctx *c, int any_read) {
    if (c->faults) {
        if (add_ll(c->hc, "ept_fault_calls", c->e_calls) < 0 || add_ll(c->gc, "ept_fault_calls", c->e_calls) < 0
            || add_ll(c->hc, "ept_fault_later_pages", c->e_later) < 0 || add_ll(c->hc, "ept_faults_cut", c->e_cut) < 0
            || add_ll(c->hc, "ept_faults", c->e_faults) < 0 || add_ll(c->gc, "ept_faults", c->e_faults) < 0)
            return -1;
        if (!c->pooled && c->granted
            && (set_ll(c->pool, "_n_granted", c->n_granted) < 0 || set_ll(c->grant, "n", c->g_n) < 0
                || set_ll(c->grant, "taken", c->g_taken) < 0)) return -1;
    }
    if (!any_read) return 0;
    PyObject *vd = c->vd;
    if (set_ll(vd, "cached_pages", c->cached_pages) < 0 || set_ll(vd, "fill_pages_tick", c->fill_pages_tick) < 0)
        return -1;
    PyObject *cnt = get_attr(vd, "counters");
    if (cnt == NULL) return -1;
    int r = (add_ll(cnt, "read_requests", c->c_read_requests) < 0 || add_ll(cnt, "read_pages", c->c_read_pages) < 0
             || add_ll(cnt, "swap_area_read_pages", c->c_swap_read) < 0 || add_ll(cnt, "cache_hit_pages", c->c_hit) < 0
             || add_ll(cnt, "cache_miss_pages", c->c_miss) < 0 || add_ll(cnt, "cluster_loads", c->c_loads) < 0
             || add_ll(cnt, "cluster_load_pages", c->c_load_pages) < 0
             || add_ll(cnt, "device_read_pages", c->c_device_read) < 0
             || add_ll(cnt, "dropped_clean_pages", c->c_dropped) < 0) ? -1 : 0;
    Py_DECREF(cnt);
    if (r < 0 || !c->pooled) return r;
    if (set_ll(c->pool, "_n_granted", c->n_granted) < 0 || set_ll(c->grant, "n", c->g_n) < 0
        || set_ll(c->grant, "taken", c->g_taken) < 0
        || set_ll(c->lane, "next_offset", c->l_next_offset) < 0 || set_ll(c->lane, "seeks", c->l_seeks) < 0
        || set_ll(c->lane, "requests", c->l_requests) < 0 || set_ll(c->lane, "pages", c->l_pages) < 0
        || set_d(c->lane, "demand_us", c->l_demand_us) < 0 || set_d(c->lane, "busy_us", c->l_busy_us) < 0
        || set_ll(c->device, "requests", c->d_requests) < 0 || set_ll(c->device, "pages", c->d_pages) < 0
        || set_ll(c->device, "read_pages", c->d_read_pages) < 0) return -1;
    return 0;
}

/* --- the LRU heap of (stamp, cluster) tuples ----------------------------------------------------------- */

static int entry_of(PyObject *e, double *stamp, long long *cluster) {
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 2) {
        PyErr_SetString(PyExc_TypeError, "serve_reads: an LRU entry is not a (stamp, cluster) pair");
        return -1;
    }
    *stamp = PyFloat_AsDouble(PyTuple_GET_ITEM(e, 0));
    if (*stamp == -1.0 && PyErr_Occurred()) return -1;
    *cluster = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
    if (*cluster == -1 && PyErr_Occurred()) return -1;
    return 0;
}

static int cmp_entry(const void *a, const void *b) {
    const double *x = a, *y = b;    /* (stamp, cluster as double) pairs */
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return (x[1] > y[1]) - (x[1] < y[1]);
}

/* VirtualDisk._lru_rebuild: one live entry per cached cluster, sorted by (stamp, cluster) (a sorted list is a
 * heap); the disk's _lru becomes the new list. */
static int lru_rebuild(Ctx *c) {
    const int64_t *cached = I64(c, V_CACHED);
    const double *stamps = F64(c, V_STAMP);
    Py_ssize_t m = 0;
    for (long long i = 0; i < c->n_clusters; i++) m += cached[i] != 0;
    double *pairs = malloc(sizeof(double) * 2 * (m ? m : 1));
    if (pairs == NULL) { PyErr_NoMemory(); return -1; }
    Py_ssize_t j = 0;
    for (long long i = 0; i < c->n_clusters; i++)
        if (cached[i]) { pairs[2 * j] = stamps[i]; pairs[2 * j + 1] = (double)i; j++; }
    qsort(pairs, m, 2 * sizeof(double), cmp_entry);
    PyObject *lst = PyList_New(m);
    if (lst == NULL) { free(pairs); return -1; }
    for (Py_ssize_t i = 0; i < m; i++) {
        PyObject *e = Py_BuildValue("(dL)", pairs[2 * i], (long long)pairs[2 * i + 1]);
        if (e == NULL) { free(pairs); Py_DECREF(lst); return -1; }
        PyList_SET_ITEM(lst, i, e);
    }
    free(pairs);
    if (set_attr(c->vd, "_lru", lst) < 0) { Py_DECREF(lst); return -1; }
    Py_SETREF(c->lru, lst);
    return 0;
}

/* VirtualDisk._lru_push: push, then rebuild when stale entries outnumber the live ones (``cached_pages`` as the
 * caller has it at that point). */
static int lru_push(Ctx *c, double stamp, long long cluster) {
    PyObject *e = Py_BuildValue("(dL)", stamp, cluster);
    if (e == NULL) return -1;
    PyObject *r = PyObject_CallFunctionObjArgs(heappush, c->lru, e, NULL);
    Py_DECREF(e);
    if (r == NULL) return -1;
    Py_DECREF(r);
    if (PyList_GET_SIZE(c->lru) > 2 * c->cached_pages + 256) return lru_rebuild(c);
    return 0;
}

static int push_entry(Ctx *c, PyObject *e) {
    PyObject *r = PyObject_CallFunctionObjArgs(heappush, c->lru, e, NULL);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* --- the frame pool ---------------------------------------------------------------------------------------- */

/* A full grant stack grows as _Grant.push grows it (its own reserve, with ``n`` as the call has it). */
static int grow_stack(Ctx *c) {
    PyBuffer_Release(&c->b[G_STACK].view);
    c->b[G_STACK].held = 0;
    if (set_ll(c->grant, "n", c->g_n) < 0) return -1;
    PyObject *r = PyObject_CallMethod(c->grant, "reserve", "L", c->cp);
    if (r == NULL) return -1;
    Py_DECREF(r);
    if (get_array(c->grant, "stack", &c->b[G_STACK], 8, c->g_n + 1) < 0) return -1;
    c->g_cap = c->b[G_STACK].view.len / 8;
    return 0;
}

/* FramePool.free_ones of one of this disk's cache frames onto the guest's grant. */
static int release_frame(Ctx *c, int64_t f) {
    uint8_t *kind = U8(c, P_KIND);
    if (f < 0 || f >= c->n_frames || kind[f] == KIND_FREE || kind[f] >= c->n_kinds || I32(c, P_OWNER)[f] != c->gid) {
        PyErr_Format(PyExc_RuntimeError, "serve_reads: frame %lld of guest %lld's disk cache is not its own",
                     (long long)f, c->gid);
        return -1;
    }
    if (c->g_n >= c->g_cap && grow_stack(c) < 0) return -1;
    int64_t *counts = I64(c, P_COUNTS);
    counts[kind[f]] -= 1;
    counts[KIND_FREE] += 1;
    kind[f] = KIND_FREE;
    I32(c, P_OWNER)[f] = NO_OWNER;
    I64(c, P_INDEX)[f] = NO_OWNER;
    U64(c, P_TOKEN)[f] = 0;
    U8(c, P_ACCESSED)[f] = U8(c, P_DIRTY)[f] = U8(c, P_PINNED)[f] = U8(c, P_BUSY)[f] = 0;
    I64(c, G_STACK)[c->g_n++] = f;
    c->n_granted += 1;
    c->pooled = 1;
    return 0;
}

/* A growable list of integers (the clusters one drop meets, passes over and takes). */
typedef struct {
    long long *v;
    Py_ssize_t n, cap;
} Vec;

static int vec_push(Vec *a, long long x) {
    if (a->n == a->cap) {
        Py_ssize_t cap = a->cap ? 2 * a->cap : 16;
        long long *grown = realloc(a->v, sizeof(long long) * cap);
        if (grown == NULL) { PyErr_NoMemory(); return -1; }
        a->v = grown;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

/* VirtualDisk.drop_clean(want, keep=keep): returns the pages freed, or -2 when the clean clusters would fall
 * short (nothing changed: the heap holds the same entries), -1 on error. */
static long long drop_clean(Ctx *c, long long want, long long keep) {
    const int64_t *cdirty = I64(c, V_CDIRTY);
    const uint8_t *cpinned = U8(c, V_CPINNED);
    int64_t *cached = I64(c, V_CACHED);
    const double *stamps = F64(c, V_STAMP);
    if (c->seen == NULL && (c->seen = calloc(c->n_clusters ? c->n_clusters : 1, 1)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *popped = PyList_New(0);
    if (popped == NULL) return -1;
    Vec seen = {0}, passed = {0}, victims = {0};   /* clusters met; popped entries passed over; clusters taken */
    long long got = 0, result = -1;
    while (got < want && PyList_GET_SIZE(c->lru) > 0) {
        PyObject *e = PyObject_CallFunctionObjArgs(heappop, c->lru, NULL);
        if (e == NULL) goto out;
        int r = PyList_Append(popped, e);
        Py_DECREF(e);
        if (r < 0) goto out;
        double s;
        long long cl;
        if (entry_of(e, &s, &cl) < 0) goto out;
        if (cl < 0 || cl >= c->n_clusters) {
            PyErr_Format(PyExc_RuntimeError, "serve_reads: LRU entry of cluster %lld outside the disk", cl);
            goto out;
        }
        if (c->seen[cl] || !cached[cl] || stamps[cl] != s) continue;   /* stale, or a second entry */
        c->seen[cl] = 1;
        if (vec_push(&seen, cl) < 0) goto out;
        if (cdirty[cl] || cpinned[cl] || cl == keep) {
            if (vec_push(&passed, PyList_GET_SIZE(popped) - 1) < 0) goto out;
            continue;
        }
        if (vec_push(&victims, cl) < 0) goto out;
        got += cached[cl];
    }
    if (got < want) {
        /* short: Python takes this step (its write-back path); the heap gets every entry back */
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(popped); i++)
            if (push_entry(c, PyList_GET_ITEM(popped, i)) < 0) goto out;
        result = -2;
        goto out;
    }
    for (Py_ssize_t i = 0; i < passed.n; i++)
        if (push_entry(c, PyList_GET_ITEM(popped, passed.v[i])) < 0) goto out;
    /* _drop_few / _drop_clusters: each victim's cached blocks, ascending, their frames freed in that order */
    uint8_t *state = U8(c, V_STATE);
    int64_t *loc = I64(c, V_LOC);
    long long freed = 0;
    for (Py_ssize_t i = 0; i < victims.n; i++) {
        long long b0 = victims.v[i] * c->cp, b1 = b0 + c->cp < c->n_blocks ? b0 + c->cp : c->n_blocks;
        for (long long blk = b0; blk < b1; blk++) {
            if (state[blk] != FRAME) continue;
            if (release_frame(c, loc[blk]) < 0) goto out;
            state[blk] = NOT_CACHED;
            loc[blk] = NO_LOC;
            freed++;
        }
        cached[victims.v[i]] = 0;
    }
    c->cached_pages -= freed;
    c->c_dropped += freed;
    result = freed;
out:
    for (Py_ssize_t i = 0; i < seen.n; i++) c->seen[seen.v[i]] = 0;
    free(seen.v);
    free(passed.v);
    free(victims.v);
    Py_DECREF(popped);
    return result;
}

/* --- one read ---------------------------------------------------------------------------------------------- */

/* A read of ``blk`` at ``vt``: 0 served (*token, *done), 1 the chain stops, 2 Python serves it, 3 WAITED,
 * -1 error. */
static int read_one(Ctx *c, long long blk, double vt, uint64_t *token, double *done_out) {
    if (blk < 0 || blk >= c->n_blocks) return 1;
    if (c->inflight_len >= c->max_inflight) return 2;      /* _admit: Python */
    uint8_t *state = U8(c, V_STATE);
    int64_t *loc = I64(c, V_LOC), *cached = I64(c, V_CACHED);
    double *stamps = F64(c, V_STAMP);
    long long cl = blk / c->cp;
    int swap = c->swap_lo <= blk && blk < c->swap_hi;
    if (state[blk] != NOT_CACHED) {
        /* a hit: no room needed, nothing dropped (fit_one), then read_one_frame's hit and _touch_cluster */
        c->c_read_requests++;
        c->c_read_pages++;
        c->c_swap_read += swap;
        double done = vt + c->page_copy_us;
        c->c_hit++;
        int64_t f = loc[blk];
        if (f < 0 || f >= c->n_frames) {
            PyErr_Format(PyExc_RuntimeError, "serve_reads: block %lld of guest %lld's disk is cached in frame %lld, "
                         "outside the pool", blk, c->gid, (long long)f);
            return -1;
        }
        if (stamps[cl] != vt) {
            stamps[cl] = vt;
            if (cached[cl] && lru_push(c, vt, cl) < 0) return -1;
        }
        *token = U64(c, P_TOKEN)[f];
        *done_out = done;
        return 0;
    }
    if (cached[cl] != 0 || c->lane == Py_None) return 2;    /* a partly cached cluster: Python */
    long long b0 = cl * c->cp;
    long long need = (b0 + c->cp < c->n_blocks ? b0 + c->cp : c->n_blocks) - b0;
    if (c->g_n < need) return 1;                           /* it might wait for room: not in a chain */
    long long over = c->cached_pages + need - c->allowance;
    if (over > 0) {
        if (c->cached_pages == 0) return 2;
        long long want = over + (c->cp > c->allowance / 16 ? c->cp : c->allowance / 16);
        long long freed = drop_clean(c, want, cl);
        if (freed == -1) return -1;
        if (freed == -2) return 2;
    }
    if (c->g_n < need) return 3;
    /* read_one_frame: a miss of a fresh cluster (stamped now), _load_cluster_of, _cache_in_run */
    double start = vt;
    c->c_read_requests++;
    c->c_read_pages++;
    c->c_swap_read += swap;
    stamps[cl] = vt;
    if (need > c->g_cap || c->g_n > c->g_cap) {
        PyErr_SetString(PyExc_RuntimeError, "serve_reads: the grant's books exceed its stack");
        return -1;
    }
    const int64_t *stack = I64(c, G_STACK);
    uint8_t *kind = U8(c, P_KIND), *ppinned = U8(c, P_PINNED);
    const uint8_t *src_pinned = U8(c, V_PINNED);
    const uint64_t *src_token = U64(c, V_TOKENS);
    for (long long i = 0; i < need; i++) {
        int64_t f = stack[c->g_n - 1 - i];
        if (f < 0 || f >= c->n_frames) {
            PyErr_Format(PyExc_RuntimeError, "serve_reads: frame %lld on the grant is outside the pool", (long long)f);
            return -1;
        }
    }
    for (long long i = 0; i < need; i++) {
        int64_t f = stack[c->g_n - 1 - i];
        long long e = b0 + i;
        kind[f] = KIND_CACHE;
        I32(c, P_OWNER)[f] = (int32_t)c->gid;
        I64(c, P_INDEX)[f] = e;
        U64(c, P_TOKEN)[f] = src_token[e];
        ppinned[f] = src_pinned[e];
        loc[e] = f;
        state[e] = FRAME;
    }
    c->g_n -= need;         /* _took */
    c->g_taken += need;
    c->n_granted -= need;
    I64(c, P_COUNTS)[KIND_FREE] -= need;
    I64(c, P_COUNTS)[KIND_CACHE] += need;
    c->pooled = 1;
    if (lru_push(c, stamps[cl], cl) < 0) return -1;     /* fresh: before it counts as cached, as Python does */
    cached[cl] += need;
    c->cached_pages += need;
    /* Device.submit of one read of ``need`` pages at block ``b0`` */
    long long offset = c->offset_base + b0;
    int sequential = offset == c->l_next_offset;
    double full = need == c->cp ? (sequential ? c->svc_seq : c->svc_seek)
                                : (sequential ? c->svc_last_seq : c->svc_last_seek);
    if (need != c->cp && need != c->last_cluster_blocks) {
        PyErr_SetString(PyExc_RuntimeError, "serve_reads: a cluster of an unexpected size");
        return -1;
    }
    if (!sequential && c->dev_seeks) c->l_seeks++;
    c->l_next_offset = offset >= 0 ? offset + need : -1;
    double s = start;
    double ch0 = PyFloat_AsDouble(PyList_GET_ITEM(c->chans, 0));
    if (ch0 == -1.0 && PyErr_Occurred()) return -1;
    if (ch0 > s) s = ch0;
    double done = s + full / c->l_speed;
    PyObject *d = PyFloat_FromDouble(done);
    if (d == NULL) return -1;
    PyObject *r = PyObject_CallFunctionObjArgs(heapreplace, c->chans, d, NULL);
    Py_DECREF(d);
    if (r == NULL) return -1;
    Py_DECREF(r);
    c->l_demand_us += full;
    c->l_requests++;
    c->l_pages += need;
    c->l_busy_us += full;
    c->d_requests++;
    c->d_pages += need;
    c->d_read_pages += need;
    if (!(done > start)) done = start;
    c->c_loads++;
    c->c_load_pages += need;
    c->c_device_read += need;
    c->fill_pages_tick += need;
    done += c->page_copy_us;
    PyObject *dd = PyFloat_FromDouble(done);
    if (dd == NULL) return -1;
    int ra = PyList_Append(c->inflight_done, dd);
    Py_DECREF(dd);
    if (ra < 0 || PyList_Append(c->inflight_frames, c->no_frames) < 0) return -1;
    c->inflight_len++;
    c->c_miss++;
    *token = U64(c, P_TOKEN)[loc[blk]];
    *done_out = done;
    return 0;
}

static int prog_at(PyObject *prog, Py_ssize_t i, double *out) {
    *out = PyFloat_AsDouble(PyList_GET_ITEM(prog, i));
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int append_d(PyObject *lst, double v) {
    PyObject *o = PyFloat_FromDouble(v);
    if (o == NULL) return -1;
    int r = PyList_Append(lst, o);
    Py_DECREF(o);
    return r;
}

/* --- an EPT fault of first touches ------------------------------------------------------------------------ */

/* The ept tuple: (p2m, host counters, guest counters, ept_fault_us, fault gate (NaN: none), guest frame kind,
 * p2m FRAME state, LATER_TOKEN), and the p2m's arrays. */
static int ept_load(Ctx *c) {
    if (c->ept_loaded) return 0;
    PyObject *p2m;
    if (!PyArg_ParseTuple(c->ept, "OOOddiiK", &p2m, &c->hc, &c->gc, &c->each_us, &c->fault_gate, &c->guest_kind,
                          &c->frame_state, &c->later_token)) return -1;
    if (c->guest_kind <= KIND_FREE || c->guest_kind >= c->n_kinds) {
        PyErr_SetString(PyExc_ValueError, "serve_reads: the guest frame kind is outside the pool's kinds");
        return -1;
    }
    if (get_array(p2m, "state", &c->b[E_STATE], 1, 0) < 0 || get_array(p2m, "loc", &c->b[E_LOC], 8, 0) < 0
        || get_array(p2m, "pinned", &c->b[E_PINNED], 1, 0) < 0) return -1;
    c->guest_pages = c->b[E_STATE].view.len;
    if (c->b[E_LOC].view.len / 8 != c->guest_pages || c->b[E_PINNED].view.len != c->guest_pages) {
        PyErr_SetString(PyExc_ValueError, "serve_reads: the p2m's arrays differ in length");
        return -1;
    }
    c->ept_loaded = 1;
    return 0;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The EPT_PAGE run from *k and its EPT, as run_chain's fault step and HostMemory._ept_fault_first serve a
 * fault of several pages none of which has content yet, with the room there in the guest's grant: the same
 * frames (taken off the grant's top in gpfn order), p2m entries, counters, tokens and times. Returns 0
 * served (*k at the EPT, *vt past it), 1 STOP (before the fault, or after one the gate cut short: *k past
 * it), 2 NEED_PYTHON (at *k: one page, a page with content, no grant or too small a one), -1 an error. */
static int ept_step(Ctx *c, PyObject *prog, Py_ssize_t n, Py_ssize_t *k, double *vt, double gate, PyObject *toks,
                    PyObject *times) {
    Py_ssize_t j = *k;
    long long m = 0;
    double op = 0.0, x;
    while (j + 1 < n) {
        if (prog_at(prog, j, &op) < 0) return -1;
        if (op != OP_EPT_PAGE) break;
        m++;
        j += 2;
    }
    if (j + 1 >= n || op != OP_EPT) return 2;           /* (a program check_program would refuse) */
    if (prog_at(prog, j + 1, &x) < 0) return -1;
    if (x != (double)m || m < 2) return 2;             /* one page: the general path */
    if (*vt >= gate) return 1;
    if (c->can_fault < 0) {      /* asked at the first fault, as run_chain's fault step asks (nothing in a call changes it) */
        PyObject *r = PyObject_CallNoArgs(c->can_fault_fn);
        if (r == NULL) return -1;
        c->can_fault = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (c->can_fault < 0) return -1;
    }
    if (!c->can_fault) return 1;
    if (ept_load(c) < 0) return -1;
    if (c->pages_cap < 2 * m) {
        int64_t *grown = realloc(c->pages, sizeof(int64_t) * 2 * m);
        if (grown == NULL) { PyErr_NoMemory(); return -1; }
        c->pages = grown;
        c->pages_cap = 2 * m;
    }
    int64_t *pg = c->pages, *todo = c->pages + m;
    for (long long i = 0; i < m; i++) {
        if (prog_at(prog, *k + 2 * i + 1, &x) < 0) return -1;
        if (!(x >= -9.0e15 && x <= 9.0e15) || x != (double)(long long)x) return 2;
        pg[i] = (long long)x;
        if (pg[i] < 0 || pg[i] >= c->guest_pages) return 1;    /* outside the guest: the chain stops */
    }
    memcpy(todo, pg, sizeof(int64_t) * m);
    qsort(todo, m, sizeof(int64_t), cmp_i64);
    for (long long i = 1; i < m; i++)
        if (todo[i] == todo[i - 1]) return 1;                   /* a page twice: the chain stops */
    uint8_t *p2m_state = U8(c, E_STATE);
    for (long long i = 0; i < m; i++)
        if (p2m_state[pg[i]] != 0) return 2;                    /* not UNBACKED: the general path */
    double start = *vt, done;
    long long served;
    int gated = start < c->fault_gate;                          /* (NaN: no gate) */
    if (!gated) {
        served = m;
        done = start + c->each_us * (double)m;
    } else {
        double cum = 0.0;
        served = 0;
        while (served < m && (served == 0 || start + cum < c->fault_gate)) {
            cum += c->each_us;
            served++;
        }
        done = start + cum;
    }
    if (c->grant == Py_None || c->g_n < served) return 2;      /* room it might wait for: Python's */
    /* FramePool.alloc_pages: frames off the grant's top for the first ``served`` pages in gpfn order */
    memcpy(todo, pg, sizeof(int64_t) * served);
    qsort(todo, served, sizeof(int64_t), cmp_i64);
    int64_t *stack = I64(c, G_STACK);
    for (long long i = 0; i < served; i++) {
        int64_t f = stack[c->g_n - 1 - i];
        if (f < 0 || f >= c->n_frames || U8(c, P_KIND)[f] != KIND_FREE) {
            PyErr_Format(PyExc_RuntimeError, "serve_reads: frame %lld on guest %lld's grant is not a free frame "
                         "of the pool", (long long)f, c->gid);
            return -1;
        }
    }
    int64_t *p2m_loc = I64(c, E_LOC);
    uint8_t *p2m_pinned = U8(c, E_PINNED);
    for (long long i = 0; i < served; i++) {
        int64_t f = stack[c->g_n - 1 - i], g = todo[i];
        U8(c, P_KIND)[f] = (uint8_t)c->guest_kind;
        I32(c, P_OWNER)[f] = (int32_t)c->gid;
        I64(c, P_INDEX)[f] = g;
        U64(c, P_TOKEN)[f] = 0;
        U8(c, P_ACCESSED)[f] = 1;
        U8(c, P_PINNED)[f] = p2m_pinned[g];
        p2m_state[g] = (uint8_t)c->frame_state;
        p2m_loc[g] = f;
    }
    c->g_n -= served;       /* _took */
    c->g_taken += served;
    c->n_granted -= served;
    I64(c, P_COUNTS)[KIND_FREE] -= served;
    I64(c, P_COUNTS)[c->guest_kind] += served;
    c->granted = 1;
    c->e_calls++;
    c->e_faults += served;
    if (gated) {
        c->e_later += m - served;
        c->e_cut += served < m;
    }
    c->faults++;
    for (long long i = 0; i < m; i++) {
        PyObject *t = PyLong_FromUnsignedLongLong(i < served ? 0 : c->later_token);
        if (t == NULL) return -1;
        int ra = PyList_Append(toks, t);
        Py_DECREF(t);
        if (ra < 0) return -1;
    }
    if (append_d(times, start) < 0 || append_d(times, done) < 0) return -1;
    if (served < m) {       /* pages left unbacked: the core goes another way from here */
        *k = j + 2;
        return 1;
    }
    if (done > *vt) *vt = done;
    *k = j;
    return 0;
}

static PyObject *mod_serve_reads(PyObject *self, PyObject *args) {
    Ctx c;
    memset(&c, 0, sizeof c);
    PyObject *prog, *toks, *times;
    Py_ssize_t k;
    double vt, gate;
    long long reads, limit;
    c.ept = Py_None;
    c.can_fault_fn = Py_None;
    c.can_fault = -1;
    if (!PyArg_ParseTuple(args, "OOOOO(dddd)OO!ndLLdO!O!|OO", &c.vd, &c.pool, &c.grant, &c.lane, &c.device,
                          &c.svc_seq, &c.svc_seek, &c.svc_last_seq, &c.svc_last_seek, &c.no_frames,
                          &PyList_Type, &prog, &k, &vt, &reads, &limit, &gate, &PyList_Type, &toks,
                          &PyList_Type, &times, &c.ept, &c.can_fault_fn)) return NULL;
    if (c.ept != Py_None && (!PyTuple_Check(c.ept) || !PyCallable_Check(c.can_fault_fn))) {
        PyErr_SetString(PyExc_TypeError, "serve_reads: ept must be a tuple (with can_fault a callable) or None");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(prog);
    int status = NEED_PYTHON, any_read = 0;
    PyObject *result = NULL;
    if (n < 2 || k < 2 || (k & 1)) {
        PyErr_SetString(PyExc_ValueError, "serve_reads: a program is [deadline, mem_ref_us] then (op, value) pairs");
        return NULL;
    }
    if (ctx_load(&c) < 0) goto done;
    double deadline, ref_us;
    if (prog_at(prog, 0, &deadline) < 0 || prog_at(prog, 1, &ref_us) < 0) goto done;
    for (; k + 1 < n; k += 2) {
        double op, x;
        if (prog_at(prog, k, &op) < 0 || prog_at(prog, k + 1, &x) < 0) goto done;
        if (op == OP_WIN) {
            if (vt + (x - 1.0) * ref_us >= deadline) { status = STOP; break; }
            vt += x * ref_us;
        } else if (op == OP_CHECK) {
            if (vt >= deadline) { status = STOP; break; }
        } else if (op == OP_ADD) {
            vt += x;
        } else if (op == OP_READ) {
            if (!(x >= 0.0 && x < 9.0e18)) break;             /* Python's int() of it: its own step */
            long long blk = (long long)x;
            if (reads >= limit || vt >= gate || (double)blk != x) { status = STOP; break; }
            uint64_t token;
            double done;
            int r = read_one(&c, blk, vt, &token, &done);
            if (r < 0) goto done;
            any_read = 1;   /* (a step handed back may still have dropped nothing: the books stay right) */
            if (r == 1) { status = STOP; break; }
            if (r == 2) break;
            if (r == 3) { status = WAITED; break; }
            reads++;
            PyObject *t = PyLong_FromUnsignedLongLong(token);
            if (t == NULL) goto done;
            int ra = PyList_Append(toks, t);
            Py_DECREF(t);
            if (ra < 0 || append_d(times, vt) < 0 || append_d(times, done) < 0) goto done;
            if (done > vt) vt = done;
        } else if (op == OP_EPT_PAGE && c.ept != Py_None) {
            int r = ept_step(&c, prog, n, &k, &vt, gate, toks, times);
            if (r < 0) goto done;
            if (r == 1) { status = STOP; break; }
            if (r == 2) break;
        } else {
            break;                                             /* an EPT step Python serves */
        }
    }
    if (ctx_store(&c, any_read) < 0) goto done;
    result = Py_BuildValue("(ndLiL)", k, vt, reads, status, c.faults);
done:
    ctx_release(&c);
    return result;
}

/* --- a program's check ------------------------------------------------------------------------------------ */

/* check_program(chain: bytes, max_pairs) -> list of floats, or None.
 *
 * hostd/readchain.py's check_program, for the programs it accepts: the same list np.frombuffer(chain,
 * "<f8").tolist() gives. None for anything it might refuse or that lies near a float's edge (a sum of
 * values close to overflowing); the Python check then decides, and words the refusal. */
static PyObject *mod_check_program(PyObject *self, PyObject *args) {
    Py_buffer v;
    Py_ssize_t max_pairs;
    if (!PyArg_ParseTuple(args, "y*n", &v, &max_pairs)) return NULL;
    PyObject *out = NULL;
    const unsigned char *raw = (const unsigned char *)v.buf;
    Py_ssize_t len = v.len, n = len / 8;
    int ok = !(len % 16) && len >= 32 && len <= 16 * (max_pairs + 1);
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    ok = 0;   /* "<f8" read as a double needs a little-endian machine; elsewhere Python decides */
#endif
    double first, ref_us, sum = 0.0;
    long long pages = 0;
    if (ok) {
        memcpy(&first, raw, 8);
        memcpy(&ref_us, raw + 8, 8);
        /* (a NaN deadline is refused; an infinite one is a chain without a deadline) */
        ok = first == first && ref_us >= 0.0 && ref_us < 1e300;
    }
    for (Py_ssize_t i = 2; ok && i + 1 < n; i += 2) {
        double op, x;
        memcpy(&op, raw + 8 * i, 8);
        memcpy(&x, raw + 8 * (i + 1), 8);
        if (!(op == OP_WIN || op == OP_CHECK || op == OP_ADD || op == OP_READ || op == OP_EPT || op == OP_EPT_PAGE)
            || !(x >= 0.0 && x < 1e300)) { ok = 0; break; }
        sum += x;
        if (op == OP_EPT_PAGE) {
            if (!(x < 9.0e15) || x != (double)(long long)x) { ok = 0; break; }
            pages++;
        } else if (op == OP_EPT) {
            if (x != (double)pages || !pages) { ok = 0; break; }
            pages = 0;
        } else if (pages) {
            ok = 0;
        }
    }
    if (ok && (pages || !(sum + ref_us < 1e300))) ok = 0;
    if (!ok) {
        PyBuffer_Release(&v);
        Py_RETURN_NONE;
    }
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        double d;
        memcpy(&d, raw + 8 * i, 8);
        PyObject *f = PyFloat_FromDouble(d);
        if (f == NULL) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, i, f);
    }
    PyBuffer_Release(&v);
    return out;
}

static PyMethodDef chain_functions[] = {
    {"check_program", mod_check_program, METH_VARARGS,
     "check_program(chain, max_pairs) -> list of floats, or None: a program hostd.readchain.check_program "
     "accepts, as its list (None: let the Python check decide)"},
    {"serve_reads", mod_serve_reads, METH_VARARGS,
     "serve_reads(vd, pool, grant, lane, device, svc, no_frames, prog, k, vt, reads, limit, gate, toks, times"
     "[, ept, can_fault]) -> (k, vt, reads, status, faults): a read chain's clock steps, one-block reads and "
     "(with ept) EPT faults of first touches from step k, compiled; can_fault() is asked at the first fault"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef chain_module = {
    PyModuleDef_HEAD_INIT, "_chain", "A read chain's usual steps, compiled (hostd/readchain.py).", -1,
    chain_functions,
};

PyMODINIT_FUNC PyInit__chain(void) {
    PyObject *hq = PyImport_ImportModule("_heapq");
    if (hq == NULL) return NULL;
    heappush = get_attr(hq, "heappush");
    heappop = get_attr(hq, "heappop");
    heapreplace = get_attr(hq, "heapreplace");
    Py_DECREF(hq);
    if (heappush == NULL || heappop == NULL || heapreplace == NULL) return NULL;
    return PyModule_Create(&chain_module);
}
