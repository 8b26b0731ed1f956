/* The guest kernel's compiled paging core: references, faults, evictions, EPT backing.
 *
 * It runs GuestKernel.access over the numpy arrays the Python side owns
 * (Frames, PageTable, the free set and soft-reclaim list, the counters, the
 * policy's state), with exactly the steps of the reference implementation in
 * guestd/kernel.py (the executable definition; tests/test_paging_engines.py
 * holds the two equal, counter for counter and array for array).
 *
 * One batch is a small state machine (Core.phase). Hits, the policy's scan,
 * the eviction bookkeeping, the page table and the counters never leave C.
 * An operation that needs an await (a disk read or write on a remote block
 * device, an EPT fault on a remote hypervisor, the OOM hook) returns to
 * Python as (op, a, b); Python awaits it and calls the matching resume_*
 * method, which continues where the batch stopped. With the in-process disk
 * (LocalBlockDevice, its DiskModel included) and NullHypervisor the whole
 * batch runs here. Between a return and its resume only the kernel's sync
 * methods may run (invalidate and friends change backed/host_took/inval_gen
 * and the counters): every check after a resume rereads the arrays.
 *
 * Virtual time is accumulated exactly as the reference does it, run of hits
 * by run of hits (vt += k * mem_ref_us over the same windows), so clocks are
 * bit-identical too.
 *
 * Page sharing: a frame the host shares with other guests is write-protected
 * (wp). A write to it leaves the hit loop (one byte tested, and only on a
 * write) and returns OP_COW: Python sends the EPT fault that is the host's
 * copy-on-write break, and resume_cow goes on as after any backing. A frame
 * about to be filled (a fault's target) that is still write-protected, or a
 * soft-reclaimed page taken back by a write, is broken the same way first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ layouts shared with Python */

/* guestd.stats.PagingCounters, in field order (checked when a Core is built) */
enum {
    C_REFS, C_HITS, C_MAJOR, C_MINOR, C_SWAP_IN, C_SWAP_OUT, C_FILE_READS, C_FILE_WRITES, C_WRITEBACKS,
    C_EVICTIONS, C_EPT_FAULTS, C_EPT_FAULT_CALLS, C_INVALIDATIONS, C_LOST, C_SOFT_RECLAIMED,
    C_BALLOON_INFLATED, C_BALLOON_DEFLATED, C_OOM_CALLS, C_REFAULTS, C_REFAULT_READS, C_REFAULT_FILE_READS,
    C_EVICTED_CLEAN_FILE, C_BALLOON_RECLAIMED, C_BALLOON_RECLAIMED_CLEAN_FILE, C_HOST_TOOK,
    C_HOST_TOOK_CLEAN_FILE, C_HOST_REFAULTS, C_HOST_REFAULTS_CLEAN_FILE, C_DOUBLE_PAGING, C_EPT_FRESH, C_FLUSHER_WRITES, C_FLUSHER_CLEANED, N_COUNTERS
};
static const char *COUNTER_NAMES[N_COUNTERS] = {
    "refs", "hits", "major_faults", "minor_faults", "swap_in", "swap_out", "file_reads", "file_writes",
    "writebacks", "evictions", "ept_faults", "ept_fault_calls", "invalidations", "lost_pages", "soft_reclaimed",
    "balloon_inflated", "balloon_deflated", "oom_calls", "refaults", "refault_reads", "refault_file_reads",
    "evicted_clean_file", "balloon_reclaimed", "balloon_reclaimed_clean_file", "host_took_pages",
    "host_took_clean_file", "host_refaults", "host_refaults_clean_file", "double_paging_pages", "ept_fresh_pages",
    "flusher_writes", "flusher_cleaned"};

/* the kernel's scalar state (GuestKernel._ks) */
enum { KS_FREE_LO, KS_N_FREE, KS_SOFT_HEAD, KS_SOFT_TAIL, N_KS };
static const char *KS_NAMES[N_KS] = {"free_lo", "n_free", "soft_head", "soft_tail"};
#define SOFT_OUT (-2)   /* soft_prev/soft_next of a frame not on the soft list */

enum { K_FREE = 0, K_ANON = 1, K_FILE = 2 };               /* guestd.memory.FrameKind */
enum { P_CLOCK = 0, P_ESC = 1, P_FIFO = 2, P_LRU = 3, P_PY = 4 };   /* compiled policies, or Python's */
enum { PS_HAND = 0, PS_DIRTY = 1, PS_SEQ = 0 };            /* policy state slots */

/* what a return to Python asks for */
enum { OP_DONE = 0, OP_EPT = 1, OP_READ = 2, OP_WRITE = 3, OP_NO_VICTIM = 4, OP_SWAP_FULL = 5, OP_BAD_BLOCK = 6,
       OP_COW = 7 };

enum {
    PH_IDLE, PH_RUN, PH_FAULT, PH_SOFT_BACKED, PH_ALLOC, PH_EVICT_BODY, PH_EVICT_WROTE, PH_AFTER_ALLOC,
    PH_READ_DONE, PH_ALLOC_BACKED, PH_FINISH, PH_EB, PH_BACK, PH_BACK_DONE, PH_BACKWIN, PH_COW, PH_COW_DONE
};

#define WIN_MIN 256
#define WIN_MAX 8192
#define LATER_TOKEN 0xFFFFFFFFFFFFFFFEULL   /* proto.tokens.LATER_TOKEN */
#define KEEP_TOKEN 0xFFFFFFFFFFFFFFFFULL    /* proto.tokens.KEEP_TOKEN */
#define PAGE_BYTES 4096

typedef struct {
    PyObject_HEAD
    Py_buffer views[48];
    int n_views;
    /* frames */
    int64_t n_frames;
    uint8_t *kind, *resident, *R, *touched, *A, *M, *D, *backed, *host_took, *wp;
    int64_t *vpage;
    uint64_t *token;
    /* page table */
    int64_t n_pages;
    int64_t *gpfn, *cached, *version, *block;
    uint8_t *is_file, *on_disk, *evicted;
    uint64_t *expect;
    /* kernel */
    uint8_t *free_mask;
    int64_t *ks, *soft_prev, *soft_next, *inval_gen, *ctr, *swap_used;
    double *vt;
    int64_t swap_base, swap_slots, fault_around;
    double mem_ref_us, minor_fault_us, zero_fill_us;
    /* policy */
    int pkind, load_sets_r, py_hits;
    int64_t *pst, *pframes;
    uint64_t *esc_bits;
    PyObject *policy;
    /* local disk (LocalBlockDevice + its DiskModel), local hypervisor (NullHypervisor) */
    int disk_local, hyp_local;
    uint64_t *disk_tokens;
    int64_t n_blocks, qd;
    double *chan_free, *disk_acct;
    int64_t *disk_io;
    double disk_latency_us, disk_bandwidth_bps;
    /* callbacks into the kernel (rare: lost pages, hits of a Python policy that watches them) */
    PyObject *lost_cb, *hits_cb;
    /* scratch */
    uint64_t *ept_gs;
    int64_t *ept_gen, *hit_g;
    uint8_t *hit_w;
    /* the batch */
    PyObject *pages_obj, *writes_obj;
    Py_buffer pages_view, writes_view;
    int have_batch;
    const int64_t *P;
    const uint8_t *W;
    int64_t n, i, started_i;
    int win, has_deadline;
    double deadline;
    int phase;
    /* the fault in progress */
    int64_t f_page, f_g, f_v, f_ref, f_blk;
    uint64_t f_tok, f_wtok;
    int f_write, f_is_file, f_dirty, f_oom_tried;
    /* the backing in progress (ensure-backed loop, or one EPT fault) */
    int64_t eb_g, ept_n;
    int eb_cont, back_cont, cow_cont;
    /* read chains through evictions: one byte per page, zero between walks (lookahead) */
    uint8_t *rc_mark;
} Core;

/* ------------------------------------------------------------------ small helpers */

static inline uint64_t make_token(int64_t page, int64_t version) {
    return ((uint64_t)(page + 1) << 32) | ((uint64_t)version & 0xFFFFFFFFull);
}

static inline uint64_t bump_one(Core *c, int64_t page) {
    int64_t v = c->version[page] + 1;
    c->version[page] = v;
    uint64_t tok = make_token(page, v);
    c->expect[page] = tok;
    return tok;
}

static inline void vt_max(Core *c, double done) {
    if (done > c->vt[0]) c->vt[0] = done;      /* Python's max(vt, done) */
}

/* DiskModel.submit: FCFS over queue_depth channels, the earliest free (first of equals) takes it */
static double disk_submit(Core *c, double vt, int64_t n_pages) {
    double *ch = c->chan_free;
    int64_t best = 0;
    for (int64_t k = 1; k < c->qd; k++)
        if (ch[k] < ch[best]) best = k;
    double start = ch[best] > vt ? ch[best] : vt;
    double service = c->disk_latency_us + (double)(n_pages * PAGE_BYTES) * 1e6 / c->disk_bandwidth_bps;
    double done = start + service;
    ch[best] = done;
    c->disk_acct[0] += 1.0;
    c->disk_acct[1] += (double)n_pages;
    c->disk_acct[2] += service;
    return done;
}

static void soft_remove(Core *c, int64_t g) {
    int64_t p = c->soft_prev[g], n = c->soft_next[g];
    if (p >= 0) c->soft_next[p] = n; else c->ks[KS_SOFT_HEAD] = n;
    if (n >= 0) c->soft_prev[n] = p; else c->ks[KS_SOFT_TAIL] = p;
    c->soft_prev[g] = SOFT_OUT;
    c->soft_next[g] = SOFT_OUT;
}

/* lowest empty free frame, else the oldest soft-reclaimed one (its page dropped); -1 if none, -2 on error */
static int64_t take_free(Core *c) {
    if (c->ks[KS_N_FREE] > 0) {
        int64_t g = c->ks[KS_FREE_LO] < 0 ? 0 : c->ks[KS_FREE_LO];
        while (g < c->n_frames && !c->free_mask[g]) g++;
        if (g >= c->n_frames) {
            PyErr_Format(PyExc_RuntimeError, "paging core: %lld free frames counted, none at or above gpfn %lld",
                         (long long)c->ks[KS_N_FREE], (long long)c->ks[KS_FREE_LO]);
            return -2;
        }
        c->free_mask[g] = 0;
        c->ks[KS_N_FREE]--;
        c->ks[KS_FREE_LO] = g + 1;
        return g;
    }
    int64_t g = c->ks[KS_SOFT_HEAD];
    if (g >= 0) {
        soft_remove(c, g);
        c->cached[c->vpage[g]] = -1;
        c->vpage[g] = -1;
        return g;
    }
    return -1;
}

static int report_lost(Core *c, int64_t page, int64_t g, uint64_t got, uint64_t want, const char *where) {
    c->ctr[C_LOST] += 1;
    PyObject *r = PyObject_CallFunction(c->lost_cb, "LLKKs", (long long)page, (long long)g,
                                        (unsigned long long)got, (unsigned long long)want, where);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* ------------------------------------------------------------------ policies */

static inline void clear_r_circular(Core *c, int64_t h, int64_t v) {
    if (h <= v) {
        memset(c->R + h, 0, (size_t)(v - h));
    } else {
        memset(c->R + h, 0, (size_t)(c->n_frames - h));
        memset(c->R, 0, (size_t)v);
    }
}

static int64_t clock_victim(Core *c) {
    int64_t n = c->n_frames, h = c->pst[PS_HAND], f = h, v = -1;
    for (int64_t k = 0; k < n; k++) {
        if (c->resident[f] && !c->R[f]) { v = f; break; }
        if (++f == n) f = 0;
    }
    if (v >= 0) {
        clear_r_circular(c, h, v);
    } else {
        /* every resident frame has R=1: one full turn clears them all */
        f = h;
        for (int64_t k = 0; k < n; k++) {
            if (c->resident[f]) { v = f; break; }
            if (++f == n) f = 0;
        }
        if (v < 0) return -1;
        memset(c->R, 0, (size_t)n);
    }
    c->pst[PS_HAND] = v + 1 == n ? 0 : v + 1;
    return v;
}

/* ESC keeps a bitmap that is a superset of its (0,0) frames: a frame becomes (0,0)
 * only when R is cleared on a clean resident frame, which happens here (step 2,
 * step 3) or in the Python methods, which mark the bitmap dirty. Stale bits (hit
 * or written or evicted since) are dropped when the scan meets them. */
static void esc_rebuild(Core *c) {
    int64_t n = c->n_frames, nw = (n + 63) / 64;
    memset(c->esc_bits, 0, (size_t)nw * 8);
    for (int64_t f = 0; f < n; f++)
        if (c->resident[f] & !c->R[f] & !c->M[f]) c->esc_bits[f >> 6] |= 1ull << (f & 63);
    c->pst[PS_DIRTY] = 0;
}

static inline int is00(Core *c, int64_t f) { return c->resident[f] && !c->R[f] && !c->M[f]; }

static int64_t esc_scan_word(Core *c, int64_t w, uint64_t mask) {
    uint64_t x = c->esc_bits[w] & mask;
    while (x) {
        int b = __builtin_ctzll(x);
        int64_t f = w * 64 + b;
        if (is00(c, f)) return f;
        c->esc_bits[w] &= ~(1ull << b);
        x &= x - 1;
    }
    return -1;
}

/* step 1: the first (0,0) frame from h, circularly */
static int64_t esc_find00(Core *c, int64_t h) {
    int64_t n = c->n_frames, nw = (n + 63) / 64, w0 = h >> 6, f;
    uint64_t hi_mask = ~0ull << (h & 63);
    if ((f = esc_scan_word(c, w0, hi_mask)) >= 0) return f;
    for (int64_t w = w0 + 1; w < nw; w++)
        if ((f = esc_scan_word(c, w, ~0ull)) >= 0) return f;
    for (int64_t w = 0; w < w0; w++)
        if ((f = esc_scan_word(c, w, ~0ull)) >= 0) return f;
    if (h & 63)
        if ((f = esc_scan_word(c, w0, ~hi_mask)) >= 0) return f;
    return -1;
}

static inline void clear_r_noting_00(Core *c, int64_t f) {
    if (c->R[f]) {
        c->R[f] = 0;
        if (c->resident[f] && !c->M[f]) c->esc_bits[f >> 6] |= 1ull << (f & 63);
    }
}

static int64_t esc_victim(Core *c) {
    int64_t n = c->n_frames, h = c->pst[PS_HAND], v, f;
    if (c->pst[PS_DIRTY]) esc_rebuild(c);
    v = esc_find00(c, h);
    if (v < 0) {
        /* step 2: the first (0,1), clearing R on the frames passed */
        f = h;
        for (int64_t k = 0; k < n; k++) {
            if (c->resident[f] && !c->R[f] && c->M[f]) { v = f; break; }
            if (++f == n) f = 0;
        }
        if (v >= 0) {
            for (f = h; f != v; f = f + 1 == n ? 0 : f + 1) clear_r_noting_00(c, f);
        } else {
            for (f = 0; f < n; f++) clear_r_noting_00(c, f);    /* all the way round: every R is now 0 */
            v = esc_find00(c, h);                               /* step 1 again */
            if (v < 0) {                                        /* step 2 again: all dirty */
                f = h;
                for (int64_t k = 0; k < n; k++) {
                    if (c->resident[f]) { v = f; break; }
                    if (++f == n) f = 0;
                }
                if (v < 0) return -1;
            }
        }
    }
    c->pst[PS_HAND] = v + 1 == n ? 0 : v + 1;
    return v;
}

/* the resident frame with the smallest key (first of equals), as np.argmin over a masked array */
static int64_t argmin_resident(Core *c, const int64_t *key) {
    int64_t best = -1;
    for (int64_t f = 0; f < c->n_frames; f++)
        if (c->resident[f] && (best < 0 || key[f] < key[best])) best = f;
    return best;
}

/* -2: a Python policy raised */
static int64_t select_victim(Core *c) {
    switch (c->pkind) {
    case P_CLOCK: return clock_victim(c);
    case P_ESC: return esc_victim(c);
    case P_FIFO:
    case P_LRU: return argmin_resident(c, c->pframes);
    default: {
        PyObject *r = PyObject_CallMethod(c->policy, "select_victim", NULL);
        if (r == NULL) return -2;
        long long v = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (v == -1 && PyErr_Occurred()) return -2;
        if (v >= c->n_frames || v < -1) {
            PyErr_Format(PyExc_ValueError, "policy select_victim returned gpfn %lld outside 0..%lld", v,
                         (long long)c->n_frames - 1);
            return -2;
        }
        return (int64_t)v;
    }
    }
}

static int policy_on_load(Core *c, int64_t g, int write, int64_t ref) {
    switch (c->pkind) {
    case P_CLOCK:
    case P_ESC:
        c->R[g] = (uint8_t)c->load_sets_r;
        return 0;
    case P_FIFO:
        c->R[g] = (uint8_t)c->load_sets_r;
        c->pframes[g] = c->pst[PS_SEQ]++;
        return 0;
    case P_LRU:
        c->R[g] = (uint8_t)c->load_sets_r;
        c->pframes[g] = ref;
        return 0;
    default: {
        PyObject *r = PyObject_CallMethod(c->policy, "on_load", "LOL", (long long)g, write ? Py_True : Py_False,
                                          (long long)ref);
        if (r == NULL) return -1;
        Py_DECREF(r);
        return 0;
    }
    }
}

/* ------------------------------------------------------------------ references */

/* Hits of references [i, j) are done; charge them as one run, as the reference does. */
static int end_run(Core *c, int64_t k, int64_t first_ref) {
    if (k == 0) return 0;
    c->ctr[C_REFS] += k;
    c->ctr[C_HITS] += k;
    c->vt[0] += (double)k * c->mem_ref_us;
    if (c->py_hits) {
        PyObject *r = PyObject_CallFunction(c->hits_cb, "LL", (long long)k, (long long)first_ref);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* One hit at reference j of a run that started at reference ref0 with clock vt0. */
static inline int do_hit(Core *c, int64_t page, int64_t g, int write, int64_t ref, int64_t slot) {
    uint64_t exp = c->expect[page];
    if (c->token[g] != exp) {
        if (report_lost(c, page, g, c->token[g], exp, "read") < 0) return -1;
        c->token[g] = exp;
    }
    c->R[g] = 1;
    c->touched[g] = 1;
    c->A[g] = 1;
    if (write) {
        c->token[g] = bump_one(c, page);
        c->M[g] = 1;
        c->D[g] = 1;
    }
    if (c->pkind == P_LRU) c->pframes[g] = ref;
    else if (c->py_hits) { c->hit_g[slot] = g; c->hit_w[slot] = (uint8_t)write; }
    return 0;
}

static inline int past_deadline(Core *c, int64_t i, double t) {
    return c->has_deadline && i != c->started_i && t >= c->deadline;
}

/* The window loop of the reference's _run: returns the next phase. */
static int run_refs(Core *c) {
    const int64_t *P = c->P;
    const uint8_t *W = c->W;
    int64_t n = c->n, i = c->i;
    int win = c->win;
    while (i < n) {
        if (win == 0) {
            /* right after a miss: one probe */
            int64_t page = P[i], g = c->gpfn[page];
            if (past_deadline(c, i, c->vt[0])) { n = i; break; }
            if (g >= 0 && c->backed[g] && !(W[i] && c->wp[g])) {
                int64_t ref = c->ctr[C_REFS];
                if (do_hit(c, page, g, W[i], ref, 0) < 0) { c->i = i; return -1; }
                if (end_run(c, 1, ref) < 0) { c->i = i + 1; return -1; }
                i++;
                win = WIN_MIN;
                continue;
            }
            c->i = i;
            c->win = win;
            c->started_i = i;
            if (g >= 0 && c->backed[g]) { c->ept_gs[0] = (uint64_t)g; c->cow_cont = PH_RUN; return PH_COW; }
            return g >= 0 ? PH_BACKWIN : PH_FAULT;
        }
        int64_t end = i + win < n ? i + win : n;
        int64_t ref0 = c->ctr[C_REFS];
        double vt0 = c->vt[0];
        int64_t j = i;
        int stop = 0;
        for (; j < end; j++) {
            int64_t page = P[j], g = c->gpfn[page];
            if (g < 0 || !c->backed[g] || (W[j] && c->wp[g])) break;
            if (past_deadline(c, j, vt0 + (double)(j - i) * c->mem_ref_us)) { stop = 1; break; }
            if (do_hit(c, page, g, W[j], ref0 + (j - i), j - i) < 0) {
                end_run(c, j - i, ref0);
                c->i = j;
                return -1;
            }
        }
        if (end_run(c, j - i, ref0) < 0) { c->i = j; return -1; }
        if (stop) { n = j; i = j; break; }
        if (j == end) {
            i = end;
            win = win * 4 < WIN_MAX ? win * 4 : WIN_MAX;
            continue;
        }
        i = j;
        int64_t g = c->gpfn[P[i]];
        if (past_deadline(c, i, c->vt[0])) { n = i; break; }
        c->i = i;
        c->win = win;
        c->started_i = i;
        if (g >= 0 && c->backed[g]) { c->ept_gs[0] = (uint64_t)g; c->cow_cont = PH_RUN; return PH_COW; }
        return g >= 0 ? PH_BACKWIN : PH_FAULT;
    }
    c->i = i;
    c->n = n;
    c->win = win;
    return PH_IDLE;
}

/* ------------------------------------------------------------------ backing (EPT faults) */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* After the reference at i found its frame taken by the host: every such frame among the next WIN_MAX,
 * its own first, then the others sorted and unique (np.unique): the host serves a fault's pages in the
 * order sent and may stop at the tick's end, so the one the vCPU waits for goes first. -1: out of memory. */
static int gather_back_window(Core *c) {
    int64_t end = c->i + WIN_MAX < c->n ? c->i + WIN_MAX : c->n, k = 0;
    uint64_t *tmp = (uint64_t *)malloc((size_t)(end - c->i) * sizeof(uint64_t));
    if (tmp == NULL) { PyErr_NoMemory(); return -1; }
    for (int64_t j = c->i; j < end; j++) {
        int64_t g = c->gpfn[c->P[j]];
        if (g >= 0 && !c->backed[g]) tmp[k++] = (uint64_t)g;
    }
    qsort(tmp, (size_t)k, sizeof(uint64_t), cmp_u64);
    int64_t u = 0;
    for (int64_t j = 0; j < k; j++)
        if (u == 0 || c->ept_gs[u - 1] != tmp[j]) c->ept_gs[u++] = tmp[j];
    free(tmp);
    uint64_t first = (uint64_t)c->gpfn[c->P[c->i]];
    for (int64_t j = 1; j < u; j++)
        if (c->ept_gs[j] == first) {
            memmove(c->ept_gs + 1, c->ept_gs, (size_t)j * sizeof(uint64_t));
            c->ept_gs[0] = first;
            break;
        }
    c->ept_n = u;
    return 0;
}

/* _back's first half: fault-around for a single free frame, snapshot of the shootdown generations */
static void prepare_back(Core *c) {
    if (c->ept_n == 1) {
        int64_t g0 = (int64_t)c->ept_gs[0];
        if (c->kind[g0] == K_FREE) {
            int64_t hi = g0 + c->fault_around < c->n_frames ? g0 + c->fault_around : c->n_frames;
            int64_t k = 1;
            for (int64_t g = g0 + 1; g < hi; g++)
                if (c->kind[g] == K_FREE && !c->backed[g]) c->ept_gs[k++] = (uint64_t)g;
            c->ept_n = k;
        }
    }
    for (int64_t k = 0; k < c->ept_n; k++) c->ept_gen[k] = c->inval_gen[c->ept_gs[k]];
}

/* _back's second half, with the hypervisor's tokens (NULL: all zero) and completion time; a copy-on-write
 * break (cow) is the same backing of one frame, counted apart (GuestKernel.cow_faults) */
static int finish_back(Core *c, const uint64_t *tokens, double done, int cow) {
    vt_max(c, done);
    if (!cow) c->ctr[C_EPT_FAULT_CALLS] += 1;
    for (int64_t k = 0; k < c->ept_n; k++) {
        int64_t g = (int64_t)c->ept_gs[k];
        /* the host stopped at the tick's end before this page: it stays unbacked, faulted again later */
        if (tokens && tokens[k] == LATER_TOKEN) continue;
        if (!cow) c->ctr[C_EPT_FAULTS] += 1;
        if (c->inval_gen[g] != c->ept_gen[k]) continue;     /* shot down again while we waited */
        int held = c->vpage[g] >= 0;
        if (held && c->host_took[g]) {
            c->ctr[C_HOST_REFAULTS] += 1;
            if (c->is_file[c->vpage[g]] && !c->M[g]) c->ctr[C_HOST_REFAULTS_CLEAN_FILE] += 1;
        }
        c->host_took[g] = 0;
        uint64_t tok = tokens ? tokens[k] : 0;
        if (held && tok != c->token[g]) {
            if (report_lost(c, c->vpage[g], g, tok, c->token[g], "ept_fault") < 0) return -1;
            tok = c->token[g];
        }
        c->token[g] = tok;
        c->backed[g] = 1;
        c->wp[g] = 0;
    }
    return 0;
}

/* ------------------------------------------------------------------ the state machine */

static PyObject *op_result(int op, long long a, long long b) {
    return Py_BuildValue("(iLL)", op, a, b);
}

static void end_batch(Core *c) {
    if (c->have_batch) {
        PyBuffer_Release(&c->pages_view);
        PyBuffer_Release(&c->writes_view);
        Py_CLEAR(c->pages_obj);
        Py_CLEAR(c->writes_obj);
        c->have_batch = 0;
    }
    c->phase = PH_IDLE;
}

static int set_op(int *o_op, long long *o_a, long long *o_b, int op, long long a, long long b) {
    *o_op = op;
    *o_a = a;
    *o_b = b;
    return 0;
}

/* Go on from c->phase until the batch is done or Python must await something: that op in *o_op, *o_a, *o_b
 * (0), or -1 with an exception set. */
static int drive_op(Core *c, int *o_op, long long *o_a, long long *o_b) {
    for (;;) {
        switch (c->phase) {
        case PH_RUN: {
            int next = run_refs(c);
            if (next < 0) { end_batch(c); return -1; }
            if (next == PH_IDLE) {
                int64_t done = c->n;
                end_batch(c);
                return set_op(o_op, o_a, o_b, OP_DONE, done, 0);
            }
            c->phase = next;
            break;
        }
        case PH_BACKWIN:
            if (gather_back_window(c) < 0) { end_batch(c); return -1; }
            c->back_cont = PH_RUN;
            c->phase = PH_BACK;
            break;
        case PH_FAULT: {
            int64_t page = c->P[c->i];
            c->f_page = page;
            c->f_write = c->W[c->i];
            c->f_ref = c->ctr[C_REFS];
            c->f_is_file = c->is_file[page];
            c->f_oom_tried = 0;
            if (c->evicted[page]) c->ctr[C_REFAULTS] += 1;
            int64_t g = c->cached[page];
            if (g >= 0) {
                /* soft-reclaimed: the page is still in a free frame, take it back (minor fault) */
                c->cached[page] = -1;
                soft_remove(c, g);
                c->f_g = g;
                c->eb_g = g;
                c->eb_cont = PH_SOFT_BACKED;
                c->phase = PH_EB;
            } else {
                c->phase = PH_ALLOC;
            }
            break;
        }
        case PH_SOFT_BACKED:
            if (c->f_write && c->backed[c->f_g] && c->wp[c->f_g]) {
                /* a write fault on a soft-reclaimed page in a shared frame: broken first (with a copy) */
                c->ept_gs[0] = (uint64_t)c->f_g;
                c->eb_g = c->f_g;
                c->eb_cont = PH_SOFT_BACKED;
                c->cow_cont = PH_EB;        /* shot down while it waited: backed again first */
                c->phase = PH_COW;
                break;
            }
            c->f_tok = c->token[c->f_g];
            c->ctr[C_MINOR] += 1;
            c->vt[0] += c->minor_fault_us;
            c->phase = PH_FINISH;
            break;
        case PH_ALLOC: {
            int64_t g = take_free(c);
            if (g == -2) { end_batch(c); return -1; }
            if (g >= 0) {
                c->f_g = g;
                c->phase = PH_AFTER_ALLOC;
                break;
            }
            int64_t v = select_victim(c);
            if (v == -2) { end_batch(c); return -1; }
            if (v < 0) {
                c->phase = PH_ALLOC;            /* Python runs the OOM hook (resume_oom) or raises */
                return set_op(o_op, o_a, o_b, OP_NO_VICTIM, c->f_oom_tried, 0);
            }
            c->resident[v] = 0;
            c->f_v = v;
            c->f_dirty = c->M[v];
            if (c->f_dirty && !c->backed[v]) {
                /* double paging: the host swapped it out, read it back before writing it */
                c->ctr[C_DOUBLE_PAGING] += 1;
                c->eb_g = v;
                c->eb_cont = PH_EVICT_BODY;
                c->phase = PH_EB;
            } else {
                c->phase = PH_EVICT_BODY;
            }
            break;
        }
        case PH_EVICT_BODY: {
            int64_t g = c->f_v, page = c->vpage[g], blk = 0;
            int dirty = c->f_dirty;
            if (dirty) {
                blk = c->block[page];
                if (blk < 0) {
                    if (c->swap_used[0] >= c->swap_slots) {
                        c->resident[g] = 1;     /* stays in memory; the run cannot go on without more swap */
                        c->phase = PH_ALLOC;
                        return set_op(o_op, o_a, o_b, OP_SWAP_FULL, c->swap_slots, 0);
                    }
                    blk = c->swap_base + c->swap_used[0];
                    c->swap_used[0] += 1;
                    c->block[page] = blk;
                }
                c->on_disk[page] = 1;
                c->f_wtok = c->token[g];
                if (c->is_file[page]) c->ctr[C_FILE_WRITES] += 1; else c->ctr[C_SWAP_OUT] += 1;
                c->ctr[C_WRITEBACKS] += 1;
            }
            c->gpfn[page] = -1;
            c->evicted[page] = 1;
            if (!dirty && c->is_file[page]) c->ctr[C_EVICTED_CLEAN_FILE] += 1;
            c->kind[g] = K_FREE;
            c->R[g] = 0;
            c->M[g] = 0;
            c->vpage[g] = -1;
            c->ctr[C_EVICTIONS] += 1;
            c->f_g = g;
            if (!dirty) {
                c->phase = PH_AFTER_ALLOC;
                break;
            }
            c->f_blk = blk;
            if (!c->disk_local) {
                c->phase = PH_EVICT_WROTE;
                return set_op(o_op, o_a, o_b, OP_WRITE, blk, (long long)c->f_wtok);
            }
            if (blk >= c->n_blocks) {
                c->phase = PH_EVICT_WROTE;
                return set_op(o_op, o_a, o_b, OP_BAD_BLOCK, blk, c->n_blocks);
            }
            c->disk_io[1] += 1;
            c->disk_io[3] += 1;
            c->disk_tokens[blk] = c->f_wtok;
            vt_max(c, disk_submit(c, c->vt[0], 1));
            c->phase = PH_AFTER_ALLOC;
            break;
        }
        case PH_AFTER_ALLOC: {
            int64_t page = c->f_page;
            if (c->on_disk[page]) {
                int64_t blk = c->block[page];
                c->f_blk = blk;
                if (!c->disk_local) {
                    c->phase = PH_READ_DONE;
                    return set_op(o_op, o_a, o_b, OP_READ, blk, 0);
                }
                if (blk < 0 || blk >= c->n_blocks) {
                    c->phase = PH_READ_DONE;
                    return set_op(o_op, o_a, o_b, OP_BAD_BLOCK, blk, c->n_blocks);
                }
                c->disk_io[0] += 1;
                c->disk_io[2] += 1;
                c->f_tok = c->disk_tokens[blk];
                vt_max(c, disk_submit(c, c->vt[0], 1));
                c->phase = PH_READ_DONE;
                break;      /* the read's bookkeeping is shared with the remote path */
            }
            c->f_tok = 0;   /* a fresh anonymous page: zero fill */
            c->ctr[C_MINOR] += 1;
            c->vt[0] += c->zero_fill_us;
            c->phase = PH_ALLOC_BACKED;
            break;
        }
        case PH_READ_DONE: {
            int64_t page = c->f_page;
            if (c->f_is_file) {
                c->ctr[C_FILE_READS] += 1;
                if (c->f_tok == 0) c->f_tok = make_token(page, 0);   /* a block never written: the file's content */
            } else {
                c->ctr[C_SWAP_IN] += 1;
            }
            c->ctr[C_MAJOR] += 1;
            if (c->evicted[page]) {
                c->ctr[C_REFAULT_READS] += 1;
                c->ctr[C_REFAULT_FILE_READS] += c->f_is_file;
            }
            c->phase = PH_ALLOC_BACKED;
            break;
        }
        case PH_ALLOC_BACKED:
            if (c->backed[c->f_g] && c->wp[c->f_g]) {
                /* the fill writes the frame: a shared one is broken first (fresh: nothing to copy) */
                c->ept_gs[0] = (uint64_t)c->f_g;
                c->cow_cont = PH_ALLOC_BACKED;
                c->phase = PH_COW;
                break;
            }
            c->eb_g = c->f_g;
            c->eb_cont = PH_FINISH;
            c->phase = PH_EB;
            break;
        case PH_COW:            /* ept_gs[0] and cow_cont are set by whoever comes here */
            c->ept_n = 1;
            c->ept_gen[0] = c->inval_gen[c->ept_gs[0]];
            if (c->hyp_local) {     /* no host shares anything: nothing to break */
                c->wp[c->ept_gs[0]] = 0;
                c->phase = c->cow_cont;
                break;
            }
            c->phase = PH_COW_DONE;
            return set_op(o_op, o_a, o_b, OP_COW, (long long)c->ept_gs[0], 0);
        case PH_FINISH: {
            /* nothing waits from here on: the frame stays backed while we fill it */
            int64_t page = c->f_page, g = c->f_g;
            uint64_t tok = c->f_tok, exp = c->expect[page];
            if (tok != exp) {
                if (report_lost(c, page, g, tok, exp, "fault") < 0) { end_batch(c); return -1; }
                tok = exp;
            }
            c->kind[g] = c->f_is_file ? K_FILE : K_ANON;
            c->vpage[g] = page;
            c->resident[g] = 1;
            c->A[g] = 1;
            c->D[g] = 1;            /* loading stored into the frame */
            c->touched[g] = 1;
            c->gpfn[page] = g;
            if (c->f_write) tok = bump_one(c, page);
            c->M[g] = (uint8_t)c->f_write;
            c->token[g] = tok;
            if (policy_on_load(c, g, c->f_write, c->f_ref) < 0) { end_batch(c); return -1; }
            c->ctr[C_REFS] += 1;
            c->vt[0] += c->mem_ref_us;
            c->i += 1;
            c->win = 0;
            c->phase = PH_RUN;
            break;
        }
        case PH_EB:
            if (c->backed[c->eb_g]) {
                c->phase = c->eb_cont;
                break;
            }
            c->ept_gs[0] = (uint64_t)c->eb_g;
            c->ept_n = 1;
            c->back_cont = PH_EB;
            c->phase = PH_BACK;
            break;
        case PH_BACK:
            prepare_back(c);
            if (!c->hyp_local) {
                c->phase = PH_BACK_DONE;
                return set_op(o_op, o_a, o_b, OP_EPT, c->ept_n, 0);
            }
            if (finish_back(c, NULL, c->vt[0], 0) < 0) { end_batch(c); return -1; }
            c->phase = c->back_cont;
            break;
        default:
            PyErr_Format(PyExc_RuntimeError, "paging core: no batch to go on with (phase %d)", c->phase);
            return -1;
        }
    }
}

static PyObject *drive(Core *c) {
    int op;
    long long a, b;
    if (drive_op(c, &op, &a, &b) < 0) return NULL;
    return op_result(op, a, b);
}

/* ------------------------------------------------------------------ Python methods */

static int get_view(Core *c, PyObject *spec, const char *key, Py_ssize_t itemsize, Py_ssize_t n, void **out) {
    PyObject *obj = PyDict_GetItemString(spec, key);
    if (obj == NULL) {
        PyErr_Format(PyExc_KeyError, "paging core: spec has no %s", key);
        return -1;
    }
    if (c->n_views >= (int)(sizeof(c->views) / sizeof(c->views[0]))) {
        PyErr_SetString(PyExc_RuntimeError, "paging core: too many arrays");
        return -1;
    }
    Py_buffer *v = &c->views[c->n_views];
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    c->n_views++;
    if (v->itemsize != itemsize || (n >= 0 && v->len != n * itemsize)) {
        PyErr_Format(PyExc_ValueError, "paging core: %s has %zd bytes of items of %zd, want %zd of %zd", key,
                     v->len, v->itemsize, n * itemsize, itemsize);
        return -1;
    }
    *out = v->buf;
    return 0;
}

static int get_i64(PyObject *spec, const char *key, int64_t *out) {
    PyObject *obj = PyDict_GetItemString(spec, key);
    if (obj == NULL) { PyErr_Format(PyExc_KeyError, "paging core: spec has no %s", key); return -1; }
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

static int get_f64(PyObject *spec, const char *key, double *out) {
    PyObject *obj = PyDict_GetItemString(spec, key);
    if (obj == NULL) { PyErr_Format(PyExc_KeyError, "paging core: spec has no %s", key); return -1; }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

static int check_names(PyObject *spec, const char *key, const char **names, int n) {
    PyObject *obj = PyDict_GetItemString(spec, key);
    if (obj == NULL || !PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != n) {
        PyErr_Format(PyExc_ValueError, "paging core: %s must be a tuple of %d names", key, n);
        return -1;
    }
    for (int k = 0; k < n; k++) {
        const char *s = PyUnicode_AsUTF8(PyTuple_GET_ITEM(obj, k));
        if (s == NULL) return -1;
        if (strcmp(s, names[k]) != 0) {
            PyErr_Format(PyExc_ValueError, "paging core: %s[%d] is %s, the core has %s (rebuild the extension)",
                         key, k, s, names[k]);
            return -1;
        }
    }
    return 0;
}

static int Core_init(Core *c, PyObject *args, PyObject *kwds) {
    PyObject *spec;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &spec)) return -1;
    if (c->n_views) { PyErr_SetString(PyExc_RuntimeError, "paging core: already initialised"); return -1; }
    if (check_names(spec, "counter_names", COUNTER_NAMES, N_COUNTERS) < 0) return -1;
    if (check_names(spec, "ks_names", KS_NAMES, N_KS) < 0) return -1;
    int64_t nf, np_, pk, lsr, pyh, dl, hl;
    if (get_i64(spec, "n_frames", &nf) < 0 || get_i64(spec, "n_pages", &np_) < 0) return -1;
    c->n_frames = nf;
    c->n_pages = np_;
    if (get_view(c, spec, "kind", 1, nf, (void **)&c->kind) < 0 ||
        get_view(c, spec, "resident", 1, nf, (void **)&c->resident) < 0 ||
        get_view(c, spec, "R", 1, nf, (void **)&c->R) < 0 ||
        get_view(c, spec, "touched", 1, nf, (void **)&c->touched) < 0 ||
        get_view(c, spec, "A", 1, nf, (void **)&c->A) < 0 ||
        get_view(c, spec, "M", 1, nf, (void **)&c->M) < 0 ||
        get_view(c, spec, "D", 1, nf, (void **)&c->D) < 0 ||
        get_view(c, spec, "backed", 1, nf, (void **)&c->backed) < 0 ||
        get_view(c, spec, "host_took", 1, nf, (void **)&c->host_took) < 0 ||
        get_view(c, spec, "wp", 1, nf, (void **)&c->wp) < 0 ||
        get_view(c, spec, "vpage", 8, nf, (void **)&c->vpage) < 0 ||
        get_view(c, spec, "token", 8, nf, (void **)&c->token) < 0 ||
        get_view(c, spec, "gpfn", 8, np_, (void **)&c->gpfn) < 0 ||
        get_view(c, spec, "cached", 8, np_, (void **)&c->cached) < 0 ||
        get_view(c, spec, "version", 8, np_, (void **)&c->version) < 0 ||
        get_view(c, spec, "block", 8, np_, (void **)&c->block) < 0 ||
        get_view(c, spec, "is_file", 1, np_, (void **)&c->is_file) < 0 ||
        get_view(c, spec, "on_disk", 1, np_, (void **)&c->on_disk) < 0 ||
        get_view(c, spec, "evicted", 1, np_, (void **)&c->evicted) < 0 ||
        get_view(c, spec, "expect", 8, np_, (void **)&c->expect) < 0 ||
        get_view(c, spec, "free_mask", 1, nf, (void **)&c->free_mask) < 0 ||
        get_view(c, spec, "ks", 8, N_KS, (void **)&c->ks) < 0 ||
        get_view(c, spec, "soft_prev", 8, nf, (void **)&c->soft_prev) < 0 ||
        get_view(c, spec, "soft_next", 8, nf, (void **)&c->soft_next) < 0 ||
        get_view(c, spec, "inval_gen", 8, nf, (void **)&c->inval_gen) < 0 ||
        get_view(c, spec, "counters", 8, N_COUNTERS, (void **)&c->ctr) < 0 ||
        get_view(c, spec, "vt", 8, 1, (void **)&c->vt) < 0 ||
        get_view(c, spec, "swap_used", 8, 1, (void **)&c->swap_used) < 0 ||
        get_view(c, spec, "ept_gs", 8, nf, (void **)&c->ept_gs) < 0 ||
        get_view(c, spec, "ept_gen", 8, nf, (void **)&c->ept_gen) < 0 ||
        get_view(c, spec, "hit_g", 8, WIN_MAX, (void **)&c->hit_g) < 0 ||
        get_view(c, spec, "hit_w", 1, WIN_MAX, (void **)&c->hit_w) < 0)
        return -1;
    if (get_i64(spec, "swap_base", &c->swap_base) < 0 || get_i64(spec, "swap_slots", &c->swap_slots) < 0 ||
        get_i64(spec, "fault_around", &c->fault_around) < 0 ||
        get_f64(spec, "mem_ref_us", &c->mem_ref_us) < 0 || get_f64(spec, "minor_fault_us", &c->minor_fault_us) < 0 ||
        get_f64(spec, "zero_fill_us", &c->zero_fill_us) < 0 ||
        get_i64(spec, "policy_kind", &pk) < 0 || get_i64(spec, "load_sets_r", &lsr) < 0 ||
        get_i64(spec, "py_hits", &pyh) < 0 || get_i64(spec, "disk_local", &dl) < 0 ||
        get_i64(spec, "hyp_local", &hl) < 0)
        return -1;
    if (pk < P_CLOCK || pk > P_PY) { PyErr_Format(PyExc_ValueError, "paging core: policy_kind %lld", (long long)pk); return -1; }
    c->pkind = (int)pk;
    c->load_sets_r = lsr != 0;
    c->py_hits = pyh != 0;
    c->disk_local = dl != 0;
    c->hyp_local = hl != 0;
    if (pk == P_CLOCK || pk == P_ESC || pk == P_FIFO)
        if (get_view(c, spec, "pol_state", 8, 2, (void **)&c->pst) < 0) return -1;
    if (pk == P_FIFO || pk == P_LRU)
        if (get_view(c, spec, "pol_frames", 8, nf, (void **)&c->pframes) < 0) return -1;
    if (pk == P_ESC)
        if (get_view(c, spec, "esc_bits", 8, (nf + 63) / 64, (void **)&c->esc_bits) < 0) return -1;
    if (c->disk_local) {
        if (get_i64(spec, "n_blocks", &c->n_blocks) < 0 || get_i64(spec, "disk_queue_depth", &c->qd) < 0 ||
            get_f64(spec, "disk_latency_us", &c->disk_latency_us) < 0 ||
            get_f64(spec, "disk_bandwidth_bps", &c->disk_bandwidth_bps) < 0 ||
            get_view(c, spec, "disk_tokens", 8, c->n_blocks, (void **)&c->disk_tokens) < 0 ||
            get_view(c, spec, "disk_chan_free", 8, c->qd, (void **)&c->chan_free) < 0 ||
            get_view(c, spec, "disk_acct", 8, 3, (void **)&c->disk_acct) < 0 ||
            get_view(c, spec, "disk_io", 8, 4, (void **)&c->disk_io) < 0)
            return -1;
    }
    PyObject *pol = PyDict_GetItemString(spec, "policy");
    PyObject *lost = PyDict_GetItemString(spec, "lost_cb");
    PyObject *hits = PyDict_GetItemString(spec, "hits_cb");
    if (pol == NULL || lost == NULL || hits == NULL) {
        PyErr_SetString(PyExc_KeyError, "paging core: spec needs policy, lost_cb and hits_cb");
        return -1;
    }
    Py_INCREF(pol); c->policy = pol;
    Py_INCREF(lost); c->lost_cb = lost;
    Py_INCREF(hits); c->hits_cb = hits;
    c->phase = PH_IDLE;
    return 0;
}

/* A batch's pages (int64, each a page of the layout) and writes (one byte each), or -1 with ValueError set. */
static int check_batch(Core *c, const Py_buffer *pv, const Py_buffer *wv) {
    if (pv->itemsize != 8 || wv->itemsize != 1 || pv->len / 8 != wv->len) {
        PyErr_SetString(PyExc_ValueError, "paging core: pages must be int64 and writes bool, of one length");
        return -1;
    }
    const int64_t *P = (const int64_t *)pv->buf;
    for (int64_t j = 0, n = pv->len / 8; j < n; j++)
        if (P[j] < 0 || P[j] >= c->n_pages) {
            PyErr_Format(PyExc_ValueError, "paging core: page %lld outside 0..%lld", (long long)P[j],
                         (long long)c->n_pages - 1);
            return -1;
        }
    return 0;
}

static PyObject *Core_start(Core *c, PyObject *args) {
    PyObject *pages, *writes, *deadline;
    if (!PyArg_ParseTuple(args, "OOO", &pages, &writes, &deadline)) return NULL;
    end_batch(c);
    if (PyObject_GetBuffer(pages, &c->pages_view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(writes, &c->writes_view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&c->pages_view);
        return NULL;
    }
    Py_INCREF(pages); c->pages_obj = pages;
    Py_INCREF(writes); c->writes_obj = writes;
    c->have_batch = 1;
    if (check_batch(c, &c->pages_view, &c->writes_view) < 0) {
        end_batch(c);
        return NULL;
    }
    c->P = (const int64_t *)c->pages_view.buf;
    c->W = (const uint8_t *)c->writes_view.buf;
    c->n = c->pages_view.len / 8;
    c->i = 0;
    c->started_i = -1;
    c->win = WIN_MIN;
    c->cow_cont = PH_RUN;
    if (deadline == Py_None) {
        c->has_deadline = 0;
    } else {
        c->deadline = PyFloat_AsDouble(deadline);
        if (c->deadline == -1.0 && PyErr_Occurred()) { end_batch(c); return NULL; }
        c->has_deadline = 1;
    }
    if (c->pkind == P_ESC && c->pst[PS_DIRTY]) esc_rebuild(c);
    c->phase = PH_RUN;
    return drive(c);
}

static int expect_phase(Core *c, int phase, const char *what) {
    if (c->phase != phase) {
        PyErr_Format(PyExc_RuntimeError, "paging core: %s while not waiting for it (phase %d)", what, c->phase);
        return -1;
    }
    return 0;
}

static PyObject *Core_resume_ept(Core *c, PyObject *args) {
    PyObject *tokens;
    double done;
    if (!PyArg_ParseTuple(args, "Od", &tokens, &done)) return NULL;
    if (expect_phase(c, PH_BACK_DONE, "resume_ept") < 0) return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(tokens, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (v.itemsize != 8 || v.len != c->ept_n * 8) {
        PyBuffer_Release(&v);
        PyErr_Format(PyExc_ValueError, "paging core: EPT fault of %lld gpfns answered with %zd tokens",
                     (long long)c->ept_n, v.len / (v.itemsize ? v.itemsize : 1));
        return NULL;
    }
    int r = finish_back(c, (const uint64_t *)v.buf, done, 0);
    PyBuffer_Release(&v);
    if (r < 0) { end_batch(c); return NULL; }
    c->phase = c->back_cont;
    return drive(c);
}

static PyObject *Core_resume_cow(Core *c, PyObject *args) {
    unsigned long long tok;
    double done;
    if (!PyArg_ParseTuple(args, "Kd", &tok, &done)) return NULL;
    if (expect_phase(c, PH_COW_DONE, "resume_cow") < 0) return NULL;
    uint64_t t = (uint64_t)tok;
    int r = finish_back(c, &t, done, 1);
    if (r < 0) { end_batch(c); return NULL; }
    c->phase = c->cow_cont;
    return drive(c);
}

static PyObject *Core_resume_read(Core *c, PyObject *args) {
    unsigned long long tok;
    double done;
    if (!PyArg_ParseTuple(args, "Kd", &tok, &done)) return NULL;
    if (expect_phase(c, PH_READ_DONE, "resume_read") < 0) return NULL;
    vt_max(c, done);
    c->f_tok = tok;
    return drive(c);
}

/* One answer of `chained` as an unsigned 64-bit value: int(x) as the Python replay reads it. */
static int answer_u64(PyObject *x, uint64_t *out) {
    PyObject *i = PyNumber_Index(x);
    if (i == NULL) return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(i);
    Py_DECREF(i);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* replay(chained, gate, fresh_ok) -> (op, a, b, used): the answers given ahead, replayed in the core.
 *
 * The core has handed back a read (PH_READ_DONE) or an EPT fault (PH_BACK_DONE); chained holds
 * GuestKernel's answers, last first, each (a block or a fault's gpfns tuple, start, completion, tokens).
 * While the request the core is at is the last answer's (the block, or the fault's gpfns in order, every
 * one of them fresh when fresh_ok), at that answer's start and before the gate, the core takes that
 * answer (resume_read's or resume_ept's work, the fault's fresh pages counted as _replayed_ept counts
 * them) and runs on to its next request. It stops at the first request that is not the next answer's, at
 * a fault answered with KEEP (the Python path puts the pages' own tokens in), at a malformed answer, or
 * when the core needs something else; Python's replay (GuestKernel._replayed) then says what was wrong,
 * or serves it. Returns how many answers were used (the caller takes them off chained and books their
 * stalls, in order) and, if any, the op the core is at now: a cold tick's answers, dozens a batch, without
 * a return to Python each (a list of all the reads ahead copied at each step was ~3/4 of that replay). */
static PyObject *Core_replay(Core *c, PyObject *args) {
    double gate;
    int fresh_ok;
    PyObject *chained;
    if (!PyArg_ParseTuple(args, "O!dp", &PyList_Type, &chained, &gate, &fresh_ok)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(chained), used = 0;
    int op = -1;
    long long a = 0, b = 0;
    uint64_t *toks = NULL;
    while (used < n && (c->phase == PH_READ_DONE || c->phase == PH_BACK_DONE)) {
        PyObject *item = PyList_GET_ITEM(chained, n - 1 - used);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 4) break;
        PyObject *want = PyTuple_GET_ITEM(item, 0), *answer = PyTuple_GET_ITEM(item, 3);
        double start = PyFloat_AsDouble(PyTuple_GET_ITEM(item, 1));
        double d = PyFloat_AsDouble(PyTuple_GET_ITEM(item, 2));
        if (PyErr_Occurred()) { PyErr_Clear(); break; }
        double vt = c->vt[0];
        if (vt != start || !(vt < gate)) break;
        if (c->phase == PH_READ_DONE) {
            if (!PyLong_CheckExact(want)) break;
            long long blk = PyLong_AsLongLong(want);
            uint64_t t = 0;
            PyObject *t0 = PyErr_Occurred() ? NULL : PySequence_GetItem(answer, 0);
            if (t0 != NULL) {
                answer_u64(t0, &t);
                Py_DECREF(t0);
            }
            if (PyErr_Occurred()) { PyErr_Clear(); break; }
            if (blk != c->f_blk) break;
            vt_max(c, d);
            c->f_tok = t;
        } else {
            int64_t m = c->ept_n;
            if (!fresh_ok || !PyTuple_CheckExact(want) || PyTuple_GET_SIZE(want) != m) break;
            int fits = 1;
            for (int64_t k = 0; k < m && fits; k++) {
                uint64_t g;
                PyObject *x = PyTuple_GET_ITEM(want, k);
                if (!PyLong_CheckExact(x) || answer_u64(x, &g) < 0) { PyErr_Clear(); fits = 0; break; }
                fits = g == c->ept_gs[k] && g < (uint64_t)c->n_frames
                       && c->vpage[g] < 0 && c->kind[g] == K_FREE;            /* the gpfn, and fresh */
            }
            if (!fits) break;
            Py_ssize_t nt = PySequence_Size(answer);
            if (nt != m) { PyErr_Clear(); break; }
            PyMem_Free(toks);
            toks = PyMem_Malloc(sizeof(uint64_t) * (size_t)(m ? m : 1));
            if (toks == NULL) return PyErr_NoMemory();
            for (int64_t k = 0; k < m && fits; k++) {
                PyObject *x = PySequence_GetItem(answer, k);
                if (x == NULL || answer_u64(x, &toks[k]) < 0) { PyErr_Clear(); fits = 0; }
                Py_XDECREF(x);
                if (fits && toks[k] == KEEP_TOKEN) fits = 0;   /* the Python path fills those in */
            }
            if (!fits) break;
            c->ctr[C_EPT_FRESH] += m;
            if (finish_back(c, toks, d, 0) < 0) { end_batch(c); PyMem_Free(toks); return NULL; }
            c->phase = c->back_cont;
        }
        used++;
        if (drive_op(c, &op, &a, &b) < 0) { PyMem_Free(toks); return NULL; }
        if (op != OP_READ && op != OP_EPT) break;      /* the batch's end, or a request no answer is for */
    }
    PyMem_Free(toks);
    return Py_BuildValue("(iLLn)", op, a, b, used);
}

/* How many of the first n gpfns of the EPT fault the core handed back hold no page (GuestKernel._fresh):
 * a replayed fault's check that every page is fresh, as the host's answer ahead said. */
static PyObject *Core_count_fresh(Core *c, PyObject *args) {
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "n", &n)) return NULL;
    if (n < 0 || n > c->ept_n) {
        PyErr_Format(PyExc_ValueError, "paging core: count_fresh of %zd gpfns, the fault has %lld", n,
                     (long long)c->ept_n);
        return NULL;
    }
    Py_ssize_t fresh = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t g = c->ept_gs[i];
        if (g >= (uint64_t)c->n_frames) {
            PyErr_Format(PyExc_IndexError, "paging core: gpfn %llu outside the guest's frames",
                         (unsigned long long)g);
            return NULL;
        }
        fresh += c->vpage[g] < 0 && c->kind[g] == K_FREE;
    }
    return PyLong_FromSsize_t(fresh);
}

static PyObject *Core_resume_write(Core *c, PyObject *args) {
    double done;
    if (!PyArg_ParseTuple(args, "d", &done)) return NULL;
    if (expect_phase(c, PH_EVICT_WROTE, "resume_write") < 0) return NULL;
    vt_max(c, done);
    c->phase = PH_AFTER_ALLOC;
    return drive(c);
}

static PyObject *Core_resume_oom(Core *c, PyObject *noargs) {
    if (expect_phase(c, PH_ALLOC, "resume_oom") < 0) return NULL;
    c->f_oom_tried = 1;
    return drive(c);
}

static PyObject *Core_abort(Core *c, PyObject *noargs) {
    end_batch(c);
    Py_RETURN_NONE;
}

static PyObject *Core_esc_rebuild(Core *c, PyObject *noargs) {
    if (c->pkind == P_ESC) esc_rebuild(c);
    Py_RETURN_NONE;
}

static int Core_traverse(Core *c, visitproc visit, void *arg) {
    Py_VISIT(c->policy);
    Py_VISIT(c->lost_cb);
    Py_VISIT(c->hits_cb);
    Py_VISIT(c->pages_obj);
    Py_VISIT(c->writes_obj);
    for (int k = 0; k < c->n_views; k++) Py_VISIT(c->views[k].obj);
    return 0;
}

static int Core_clear(Core *c) {
    end_batch(c);
    for (int k = 0; k < c->n_views; k++) PyBuffer_Release(&c->views[k]);
    c->n_views = 0;
    Py_CLEAR(c->policy);
    Py_CLEAR(c->lost_cb);
    Py_CLEAR(c->hits_cb);
    free(c->rc_mark);
    c->rc_mark = NULL;
    return 0;
}

static void Core_dealloc(Core *c) {
    PyObject_GC_UnTrack(c);
    Core_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* ------------------------------------------------------------------ read chains
 *
 * With a remote disk every file read is a round trip. Right after the core
 * hands back a read (phase PH_READ_DONE), lookahead() works out what the
 * batch will do once that read is done, as far as the result is certain
 * whatever the read's completion time: hits, zero-filled first touches and
 * further file reads into free frames that are backed and not shared. Only
 * the clock depends on the completions, and the clock enters the core's
 * decisions only through the deadline checks; so the program it returns
 * carries each clock step and each check exactly as drive() makes them (the
 * same double operations in the same order), and the host, which knows the
 * completions, runs it (hostd/readchain.py): it serves each further read at
 * the clock the core would have sent it at, and stops where a check fails.
 * The EPT fault that backs a fault-around group of free frames holding no
 * page goes in too (the host restores nothing for it). So does the eviction
 * of a clean page when no frame is free: which page the policy picks does
 * not depend on the clock either, only on its state (hand, R and M bits,
 * load order), so the walk runs the policy's own scan on copies of that
 * state, and applies to the copies what drive() does to the real one on the
 * way (the hits' R and M bits, the loads, the evictions); a clean eviction
 * asks nothing of the host. The walk stops before anything else (a dirty
 * victim, whose write is a request of its own; any other EPT fault, a
 * copy-on-write break, a soft-reclaimed page, a swap read, the batch's
 * end), so what it asks for is exactly what the core would ask for one
 * request at a time.
 *
 * Program: float64 [deadline (inf: none), mem_ref_us] then at most RC_MAX_PAIRS (op, value) pairs.
 */
enum { RC_WIN = 0, RC_CHECK = 1, RC_ADD = 2, RC_READ = 3, RC_EPT = 4, RC_EPT_PAGE = 5 };
#define RC_MAX_PAIRS 4096   /* (op, value) pairs after the header: hostd.readchain.MAX_PAIRS */

typedef struct { double *v; Py_ssize_t n, cap; } RcBuf;

static int rc_put(RcBuf *b, double op, double x) {
    if (b->n + 2 > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap * 2 : 64;
        double *v = (double *)realloc(b->v, (size_t)cap * sizeof(double));
        if (v == NULL) { PyErr_NoMemory(); return -1; }
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = op;
    b->v[b->n++] = x;
    return 0;
}

/* The walk's frames backed by the EPT faults it has put in the program: each fault-around group is the
 * free, unbacked frames of [lo, hi) at the start of the walk (none of them changes until its fault). */
typedef struct { int64_t *lo, *hi; int64_t n; } RcGroups;

static int rc_backed(const Core *c, const RcGroups *gr, int64_t g) {
    if (c->backed[g]) return 1;
    for (int64_t k = 0; k < gr->n; k++)
        if (gr->lo[k] <= g && g < gr->hi[k] && c->kind[g] == K_FREE) return 1;
    return 0;
}

/* The EPT fault drive() makes for the free frame g0 it is about to fill (PH_EB, prepare_back's
 * fault-around), if every frame in it holds no page (all fresh: the host restores nothing, and nothing
 * of what it does depends on a page's old state but the books it keeps for this guest).
 * 1: put in the program; 0: not one to chain; -1: error. */
static int rc_ept(Core *c, RcBuf *b, RcGroups *gr, int64_t g0) {
    if (c->hyp_local || c->kind[g0] != K_FREE || c->vpage[g0] >= 0 || c->fault_around < 1) return 0;
    int64_t hi = g0 + c->fault_around < c->n_frames ? g0 + c->fault_around : c->n_frames;
    int64_t k = 1;
    for (int64_t g = g0 + 1; g < hi; g++)
        if (c->kind[g] == K_FREE && !rc_backed(c, gr, g)) {
            if (c->vpage[g] >= 0) return 0;     /* a soft-reclaimed page: not fresh */
            k++;
        }
    if (b->n + 2 * (k + 1) > 2 * (RC_MAX_PAIRS + 1)) return 0;
    if (rc_put(b, RC_EPT_PAGE, (double)g0) < 0) return -1;
    for (int64_t g = g0 + 1; g < hi; g++)
        if (c->kind[g] == K_FREE && !rc_backed(c, gr, g) && rc_put(b, RC_EPT_PAGE, (double)g) < 0) return -1;
    if (rc_put(b, RC_EPT, (double)k) < 0) return -1;
    gr->lo[gr->n] = g0;
    gr->hi[gr->n] = hi;
    gr->n++;
    return 1;
}

/* The policy's state as the walk leaves it: copies of what drive() changes on the way and the scan reads
 * (resident, R, M; the hand, the ESC bitmap, the load order), in a Core whose policy state points at them,
 * so that select_victim() runs on it as on the real one. mark[page] (the Core's, zero between walks): 1
 * loaded by the walk, 2 evicted by it. The copies cost the guest's frames per chain, so a guest of more
 * than RC_EVICT_MAX_FRAMES frames stops its chains at an eviction instead. */
#define RC_EVICT_MAX_FRAMES (1 << 16)
typedef struct {
    Core tmp;
    uint8_t *res, *R, *M, *mark;
    uint64_t *esc;
    int64_t *pfr, *gone;    /* gone: the pages evicted, to clear their marks */
    int64_t n_gone;
    int64_t pst[2];
    int on;
} RcPolicy;

/* frees the copies and zeroes the marks the walk set (its pages: spec, n_spec; and those it evicted) */
static void rc_policy_free(RcPolicy *s, const int64_t *spec, int64_t n_spec) {
    if (s->mark) {
        for (int64_t k = 0; k < n_spec; k++)
            if (spec[2 * k] >= 0) s->mark[spec[2 * k]] = 0;
        for (int64_t k = 0; k < s->n_gone; k++) s->mark[s->gone[k]] = 0;
    }
    free(s->res); free(s->R); free(s->M); free(s->esc); free(s->pfr); free(s->gone);
    s->on = 0;
}

static int rc_policy_init(RcPolicy *s, Core *c, int64_t lim) {
    int64_t n = c->n_frames, nw = (n + 63) / 64;
    memset(s, 0, sizeof(*s));
    s->tmp = *c;
    if (c->rc_mark == NULL) c->rc_mark = (uint8_t *)calloc((size_t)c->n_pages + 1, 1);
    s->mark = c->rc_mark;
    s->res = (uint8_t *)malloc((size_t)n + 1);     /* (+1: never a request for no bytes) */
    s->R = (uint8_t *)malloc((size_t)n + 1);
    s->M = (uint8_t *)malloc((size_t)n + 1);
    s->gone = (int64_t *)malloc((size_t)(lim + 2) * sizeof(int64_t));
    if (c->pkind == P_ESC) s->esc = (uint64_t *)malloc((size_t)nw * 8 + 8);
    if (c->pkind == P_FIFO || c->pkind == P_LRU) s->pfr = (int64_t *)malloc((size_t)n * 8 + 8);
    if (!s->res || !s->R || !s->M || !s->mark || !s->gone || (c->pkind == P_ESC && !s->esc)
            || ((c->pkind == P_FIFO || c->pkind == P_LRU) && !s->pfr)) {
        rc_policy_free(s, NULL, 0);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(s->res, c->resident, (size_t)n);
    memcpy(s->R, c->R, (size_t)n);
    memcpy(s->M, c->M, (size_t)n);
    if (s->esc) memcpy(s->esc, c->esc_bits, (size_t)nw * 8);
    if (s->pfr) memcpy(s->pfr, c->pframes, (size_t)n * 8);
    if (c->pst) { s->pst[0] = c->pst[0]; s->pst[1] = c->pst[1]; }
    s->tmp.resident = s->res;
    s->tmp.R = s->R;
    s->tmp.M = s->M;
    s->tmp.esc_bits = s->esc;
    s->tmp.pframes = s->pfr;
    s->tmp.pst = s->pst;
    s->on = 1;
    return 0;
}

/* drive()'s PH_FINISH and policy_on_load, on the copies: page now in frame g, loaded by reference ref */
static void rc_policy_load(RcPolicy *s, int64_t page, int64_t g, int write, int64_t ref) {
    Core *t = &s->tmp;
    s->res[g] = 1;
    s->M[g] = (uint8_t)write;
    s->R[g] = (uint8_t)t->load_sets_r;
    if (t->pkind == P_FIFO) s->pfr[g] = s->pst[PS_SEQ]++;
    else if (t->pkind == P_LRU) s->pfr[g] = ref;
    s->mark[page] = 1;
}

/* the frame the walk has put page in, or -1 (the latest entry: a page evicted and loaded again has two) */
static int64_t rc_spec_frame(const int64_t *spec, int64_t n_spec, int64_t page) {
    for (int64_t k = n_spec - 1; k >= 0; k--)
        if (spec[2 * k] == page) return spec[2 * k + 1];
    return -1;
}

/* The walk of references P[i..n) (see above). from_read: right after the core handed back the read of
 * P[i - 1] (phase PH_READ_DONE): that read's page and its frame's fault-around are in flight, and the walk
 * starts with one probe (win 0). Otherwise from a batch's start (the core idle): windows from WIN_MIN, as
 * run_refs starts them, and the first miss is the first request. ref0: the reference count at P[0]. */
static PyObject *rc_walk(Core *c, const int64_t *P, const uint8_t *W, int64_t n, int64_t i, int win,
                         double deadline, int64_t ref0, long long max_reads, int from_read) {
    int64_t g0 = from_read ? c->f_g : -1;
    int64_t lim = max_reads < 4096 ? (int64_t)max_reads : 4096;
    int64_t *spec_page = (int64_t *)malloc((size_t)(lim + 1) * 2 * sizeof(int64_t));
    int64_t *glo = (int64_t *)malloc((size_t)(lim + 2) * 2 * sizeof(int64_t));
    if (spec_page == NULL || glo == NULL) { free(spec_page); free(glo); return PyErr_NoMemory(); }
    RcGroups gr = {glo, glo + lim + 2, 0};
    /* pages resident once the program has run (page, frame): the read's own first (its page table entry
     * is written when the fault finishes) */
    int64_t n_spec = 0;
    if (from_read) {
        spec_page[0] = c->f_page;
        spec_page[1] = g0;
        n_spec = 1;
    }
    RcBuf b = {NULL, 0, 0};
    Py_ssize_t keep = 0;        /* the program up to its last read or EPT fault */
    int64_t reads = 0;
    int64_t lo = c->ks[KS_FREE_LO] < 0 ? 0 : c->ks[KS_FREE_LO], nfree = c->ks[KS_N_FREE];
    int err = rc_put(&b, deadline, c->mem_ref_us) < 0;
    int go = !err;
    /* every miss takes a frame: once the free ones run out, the walk evicts (a soft-reclaimed frame first
     * would be taken instead: the walk stops there) */
    RcPolicy pol;
    pol.on = 0;
    if (go && nfree <= lim && c->ks[KS_SOFT_HEAD] < 0 && c->n_frames <= RC_EVICT_MAX_FRAMES) {
        if (rc_policy_init(&pol, c, lim) < 0) err = 1;
        else if (from_read) rc_policy_load(&pol, c->f_page, g0, c->f_write, c->f_ref);   /* the read, once done */
    }
    uint8_t *mark = pol.on ? pol.mark : NULL;
    if (from_read && go && !c->backed[g0]) {     /* the read's frame is backed after it: the fault-around */
        int r = rc_ept(c, &b, &gr, g0);
        if (r < 0) err = 1;
        else if (r == 0) go = 0;
        else keep = b.n;
    }
    if (from_read && go && !err && rc_put(&b, RC_ADD, c->mem_ref_us) < 0) err = 1;   /* the faulting reference */
    /* one pass adds at most 4 pairs besides an EPT fault, whose room rc_ept checks */
    while (go && !err && i < n && reads < lim && b.n + 8 <= 2 * (RC_MAX_PAIRS + 1)) {
        int64_t j = i, end = win == 0 ? i + 1 : (i + win < n ? i + win : n);
        for (; j < end; j++) {
            int64_t page = P[j], g = c->gpfn[page];
            int mk = mark ? mark[page] : 0;
            if (mk == 2) break;                         /* evicted by this walk: a miss */
            if (g < 0 || mk == 1) {     /* a page this walk has loaded: its frame is backed and writable */
                g = rc_spec_frame(spec_page, n_spec, page);
                if (g < 0) break;
            } else if (!c->backed[g] || (W[j] && c->wp[g])) {
                break;
            }
            if (mark) {                 /* do_hit's marks, which the policy's next scan reads */
                pol.R[g] = 1;
                if (W[j]) pol.M[g] = 1;
                if (c->pkind == P_LRU) pol.pfr[g] = ref0 + j;
            }
        }
        if (j > i && rc_put(&b, RC_WIN, (double)(j - i)) < 0) { err = 1; break; }
        if (j == end) {
            i = end;
            win = win == 0 ? WIN_MIN : (win * 4 < WIN_MAX ? win * 4 : WIN_MAX);
            continue;
        }
        /* a miss at j: what drive() does with it, if that does not depend on the clock */
        i = j;
        int64_t page = P[i];
        if ((c->gpfn[page] >= 0 && !(mark && mark[page] == 2)) || c->cached[page] >= 0) break;
        int64_t g;
        int backed;
        if (nfree > 0) {
            while (lo < c->n_frames && !c->free_mask[lo]) lo++;
            if (lo >= c->n_frames) break;
            g = lo++;
            nfree--;
            backed = rc_backed(c, &gr, g);
            if (c->backed[g] && c->wp[g]) break;            /* a copy-on-write break first */
        } else {
            if (!mark) break;
            int64_t v = select_victim(&pol.tmp);            /* compiled policies only: never -2 */
            if (v < 0 || pol.M[v]) break;                   /* no victim, or a dirty one: its write first */
            if (!rc_backed(c, &gr, v) || c->wp[v]) break;   /* backed again, or broken, before the fill */
            int64_t vp = -1;
            for (int64_t k = n_spec - 1; k >= 0 && vp < 0; k--)
                if (spec_page[2 * k + 1] == v && spec_page[2 * k] >= 0) vp = spec_page[2 * k];
            if (vp < 0) vp = c->vpage[v];
            if (vp < 0) break;      /* (a resident frame holds a page) */
            for (int64_t k = 0; k < n_spec; k++)
                if (spec_page[2 * k] == vp) spec_page[2 * k] = -1;
            mark[vp] = 2;
            pol.gone[pol.n_gone++] = vp;
            pol.res[v] = 0;         /* PH_ALLOC, then PH_EVICT_BODY */
            pol.R[v] = 0;
            pol.M[v] = 0;
            g = v;
            backed = 1;
        }
        if (rc_put(&b, RC_CHECK, 0.0) < 0) { err = 1; break; }
        if (c->on_disk[page]) {
            int64_t blk = c->block[page];
            if (blk < 0 || blk >= c->swap_base) break;      /* a swap read may be a full overwrite (kernel.py) */
            if (rc_put(&b, RC_READ, (double)blk) < 0) { err = 1; break; }
            reads++;
            keep = b.n;
        } else if (rc_put(&b, RC_ADD, c->zero_fill_us) < 0) {
            err = 1;
            break;
        }
        if (!backed) {              /* backed after the read or the zero fill: the fault-around */
            int r = rc_ept(c, &b, &gr, g);
            if (r < 0) { err = 1; break; }
            if (r == 0) break;
            keep = b.n;
        }
        if (rc_put(&b, RC_ADD, c->mem_ref_us) < 0) { err = 1; break; }
        if (mark) rc_policy_load(&pol, page, g, W[i], ref0 + i);
        spec_page[2 * n_spec] = page;
        spec_page[2 * n_spec + 1] = g;
        n_spec++;
        if (n_spec > lim) break;
        i++;
        win = 0;
    }
    if (pol.on) rc_policy_free(&pol, spec_page, n_spec);
    free(spec_page);
    free(glo);
    PyObject *out = NULL;
    if (!err) {
        if (keep == 0) { Py_INCREF(Py_None); out = Py_None; }
        else out = PyBytes_FromStringAndSize((const char *)b.v, keep * (Py_ssize_t)sizeof(double));
    }
    free(b.v);
    return out;
}

static PyObject *Core_lookahead(Core *c, PyObject *args) {
    long long max_reads;
    if (!PyArg_ParseTuple(args, "L", &max_reads)) return NULL;
    if (c->phase != PH_READ_DONE || c->disk_local || c->pkind == P_PY || max_reads < 1) Py_RETURN_NONE;
    if (c->backed[c->f_g] && c->wp[c->f_g]) Py_RETURN_NONE;      /* broken (copy-on-write) after the read */
    return rc_walk(c, c->P, c->W, c->n, c->i + 1, 0, c->has_deadline ? c->deadline : INFINITY,
                   c->ctr[C_REFS] - c->i, max_reads, 1);
}

/* The walk from the start of a batch the core has not started (start(pages, writes, deadline) would run
 * it next, with nothing changed in between): the requests it certainly makes first, as the same program,
 * for a host to serve before the batch runs (TickDone.ahead). None: no request to chain, or a state the
 * walk does not cover (a Python policy, a local disk, ESC's bitmap out of date). */
static PyObject *Core_lookahead_batch(Core *c, PyObject *args) {
    PyObject *pages, *writes;
    double deadline;
    long long max_reads;
    if (!PyArg_ParseTuple(args, "OOdL", &pages, &writes, &deadline, &max_reads)) return NULL;
    if (c->phase != PH_IDLE || c->have_batch || c->disk_local || c->pkind == P_PY || max_reads < 1
            || (c->pkind == P_ESC && c->pst[PS_DIRTY]))
        Py_RETURN_NONE;
    Py_buffer pv, wv;
    if (PyObject_GetBuffer(pages, &pv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(writes, &wv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&pv);
        return NULL;
    }
    PyObject *out = NULL;
    if (check_batch(c, &pv, &wv) == 0)
        out = rc_walk(c, (const int64_t *)pv.buf, (const uint8_t *)wv.buf, pv.len / 8, 0, WIN_MIN, deadline,
                      c->ctr[C_REFS], max_reads, 0);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&wv);
    return out;
}

static PyMethodDef Core_methods[] = {
    {"start", (PyCFunction)Core_start, METH_VARARGS,
     "start(pages int64, writes bool, deadline_us float|None) -> (op, a, b): run a batch until done or an await"},
    {"resume_ept", (PyCFunction)Core_resume_ept, METH_VARARGS, "resume_ept(tokens uint64, done_vt_us)"},
    {"resume_cow", (PyCFunction)Core_resume_cow, METH_VARARGS,
     "resume_cow(token, done_vt_us): the copy-on-write break of ept_gs[0] is done (token: what it holds)"},
    {"resume_read", (PyCFunction)Core_resume_read, METH_VARARGS, "resume_read(token, done_vt_us)"},
    {"count_fresh", (PyCFunction)Core_count_fresh, METH_VARARGS,
     "count_fresh(n) -> how many of the fault's first n gpfns hold no page (free, not soft-reclaimed)"},
    {"replay", (PyCFunction)Core_replay, METH_VARARGS,
     "replay(chained, gate_us, fresh_ok) -> (op, a, b, used): the answers ahead (last first) the core's reads "
     "and EPT faults match, taken in the core"},
    {"resume_write", (PyCFunction)Core_resume_write, METH_VARARGS, "resume_write(done_vt_us)"},
    {"resume_oom", (PyCFunction)Core_resume_oom, METH_NOARGS, "resume_oom(): the OOM hook ran, try again"},
    {"abort", (PyCFunction)Core_abort, METH_NOARGS, "abort(): drop the batch in progress"},
    {"lookahead", (PyCFunction)Core_lookahead, METH_VARARGS,
     "lookahead(max_reads) -> bytes|None: after OP_READ, the read chain that certainly follows (see above)"},
    {"lookahead_batch", (PyCFunction)Core_lookahead_batch, METH_VARARGS,
     "lookahead_batch(pages, writes, deadline, max_reads) -> bytes|None: the first requests of a batch not started"},
    {"esc_rebuild", (PyCFunction)Core_esc_rebuild, METH_NOARGS, "esc_rebuild(): recompute ESC's (0,0) bitmap"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "balloonlab.guestd._paging.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled paging core of one GuestKernel (see guestd/kernel.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_methods = Core_methods,
};

/* ------------------------------------------------------------------ workload batches
 *
 * A vCPU batch of a few hundred references is built every tick of every guest (guestd.workload.generators):
 * with numpy, a dozen calls on arrays of that size, each costing more than its work. These do the
 * per-reference steps in one pass; the random draws stay numpy's (the caller draws them), so the
 * references are the same to the last bit (tests/test_guestrt_workload.py holds both paths equal). */

static int get_buf(PyObject *obj, Py_buffer *v, Py_ssize_t itemsize, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (itemsize && v->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "paging: %s has items of %zd bytes, want %zd", what, v->itemsize, itemsize);
        PyBuffer_Release(v);
        return -1;
    }
    return 0;
}

/* searchsorted(cdf, u, side="right"): the first index whose entry is > u */
static inline int64_t upper_bound(const double *cdf, int64_t m, double u) {
    int64_t lo = 0, hi = m;
    while (lo < hi) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if (cdf[mid] <= u) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Mix's component of a draw u: the first CDF entry above u (m: past the last entry, which numpy would not
 * index: the callers refuse it) */
static inline int64_t mix_part(const double *cdf, int64_t m, double u) {
    int64_t j = 0;
    while (j < m && cdf[j] <= u) j++;
    return j;
}

/* the zipf page rank of a draw x in [0, 1): the guide table's bucket (answer[K], int16/32/64 by isz; < 0 where
 * a bucket holds a CDF entry, then searchsorted), capped at the last of ``pages`` ranks */
static inline int64_t zipf_rank(const void *answer, int64_t isz, double k, const double *cdf, int64_t m,
                                int64_t pages, double x) {
    int64_t b = (int64_t)(x * k), r;
    r = isz == 2 ? ((const int16_t *)answer)[b] : isz == 4 ? ((const int32_t *)answer)[b]
                                                           : ((const int64_t *)answer)[b];
    if (r < 0) r = upper_bound(cdf, m, x);
    return r > pages - 1 ? pages - 1 : r;
}

/* mix_pick(u float64[n], cdf float64[m], pick uint8[n] out, counts int64[m] out): Mix's component of each
 * reference, cdf.searchsorted(u, side="right") over a CDF of a few entries (its last is 1 > every u) */
static PyObject *mod_mix_pick(PyObject *self, PyObject *args) {
    PyObject *uo, *co, *po, *no;
    if (!PyArg_ParseTuple(args, "OOOO", &uo, &co, &po, &no)) return NULL;
    Py_buffer u, cdf, pick, counts;
    if (get_buf(uo, &u, 8, 0, "u") < 0) return NULL;
    if (get_buf(co, &cdf, 8, 0, "cdf") < 0) { PyBuffer_Release(&u); return NULL; }
    if (get_buf(po, &pick, 1, 1, "pick") < 0) { PyBuffer_Release(&u); PyBuffer_Release(&cdf); return NULL; }
    if (get_buf(no, &counts, 8, 1, "counts") < 0) {
        PyBuffer_Release(&u); PyBuffer_Release(&cdf); PyBuffer_Release(&pick); return NULL;
    }
    int64_t n = u.len / 8, m = cdf.len / 8;
    PyObject *ret = NULL;
    if (pick.len < n || counts.len / 8 != m || m < 1 || m > 255) {
        PyErr_SetString(PyExc_ValueError, "paging: mix_pick needs pick of len(u) and counts of len(cdf) <= 255");
    } else {
        const double *U = (const double *)u.buf, *C = (const double *)cdf.buf;
        uint8_t *P = (uint8_t *)pick.buf;
        int64_t *N = (int64_t *)counts.buf;
        memset(N, 0, (size_t)m * 8);
        for (int64_t i = 0; i < n; i++) {
            int64_t j = mix_part(C, m, U[i]);
            if (j >= m) {   /* past the last entry: no component of that number (numpy would index past it) */
                PyErr_Format(PyExc_ValueError, "paging: mix_pick draw %g is not below the CDF's end", U[i]);
                goto done;
            }
            P[i] = (uint8_t)j;
            N[j]++;
        }
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    PyBuffer_Release(&u); PyBuffer_Release(&cdf); PyBuffer_Release(&pick); PyBuffer_Release(&counts);
    return ret;
}

/* mix_gather(pick uint8[n], parts ((pages u64, writes 1-byte) or None per component), pages u64[n] out,
 * writes 1-byte[n] out) -> k: the k-th reference of component j goes where j is picked for the k-th time;
 * the slots of a component that ran dry (fewer references than picks) are left out, the rest close up */
static PyObject *mod_mix_gather(PyObject *self, PyObject *args) {
    PyObject *po, *parts, *pgo, *wo;
    if (!PyArg_ParseTuple(args, "OO!OO", &po, &PyTuple_Type, &parts, &pgo, &wo)) return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(parts);
    if (m > 255) { PyErr_SetString(PyExc_ValueError, "paging: mix_gather of more than 255 parts"); return NULL; }
    Py_buffer pick, pages, writes, pp[256], pw[256];
    int64_t got[256], used[256];
    const uint64_t *PP[256];
    const uint8_t *PW[256];
    Py_ssize_t nb = 0;
    PyObject *ret = NULL;
    if (get_buf(po, &pick, 1, 0, "pick") < 0) return NULL;
    if (get_buf(pgo, &pages, 8, 1, "pages") < 0) { PyBuffer_Release(&pick); return NULL; }
    if (get_buf(wo, &writes, 1, 1, "writes") < 0) { PyBuffer_Release(&pick); PyBuffer_Release(&pages); return NULL; }
    for (nb = 0; nb < m; nb++) {
        PyObject *part = PyTuple_GET_ITEM(parts, nb);
        got[nb] = 0;
        used[nb] = 0;
        if (part == Py_None) {
            pp[nb].obj = NULL;
            pw[nb].obj = NULL;
            continue;
        }
        if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 2) {
            PyErr_SetString(PyExc_ValueError, "paging: mix_gather parts are (pages, writes) or None");
            goto done;
        }
        if (get_buf(PyTuple_GET_ITEM(part, 0), &pp[nb], 8, 0, "part pages") < 0) goto done;
        if (get_buf(PyTuple_GET_ITEM(part, 1), &pw[nb], 1, 0, "part writes") < 0) {
            PyBuffer_Release(&pp[nb]);
            goto done;
        }
        got[nb] = pp[nb].len / 8;
        if (pw[nb].len < got[nb]) {
            PyErr_SetString(PyExc_ValueError, "paging: mix_gather part with fewer writes than pages");
            PyBuffer_Release(&pp[nb]); PyBuffer_Release(&pw[nb]);
            goto done;
        }
        PP[nb] = (const uint64_t *)pp[nb].buf;
        PW[nb] = (const uint8_t *)pw[nb].buf;
    }
    {
        int64_t n = pick.len, k = 0;
        if (pages.len / 8 < n || writes.len < n) {
            PyErr_SetString(PyExc_ValueError, "paging: mix_gather outputs shorter than pick");
            goto done;
        }
        const uint8_t *P = (const uint8_t *)pick.buf;
        uint64_t *OP = (uint64_t *)pages.buf;
        uint8_t *OW = (uint8_t *)writes.buf;
        for (int64_t i = 0; i < n; i++) {
            int j = P[i];
            if (j >= m) { PyErr_Format(PyExc_ValueError, "paging: mix_gather pick %d of %zd parts", j, m); goto done; }
            int64_t r = used[j]++;
            if (r < got[j]) { OP[k] = PP[j][r]; OW[k] = PW[j][r]; k++; }
        }
        ret = PyLong_FromLongLong(k);
    }
done:
    for (Py_ssize_t j = 0; j < nb; j++)
        if (pp[j].obj != NULL) { PyBuffer_Release(&pp[j]); PyBuffer_Release(&pw[j]); }
    PyBuffer_Release(&pick); PyBuffer_Release(&pages); PyBuffer_Release(&writes);
    return ret;
}

/* zipf_pages(u float64[n], answer int16|int32|int64[K], cdf float64[m], page_of_rank u64[m], out u64[n]):
 * CdfTable(u) (the guide table, searchsorted where a bucket holds a CDF entry), capped at the last rank,
 * through the rank->page permutation */
static PyObject *mod_zipf_pages(PyObject *self, PyObject *args) {
    PyObject *uo, *ao, *co, *ro, *oo;
    if (!PyArg_ParseTuple(args, "OOOOO", &uo, &ao, &co, &ro, &oo)) return NULL;
    Py_buffer u, ans, cdf, rank, out;
    PyObject *ret = NULL;
    if (get_buf(uo, &u, 8, 0, "u") < 0) return NULL;
    if (get_buf(ao, &ans, 0, 0, "answer") < 0) { PyBuffer_Release(&u); return NULL; }
    if (get_buf(co, &cdf, 8, 0, "cdf") < 0) { PyBuffer_Release(&u); PyBuffer_Release(&ans); return NULL; }
    if (get_buf(ro, &rank, 8, 0, "page_of_rank") < 0) {
        PyBuffer_Release(&u); PyBuffer_Release(&ans); PyBuffer_Release(&cdf); return NULL;
    }
    if (get_buf(oo, &out, 8, 1, "out") < 0) {
        PyBuffer_Release(&u); PyBuffer_Release(&ans); PyBuffer_Release(&cdf); PyBuffer_Release(&rank); return NULL;
    }
    int64_t n = u.len / 8, m = cdf.len / 8, isz = ans.itemsize, K = isz ? ans.len / isz : 0, pages = rank.len / 8;
    if ((isz != 2 && isz != 4 && isz != 8) || K < 1 || (K & (K - 1)) || out.len / 8 < n || pages < 1) {
        PyErr_SetString(PyExc_ValueError, "paging: zipf_pages needs a power-of-two table of int16/32/64, "
                        "a rank permutation and out of len(u)");
        goto done;
    }
    {
        const double *U = (const double *)u.buf, *C = (const double *)cdf.buf;
        const uint64_t *R = (const uint64_t *)rank.buf;
        uint64_t *O = (uint64_t *)out.buf;
        const double k = (double)K;
        for (int64_t i = 0; i < n; i++) {
            double x = U[i];
            if (!(x >= 0.0 && x < 1.0)) {
                PyErr_Format(PyExc_ValueError, "paging: zipf_pages draw %g outside [0, 1)", x);
                goto done;
            }
            O[i] = R[zipf_rank(ans.buf, isz, k, C, m, pages, x)];
        }
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    PyBuffer_Release(&u); PyBuffer_Release(&ans); PyBuffer_Release(&cdf); PyBuffer_Release(&rank);
    PyBuffer_Release(&out);
    return ret;
}

/* the non-zero bytes of p[0..n): eight at a time, each made 0 or 1, then a popcount */
static int64_t count_nonzero_bytes(const uint8_t *p, int64_t n) {
    int64_t c = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, p + i, 8);
        x |= x >> 4;
        x |= x >> 2;
        x |= x >> 1;
        c += __builtin_popcountll(x & 0x0101010101010101ull);
    }
    for (; i < n; i++) c += p[i] != 0;
    return c;
}

/* frame_gauges(kind uint8[n], backed uint8[n], wp uint8[n], cached int64[m], out int64[k+3]): the frames of
 * each kind 0..k-1 (np.bincount), the backed ones, the write-protected ones, and the pages whose frame was
 * soft-reclaimed (cached >= 0): the tick-end gauges in one pass instead of four numpy calls */
static PyObject *mod_frame_gauges(PyObject *self, PyObject *args) {
    PyObject *ko, *bo, *wo, *co, *oo;
    if (!PyArg_ParseTuple(args, "OOOOO", &ko, &bo, &wo, &co, &oo)) return NULL;
    Py_buffer kind, backed, wp, cached, out;
    PyObject *ret = NULL;
    if (get_buf(ko, &kind, 1, 0, "kind") < 0) return NULL;
    if (get_buf(bo, &backed, 1, 0, "backed") < 0) { PyBuffer_Release(&kind); return NULL; }
    if (get_buf(wo, &wp, 1, 0, "wp") < 0) { PyBuffer_Release(&kind); PyBuffer_Release(&backed); return NULL; }
    if (get_buf(co, &cached, 8, 0, "cached") < 0) {
        PyBuffer_Release(&kind); PyBuffer_Release(&backed); PyBuffer_Release(&wp); return NULL;
    }
    if (get_buf(oo, &out, 8, 1, "out") < 0) {
        PyBuffer_Release(&kind); PyBuffer_Release(&backed); PyBuffer_Release(&wp); PyBuffer_Release(&cached);
        return NULL;
    }
    int64_t n = kind.len, k = out.len / 8 - 3, m = cached.len / 8;
    if (k < 1 || k > 8 || backed.len != n || wp.len != n) {
        PyErr_SetString(PyExc_ValueError, "paging: frame_gauges needs kind, backed, wp of one length and out of k+3 "
                        "(k <= 8)");
        goto done;
    }
    {
        const uint8_t *K = (const uint8_t *)kind.buf, *B = (const uint8_t *)backed.buf, *W = (const uint8_t *)wp.buf;
        const int64_t *C = (const int64_t *)cached.buf;
        int64_t *O = (int64_t *)out.buf, nb = 0, nw = 0, nc = 0;
        /* four histograms, one per frame mod 4: neighbours of one kind (the usual run) do not wait for
         * each other's increment */
        int64_t h[4][8];
        uint8_t top = 0;
        memset(h, 0, sizeof(h));
        int64_t i = 0;
        for (; i + 4 <= n; i += 4) {
            uint8_t a = K[i], b = K[i + 1], c = K[i + 2], d = K[i + 3];
            top |= a | b | c | d;
            h[0][a & 7]++;
            h[1][b & 7]++;
            h[2][c & 7]++;
            h[3][d & 7]++;
        }
        for (; i < n; i++) {
            top |= K[i];
            h[0][K[i] & 7]++;
        }
        if (top >= k) {     /* (an OR bounds the largest kind from above: look for one that is out of range) */
            for (i = 0; i < n; i++) {
                if (K[i] >= k) {
                    PyErr_Format(PyExc_ValueError, "paging: frame_gauges: frame %lld has kind %d of %lld",
                                 (long long)i, K[i], (long long)k);
                    goto done;
                }
            }
        }
        memset(O, 0, (size_t)(k + 3) * 8);
        for (int v = 0; v < (int)k; v++) O[v] = h[0][v] + h[1][v] + h[2][v] + h[3][v];
        nb = count_nonzero_bytes(B, n);
        nw = count_nonzero_bytes(W, n);
        for (i = 0; i < m; i++) nc += C[i] >= 0;
        O[k] = nb;
        O[k + 1] = nw;
        O[k + 2] = nc;
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    PyBuffer_Release(&kind); PyBuffer_Release(&backed); PyBuffer_Release(&wp); PyBuffer_Release(&cached);
    PyBuffer_Release(&out);
    return ret;
}

/* numpy's bit generator interface (numpy/random/bitgen.h, public): a BitGenerator's ``capsule`` holds it */
typedef struct {
    void *state;
    uint64_t (*next_uint64)(void *st);
    uint32_t (*next_uint32)(void *st);
    double (*next_double)(void *st);
    uint64_t (*next_raw)(void *st);
} np_bitgen_t;

static np_bitgen_t *get_bitgen(PyObject *capsule) {
    return (np_bitgen_t *)PyCapsule_GetPointer(capsule, "BitGenerator");
}

/* a uniform integer in [0, rng] (rng < 2**32 - 1) from 32-bit draws, by Lemire's multiply-and-reject
 * (arXiv:1805.10941): what Generator.integers draws for a range that fits in 32 bits. The module checks
 * that against numpy itself before it uses it (generators.py) */
static inline uint32_t bounded_u32(np_bitgen_t *g, uint32_t rng) {
    const uint32_t s = rng + 1;
    uint64_t m = (uint64_t)g->next_uint32(g->state) * s;
    uint32_t low = (uint32_t)m;
    if (low < s) {
        const uint32_t floor = (uint32_t)(0u - s) % s;
        while (low < floor) {
            m = (uint64_t)g->next_uint32(g->state) * s;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

#define DRAW_ZIPF 0
#define DRAW_UNIFORM 1

/* one component's references for mix_draw: k pages into P, k write flags into W, drawn as its next_batch
 * draws them (pages first, then the writes, none when write_frac <= 0) */
static int draw_part(PyObject *spec, int64_t k, uint64_t *P, uint8_t *W) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 2) {
        PyErr_SetString(PyExc_ValueError, "paging: mix_draw spec is (kind, capsule, ...)");
        return -1;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    np_bitgen_t *g = get_bitgen(PyTuple_GET_ITEM(spec, 1));
    if (g == NULL || (kind == -1 && PyErr_Occurred())) return -1;
    double frac;
    if (kind == DRAW_ZIPF && PyTuple_GET_SIZE(spec) == 6) {
        Py_buffer ans, cdf, rank;
        frac = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 5));
        if (frac == -1.0 && PyErr_Occurred()) return -1;
        if (get_buf(PyTuple_GET_ITEM(spec, 2), &ans, 0, 0, "answer") < 0) return -1;
        if (get_buf(PyTuple_GET_ITEM(spec, 3), &cdf, 8, 0, "cdf") < 0) { PyBuffer_Release(&ans); return -1; }
        if (get_buf(PyTuple_GET_ITEM(spec, 4), &rank, 8, 0, "page_of_rank") < 0) {
            PyBuffer_Release(&ans); PyBuffer_Release(&cdf); return -1;
        }
        int64_t isz = ans.itemsize, K = isz ? ans.len / isz : 0, m = cdf.len / 8, pages = rank.len / 8;
        int bad = (isz != 2 && isz != 4 && isz != 8) || K < 1 || (K & (K - 1)) || pages < 1;
        if (!bad) {
            const double *C = (const double *)cdf.buf, kk = (double)K;
            const uint64_t *R = (const uint64_t *)rank.buf;
            for (int64_t i = 0; i < k; i++) {      /* as zipf_pages over rng.random(k) */
                P[i] = R[zipf_rank(ans.buf, isz, kk, C, m, pages, g->next_double(g->state))];
            }
        }
        PyBuffer_Release(&ans); PyBuffer_Release(&cdf); PyBuffer_Release(&rank);
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "paging: mix_draw zipf spec needs a power-of-two table and ranks");
            return -1;
        }
    } else if (kind == DRAW_UNIFORM && PyTuple_GET_SIZE(spec) == 5) {
        unsigned long long start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(spec, 2));
        unsigned long long ws = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(spec, 3));
        frac = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 4));
        if (PyErr_Occurred()) return -1;
        if (ws < 1 || ws - 1 >= 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_ValueError, "paging: mix_draw uniform spec needs 1 <= ws < 2**32");
            return -1;
        }
        if (ws == 1) {
            for (int64_t i = 0; i < k; i++) P[i] = start;      /* a range of one value draws nothing */
        } else {
            for (int64_t i = 0; i < k; i++) P[i] = start + bounded_u32(g, (uint32_t)(ws - 1));
        }
    } else {
        PyErr_Format(PyExc_ValueError, "paging: mix_draw spec of unknown kind %ld", kind);
        return -1;
    }
    if (frac <= 0.0) {
        memset(W, 0, (size_t)k);
    } else {
        for (int64_t i = 0; i < k; i++) W[i] = g->next_double(g->state) < frac;
    }
    return 0;
}

/* mix_draw(capsule, cdf float64[m], specs (one per component), pages u64[n] out, writes 1-byte[n] out): Mix's
 * batch of n references in one pass, drawn from the generators' own streams in numpy's order (the mix's
 * n picks, then each component in turn, its pages then its writes) and placed as mix_gather places them:
 * the per-batch numpy calls and Python frames of every tick of every guest, in one call */
static PyObject *mod_mix_draw(PyObject *self, PyObject *args) {
    PyObject *mcap, *co, *specs, *pgo, *wo;
    if (!PyArg_ParseTuple(args, "OOO!OO", &mcap, &co, &PyTuple_Type, &specs, &pgo, &wo)) return NULL;
    np_bitgen_t *mg = get_bitgen(mcap);
    if (mg == NULL) return NULL;
    Py_ssize_t m = PyTuple_GET_SIZE(specs);
    Py_buffer cdf, pages, writes;
    if (get_buf(co, &cdf, 8, 0, "cdf") < 0) return NULL;
    if (get_buf(pgo, &pages, 8, 1, "pages") < 0) { PyBuffer_Release(&cdf); return NULL; }
    if (get_buf(wo, &writes, 1, 1, "writes") < 0) { PyBuffer_Release(&cdf); PyBuffer_Release(&pages); return NULL; }
    PyObject *ret = NULL;
    int64_t n = pages.len / 8;
    uint8_t *pick = NULL, *tw = NULL;
    uint64_t *tp = NULL;
    int64_t counts[256], seg[256];
    if (cdf.len / 8 != m || m < 1 || m > 255 || writes.len != n) {
        PyErr_SetString(PyExc_ValueError, "paging: mix_draw needs one spec per CDF entry (<= 255), writes of len(pages)");
        goto done;
    }
    pick = (uint8_t *)malloc((size_t)n + 1);
    tw = (uint8_t *)malloc((size_t)n + 1);
    tp = (uint64_t *)malloc((size_t)n * 8 + 8);
    if (pick == NULL || tw == NULL || tp == NULL) { PyErr_NoMemory(); goto done; }
    {
        const double *C = (const double *)cdf.buf;
        memset(counts, 0, sizeof(counts));
        for (int64_t i = 0; i < n; i++) {     /* as mix_pick over rng.random(n) */
            double u = mg->next_double(mg->state);
            int64_t j = mix_part(C, m, u);
            if (j >= m) {
                PyErr_Format(PyExc_ValueError, "paging: mix_draw draw %g is not below the CDF's end", u);
                goto done;
            }
            pick[i] = (uint8_t)j;
            counts[j]++;
        }
        int64_t at = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            seg[j] = at;
            if (counts[j] && draw_part(PyTuple_GET_ITEM(specs, j), counts[j], tp + at, tw + at) < 0) goto done;
            at += counts[j];
        }
        uint64_t *OP = (uint64_t *)pages.buf;
        uint8_t *OW = (uint8_t *)writes.buf;
        for (int64_t i = 0; i < n; i++) {
            int64_t r = seg[pick[i]]++;
            OP[i] = tp[r];
            OW[i] = tw[r];
        }
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    free(pick); free(tw); free(tp);
    PyBuffer_Release(&cdf); PyBuffer_Release(&pages); PyBuffer_Release(&writes);
    return ret;
}

/* eight bytes as eight bits, the first byte in the high bit (np.packbits of one byte's worth): each byte
 * made 0 or 1 (any non-zero byte counts), then gathered into the top byte by one multiply */
static inline uint8_t pack8(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    if (x == 0) return 0;
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    x &= 0x0101010101010101ull;
    /* little-endian: byte j (bit 8j) must land on bit 63-j, a shift of 63-9j; the multiplier's bits
     * 0, 9, ..., 63 shift every byte at once, and no two partial products meet (so nothing carries) */
    return (uint8_t)((x * 0x8040201008040201ull) >> 56);
}

/* take_ad_bits(accessed 1-byte[n], dirty 1-byte[n]) -> (bytes, bytes): np.packbits of each (the first frame in
 * a byte's high bit, the last byte padded with zeros), then both cleared: the EPT A/D bits every TickDone
 * carries, in one pass instead of six numpy calls */
static PyObject *mod_take_ad_bits(PyObject *self, PyObject *args) {
    PyObject *ao, *dob;
    if (!PyArg_ParseTuple(args, "OO", &ao, &dob)) return NULL;
    Py_buffer a, d;
    if (get_buf(ao, &a, 1, 1, "accessed") < 0) return NULL;
    if (get_buf(dob, &d, 1, 1, "dirty") < 0) { PyBuffer_Release(&a); return NULL; }
    PyObject *ret = NULL, *pa = NULL, *pd = NULL;
    int64_t n = a.len;
    if (d.len != n) {
        PyErr_SetString(PyExc_ValueError, "paging: take_ad_bits needs accessed and dirty of one length");
        goto done;
    }
    {
        Py_ssize_t nb = (Py_ssize_t)((n + 7) / 8);
        pa = PyBytes_FromStringAndSize(NULL, nb);
        pd = PyBytes_FromStringAndSize(NULL, nb);
        if (pa == NULL || pd == NULL) goto done;
        uint8_t *A = (uint8_t *)a.buf, *D = (uint8_t *)d.buf;
        uint8_t *OA = (uint8_t *)PyBytes_AS_STRING(pa), *OD = (uint8_t *)PyBytes_AS_STRING(pd);
        memset(OA, 0, (size_t)nb);
        memset(OD, 0, (size_t)nb);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {     /* eight frames a byte at a time (most words of D are zero) */
            OA[i >> 3] = pack8(A + i);
            OD[i >> 3] = pack8(D + i);
        }
        for (; i < n; i++) {
            OA[i >> 3] |= (uint8_t)((A[i] != 0) << (7 - (i & 7)));
            OD[i >> 3] |= (uint8_t)((D[i] != 0) << (7 - (i & 7)));
        }
        memset(A, 0, (size_t)n);
        memset(D, 0, (size_t)n);
        ret = PyTuple_Pack(2, pa, pd);
    }
done:
    Py_XDECREF(pa);
    Py_XDECREF(pd);
    PyBuffer_Release(&a); PyBuffer_Release(&d);
    return ret;
}

/* page_range(pages 8-byte[n], signed) -> (lo, hi): the smallest and the largest entry (int64 when signed, else
 * uint64) in one pass: the bounds check of every batch of references, instead of two numpy reductions */
static PyObject *mod_page_range(PyObject *self, PyObject *args) {
    PyObject *po;
    int is_signed;
    if (!PyArg_ParseTuple(args, "Op", &po, &is_signed)) return NULL;
    Py_buffer p;
    if (get_buf(po, &p, 8, 0, "pages") < 0) return NULL;
    PyObject *ret = NULL;
    int64_t n = p.len / 8;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "paging: page_range of no pages");
    } else if (is_signed) {
        const int64_t *P = (const int64_t *)p.buf;
        int64_t lo = P[0], hi = P[0];
        for (int64_t i = 1; i < n; i++) {
            if (P[i] < lo) lo = P[i];
            if (P[i] > hi) hi = P[i];
        }
        ret = Py_BuildValue("(LL)", (long long)lo, (long long)hi);
    } else {
        const uint64_t *P = (const uint64_t *)p.buf;
        uint64_t lo = P[0], hi = P[0];
        for (int64_t i = 1; i < n; i++) {
            if (P[i] < lo) lo = P[i];
            if (P[i] > hi) hi = P[i];
        }
        ret = Py_BuildValue("(KK)", (unsigned long long)lo, (unsigned long long)hi);
    }
    PyBuffer_Release(&p);
    return ret;
}

/* ahead_answers(prog, tokens, times) -> list, or None.
 *
 * GuestKernel.answered_ahead's replay list in one pass: for the first m = len(times) // 2 requests of
 * the read-chain program prog (a block for each READ, a tuple of the EPT_PAGEs before it for each EPT, as
 * _asked gives them), (request, start, completion, its tokens as a list of ints), last first. tokens: the
 * host's uint64 tokens, 1 per read and n per fault of n pages. None when the answers do not fit the
 * program (an odd number of times, more requests answered than asked, the wrong number of tokens): the
 * Python replay then says how. */
static PyObject *mod_ahead_answers(PyObject *self, PyObject *args) {
    Py_buffer pv, tv;
    PyObject *times;
    if (!PyArg_ParseTuple(args, "y*y*O!", &pv, &tv, &PyList_Type, &times)) return NULL;
    PyObject *out = NULL, *item = NULL;
    Py_ssize_t n_times = PyList_GET_SIZE(times), m = n_times / 2, n_tok = tv.len / 8;
    Py_ssize_t n_vals = pv.len / 8, pairs = n_vals >= 2 ? (n_vals - 2) / 2 : 0;
    const unsigned char *raw = pv.buf;
    const unsigned char *traw = tv.buf;
    /* the first m requests: where each is, and how many tokens it takes */
    Py_ssize_t *at = NULL, *size = NULL, *first_page = NULL;
    if ((n_times & 1) || (tv.len & 7) || pv.len % 8) goto fit;
    at = PyMem_Malloc(sizeof(Py_ssize_t) * (m + 1));
    size = PyMem_Malloc(sizeof(Py_ssize_t) * (m + 1));
    first_page = PyMem_Malloc(sizeof(Py_ssize_t) * (m + 1));
    if (at == NULL || size == NULL || first_page == NULL) { PyErr_NoMemory(); goto done; }
    Py_ssize_t found = 0, pages_from = -1, n_pages = 0, want_tokens = 0;
    for (Py_ssize_t i = 0; i < pairs && found < m; i++) {
        double op;
        memcpy(&op, raw + 8 * (2 + 2 * i), 8);
        if (op == RC_READ) {
            at[found] = i; size[found] = 1; first_page[found] = -1; found++;
            want_tokens += 1;
        } else if (op == RC_EPT_PAGE) {
            if (!n_pages) pages_from = i;
            n_pages++;
        } else if (op == RC_EPT) {
            at[found] = i; size[found] = n_pages; first_page[found] = n_pages ? pages_from : -1; found++;
            want_tokens += n_pages;
            n_pages = 0;
        }
    }
    if (found < m || want_tokens != n_tok) goto fit;
    out = PyList_New(m);
    if (out == NULL) goto done;
    Py_ssize_t tk = 0;
    for (Py_ssize_t r = 0; r < m; r++) {
        double x;
        PyObject *want;
        if (first_page[r] < 0 && size[r] == 1) {          /* a read: its block */
            memcpy(&x, raw + 8 * (2 + 2 * at[r] + 1), 8);
            want = PyLong_FromDouble(x);
        } else {                                         /* a fault: its gpfns, the EPT_PAGEs before it */
            want = PyTuple_New(size[r]);
            Py_ssize_t got = 0;
            for (Py_ssize_t i = first_page[r]; want != NULL && got < size[r]; i++) {
                double op;
                memcpy(&op, raw + 8 * (2 + 2 * i), 8);
                if (op != RC_EPT_PAGE) continue;        /* (a READ among them belongs to the READ) */
                memcpy(&x, raw + 8 * (2 + 2 * i + 1), 8);
                PyObject *g = PyLong_FromDouble(x);
                if (g == NULL) { Py_CLEAR(want); break; }
                PyTuple_SET_ITEM(want, got++, g);
            }
        }
        if (want == NULL) goto done;
        PyObject *toks = PyList_New(size[r]);
        if (toks == NULL) { Py_DECREF(want); goto done; }
        for (Py_ssize_t j = 0; j < size[r]; j++, tk++) {
            uint64_t t;
            memcpy(&t, traw + 8 * tk, 8);
            PyObject *o = PyLong_FromUnsignedLongLong(t);
            if (o == NULL) { Py_DECREF(want); Py_DECREF(toks); goto done; }
            PyList_SET_ITEM(toks, j, o);
        }
        PyObject *start = PyList_GET_ITEM(times, 2 * r), *done_t = PyList_GET_ITEM(times, 2 * r + 1);
        item = PyTuple_Pack(4, want, start, done_t, toks);
        Py_DECREF(want);
        Py_DECREF(toks);
        if (item == NULL) goto done;
        PyList_SET_ITEM(out, m - 1 - r, item);          /* last first */
        item = NULL;
    }
    goto done;
fit:
    out = Py_None;
    Py_INCREF(out);
done:
    if (PyErr_Occurred()) Py_CLEAR(out);
    PyMem_Free(at);
    PyMem_Free(size);
    PyMem_Free(first_page);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&tv);
    return out;
}

/* audit_places(gpfn, cached, expect, on_disk, block, version, vpage, kind, backed, token, balloon_pages,
 *              first, end) -> None, or (ram_gpfns, ram_tokens, ram_backed, disk_blocks, disk_tokens,
 *              balloon_gpfns, counts)
 *
 * guestd.audit.self_check and audit_reply's window [first, end) in one pass over pages and frames, for a
 * guest whose books hold: None as soon as one of self_check's conditions fails (the Python check then
 * names it). The arrays are bytes of little-endian u64 (ram_backed: one byte each), ram entries in gpfn
 * order, disk entries in page order, balloon frames ascending, as audit_reply sends them; counts:
 * (resident, soft, disk_only, host_took, balloon frames). Page arrays: gpfn, cached, block, version int64,
 * expect uint64, on_disk bool; frame arrays: vpage int64, kind uint8, backed bool, token uint64. */
#define AUD_FREE 0
#define AUD_ANON 1
#define AUD_FILE 2
#define AUD_BALLOON 3
static PyObject *mod_audit_places(PyObject *self, PyObject *args) {
    PyObject *o[10];
    long long balloon_pages, first, end;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLLL", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &balloon_pages, &first, &end))
        return NULL;
    static const Py_ssize_t sizes[10] = {8, 8, 8, 1, 8, 8, 8, 1, 1, 8};
    static const char *names[10] = {"gpfn", "cached", "expect", "on_disk", "block", "version", "vpage", "kind",
                                    "backed", "token"};
    Py_buffer b[10];
    int got = 0;
    PyObject *ret = NULL;
    uint8_t *mark = NULL;          /* per frame: 1 resident, 2 soft; then per block: seen */
    int64_t *page_of = NULL;       /* per frame: the page it holds for the audit, -1 none */
    PyObject *ram_g = NULL, *ram_t = NULL, *ram_b = NULL, *disk_b = NULL, *disk_t = NULL, *bal = NULL;
    for (; got < 10; got++)
        if (get_buf(o[got], &b[got], sizes[got], 0, names[got]) < 0) goto done;
    {
        const int64_t n = b[0].len / 8, nf = b[6].len / 8;
        if (b[1].len / 8 != n || b[2].len / 8 != n || b[3].len != n || b[4].len / 8 != n || b[5].len / 8 != n
            || b[7].len != nf || b[8].len != nf || b[9].len / 8 != nf) {
            PyErr_SetString(PyExc_ValueError, "paging: audit_places needs page arrays of one length and frame "
                            "arrays of another");
            goto done;
        }
        const int64_t *G = b[0].buf, *C = b[1].buf, *BL = b[4].buf, *V = b[5].buf, *VP = b[6].buf;
        const uint64_t *E = b[2].buf, *T = b[9].buf;
        const uint8_t *D = b[3].buf, *K = b[7].buf, *BK = b[8].buf;
        mark = PyMem_Calloc(nf > 0 ? nf : 1, 1);
        page_of = PyMem_Malloc((nf > 0 ? nf : 1) * sizeof(int64_t));
        if (mark == NULL || page_of == NULL) { PyErr_NoMemory(); goto done; }
        for (int64_t f = 0; f < nf; f++) page_of[f] = -1;
        int64_t resident = 0, soft = 0, disk_only = 0, host_took = 0, max_block = -1, n_disk = 0;
        for (int64_t p = 0; p < n; p++) {
            int64_t g = G[p], c = C[p];
            if (g >= 0) {
                /* in its own frame, the frame pointing back at it, of a workload kind */
                if (g >= nf || mark[g] || VP[g] != p || (K[g] != AUD_ANON && K[g] != AUD_FILE)) goto holds_not;
                if (c >= 0) goto holds_not;                       /* resident and soft at once */
                if (BK[g] && T[g] != E[p]) goto holds_not;        /* stale content the guest can see */
                mark[g] = 1;
                page_of[g] = p;
                resident++;
                host_took += !BK[g];
                continue;
            }
            if (c >= 0) {
                if (c >= nf || mark[c] || K[c] != AUD_FREE || VP[c] != p) goto holds_not;
                if (BK[c] && T[c] != E[p]) goto holds_not;
                if (!D[p] && E[p] != 0) goto holds_not;           /* a written page only in a soft copy */
                mark[c] = 2;
                page_of[c] = p;
                soft++;
                host_took += !BK[c];
            } else if (!D[p] && E[p] != 0) {
                goto holds_not;                                   /* neither in RAM nor on disk: lost */
            }
            if (D[p]) {
                if (BL[p] < 0) goto holds_not;
                if (BL[p] > max_block) max_block = BL[p];
                disk_only++;
            }
        }
        /* two pages on disk in one block (blocks beyond a bitmap's reach: the Python check) */
        if (max_block >= ((int64_t)1 << 26)) goto holds_not;
        PyMem_Free(mark);
        mark = PyMem_Calloc(max_block + 1 > 0 ? (size_t)(max_block + 1) : 1, 1);
        if (mark == NULL) { PyErr_NoMemory(); goto done; }
        for (int64_t p = 0; p < n; p++) {
            if (G[p] >= 0 || !D[p]) continue;
            if (mark[BL[p]]) goto holds_not;
            mark[BL[p]] = 1;
        }
        int64_t n_bal = 0;
        for (int64_t f = 0; f < nf; f++) {
            if (K[f] != AUD_BALLOON) continue;
            if (VP[f] >= 0 || BK[f]) goto holds_not;
            n_bal++;
        }
        if (n_bal != balloon_pages) goto holds_not;
        /* the window's entries */
        int64_t n_ram = 0, n_bw = 0;
        for (int64_t f = (first > 0 ? first : 0); f < nf && f < end; f++) {
            n_ram += page_of[f] >= 0;
            n_bw += K[f] == AUD_BALLOON;
        }
        for (int64_t p = 0; p < n; p++)
            n_disk += G[p] < 0 && D[p] && BL[p] >= first && BL[p] < end;
        ram_g = PyBytes_FromStringAndSize(NULL, n_ram * 8);
        ram_t = PyBytes_FromStringAndSize(NULL, n_ram * 8);
        ram_b = PyBytes_FromStringAndSize(NULL, n_ram);
        disk_b = PyBytes_FromStringAndSize(NULL, n_disk * 8);
        disk_t = PyBytes_FromStringAndSize(NULL, n_disk * 8);
        bal = PyBytes_FromStringAndSize(NULL, n_bw * 8);
        if (!ram_g || !ram_t || !ram_b || !disk_b || !disk_t || !bal) goto done;
        uint64_t *rg = (uint64_t *)PyBytes_AS_STRING(ram_g), *rt = (uint64_t *)PyBytes_AS_STRING(ram_t);
        uint8_t *rb = (uint8_t *)PyBytes_AS_STRING(ram_b);
        uint64_t *bw = (uint64_t *)PyBytes_AS_STRING(bal);
        int64_t i = 0, j = 0;
        for (int64_t f = (first > 0 ? first : 0); f < nf && f < end; f++) {
            if (page_of[f] >= 0) {
                rg[i] = (uint64_t)f;
                rt[i] = E[page_of[f]];
                rb[i] = BK[f] ? 1 : 0;
                i++;
            }
            if (K[f] == AUD_BALLOON) bw[j++] = (uint64_t)f;
        }
        uint64_t *db = (uint64_t *)PyBytes_AS_STRING(disk_b), *dt = (uint64_t *)PyBytes_AS_STRING(disk_t);
        i = 0;
        for (int64_t p = 0; p < n; p++) {
            if (G[p] < 0 && D[p] && BL[p] >= first && BL[p] < end) {
                db[i] = (uint64_t)BL[p];
                dt[i] = V[p] == 0 ? 0 : E[p];    /* a file block never written holds 0 */
                i++;
            }
        }
        ret = Py_BuildValue("(NNNNNN(LLLLL))", ram_g, ram_t, ram_b, disk_b, disk_t, bal, (long long)resident,
                            (long long)soft, (long long)disk_only, (long long)host_took, (long long)n_bal);
        ram_g = ram_t = ram_b = disk_b = disk_t = bal = NULL;    /* stolen by "N" */
        goto done;
    }
holds_not:
    ret = Py_None;
    Py_INCREF(ret);
done:
    Py_XDECREF(ram_g); Py_XDECREF(ram_t); Py_XDECREF(ram_b); Py_XDECREF(disk_b); Py_XDECREF(disk_t); Py_XDECREF(bal);
    PyMem_Free(mark);
    PyMem_Free(page_of);
    for (int k = 0; k < got; k++) PyBuffer_Release(&b[k]);
    return ret;
}

static PyMethodDef paging_functions[] = {
    {"audit_places", mod_audit_places, METH_VARARGS,
     "audit_places(gpfn, cached, expect, on_disk, block, version, vpage, kind, backed, token, balloon_pages, "
     "first, end) -> None or (ram_gpfns, ram_tokens, ram_backed, disk_blocks, disk_tokens, balloon_gpfns, counts)"},
    {"ahead_answers", mod_ahead_answers, METH_VARARGS,
     "ahead_answers(prog, tokens uint64, times) -> [(request, start, done, tokens), ...] last first, or None: "
     "GuestKernel.answered_ahead's replay list"},
    {"take_ad_bits", mod_take_ad_bits, METH_VARARGS,
     "take_ad_bits(accessed, dirty) -> (bytes, bytes): np.packbits of each, then both cleared"},
    {"page_range", mod_page_range, METH_VARARGS,
     "page_range(pages int64|uint64, signed) -> (lo, hi): the smallest and the largest page"},
    {"frame_gauges", mod_frame_gauges, METH_VARARGS,
     "frame_gauges(kind, backed, wp, cached, out): frames per kind, backed, write-protected; soft-cached pages"},
    {"mix_pick", mod_mix_pick, METH_VARARGS,
     "mix_pick(u, cdf, pick_out uint8, counts_out int64): searchsorted(cdf, u, 'right') and its counts"},
    {"mix_gather", mod_mix_gather, METH_VARARGS,
     "mix_gather(pick, parts, pages_out, writes_out) -> n: the components' references in pick order"},
    {"mix_draw", mod_mix_draw, METH_VARARGS,
     "mix_draw(capsule, cdf, specs, pages_out, writes_out): Mix's batch drawn and placed in one pass"},
    {"zipf_pages", mod_zipf_pages, METH_VARARGS,
     "zipf_pages(u, answer, cdf, page_of_rank, out): CdfTable(u), capped, through page_of_rank"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef paging_module = {
    PyModuleDef_HEAD_INIT, "_paging", "The guest kernel's compiled paging core.", -1, paging_functions};

PyMODINIT_FUNC PyInit__paging(void) {
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&paging_module);
    if (m == NULL) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) { Py_DECREF(&CoreType); Py_DECREF(m); return NULL; }
    PyObject *names = PyTuple_New(N_COUNTERS);
    for (int k = 0; k < N_COUNTERS; k++) PyTuple_SET_ITEM(names, k, PyUnicode_FromString(COUNTER_NAMES[k]));
    PyModule_AddObject(m, "COUNTER_NAMES", names);
    PyObject *ks = PyTuple_New(N_KS);
    for (int k = 0; k < N_KS; k++) PyTuple_SET_ITEM(ks, k, PyUnicode_FromString(KS_NAMES[k]));
    PyModule_AddObject(m, "KS_NAMES", ks);
    PyModule_AddIntConstant(m, "OP_DONE", OP_DONE);
    PyModule_AddIntConstant(m, "OP_EPT", OP_EPT);
    PyModule_AddIntConstant(m, "OP_READ", OP_READ);
    PyModule_AddIntConstant(m, "OP_WRITE", OP_WRITE);
    PyModule_AddIntConstant(m, "OP_NO_VICTIM", OP_NO_VICTIM);
    PyModule_AddIntConstant(m, "OP_SWAP_FULL", OP_SWAP_FULL);
    PyModule_AddIntConstant(m, "OP_BAD_BLOCK", OP_BAD_BLOCK);
    PyModule_AddIntConstant(m, "OP_COW", OP_COW);
    PyModule_AddIntConstant(m, "P_CLOCK", P_CLOCK);
    PyModule_AddIntConstant(m, "P_ESC", P_ESC);
    PyModule_AddIntConstant(m, "P_FIFO", P_FIFO);
    PyModule_AddIntConstant(m, "P_LRU", P_LRU);
    PyModule_AddIntConstant(m, "P_PY", P_PY);
    PyModule_AddIntConstant(m, "WIN_MIN", WIN_MIN);
    PyModule_AddIntConstant(m, "WIN_MAX", WIN_MAX);
    return m;
}
