/* sharded_embedding._scatter: the per-id loops that PyTorch needs several passes for, in C:
 * the owner's fused SGD step of bags pooled on it (bag_scatter_add), index_add, a lookup's
 * gathers (gather) and gradient sums (bag_sum), a collection's packing of bags
 * (partition_bags, destinations) and a lookup's routing (dedup).
 *
 * bag_scatter_add: the owner's fused SGD update of bags pooled on the owner.
 * A bag pooled on its owner comes back as one gradient row per (bag, owner) pair; the
 * gradient of each of the bag's ids is that row (times the id's per-sample weight). For an
 * optimizer whose update is a fixed multiple of the gradient (SGD), each id's update can be
 * added to its table row as it is read:
 *
 *     for each id i (in order):   weight[ids[i]] += scale * w[i] * grads[pair(i)]
 *
 * with pair(i) the number of bag starts (first[k] != 0, k <= i) minus one. PyTorch needs
 * three passes for the same step (sort the ids by row, sum each row's gradient with an
 * embedding_bag, index_add_ the sums), each over every id; this is one pass, and what FBGEMM's
 * CPU kernels do for TorchRec's fused EXACT_SGD.
 *
 * The arguments are raw pointers (Python ints from ``Tensor.data_ptr()``) so that the module
 * builds with the C compiler and Python's headers alone; `sharded_embedding.native` checks
 * dtypes, shapes and contiguity before calling. Every index is checked here first (one pass
 * over the ids and flags) and nothing is written when one is out of range. The GIL is released
 * while the rows are written.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* x86-64 with GCC or clang: one copy of the loop per instruction set, picked when the module
 * loads (the wheel runs on any x86-64; AVX2 or AVX-512 where the CPU has them). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

/* Rows are read and written at random places of a table far larger than the caches: ask for
 * the row PREFETCH ids ahead (its first two cache lines; the hardware fetches the rest).
 * Measured on 150k-300k ids into tables of 1M-5M rows of 32-128 floats: 15-35% faster. */
#define PREFETCH 16
#if defined(__GNUC__)
#define PREFETCH_ROW(p, dim)                                   \
    do {                                                       \
        __builtin_prefetch((p), 1, 0);                         \
        if ((dim) > 16) __builtin_prefetch((p) + 16, 1, 0);    \
    } while (0)
#define PREFETCH_LINE(p) __builtin_prefetch((p), 0, 0)
#else
#define PREFETCH_ROW(p, dim) ((void)0)
#define PREFETCH_LINE(p) ((void)0)
#endif

/* -1: ids or pairs out of range; 0: done. */
static int64_t check(int64_t rows, const int32_t *ids, const uint8_t *first, int64_t pairs, int64_t n) {
    int64_t starts = 0;
    if (n > 0 && !first[0]) return -1;
    for (int64_t i = 0; i < n; i++) {
        starts += first[i] != 0;
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    }
    return starts == pairs ? 0 : -1;
}

static inline ALWAYS_INLINE void scatter_rows(float *restrict weight, int64_t dim,
        const int32_t *restrict ids, const uint8_t *restrict first, const float *restrict w, float scale,
        const float *restrict grads, int64_t n) {
    const float *g = grads - dim;
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH < n) PREFETCH_ROW(weight + (int64_t)ids[i + PREFETCH] * dim, dim);
        if (first[i]) g += dim;
        float s = w ? scale * w[i] : scale;
        float *restrict row = weight + (int64_t)ids[i] * dim;
        for (int64_t j = 0; j < dim; j++) row[j] += s * g[j];
    }
}

/* 32, 64 and 128 floats get a loop of their own, unrolled for that width (about 10% faster;
 * 16 was slower so, and stays with the general loop). */
#define SCATTER_WIDTH(D)                                                                                      \
    CLONES static void scatter_##D(float *restrict weight, const int32_t *restrict ids,                        \
                                   const uint8_t *restrict first, const float *restrict w, float scale,        \
                                   const float *restrict grads, int64_t n) {                                   \
        scatter_rows(weight, D, ids, first, w, scale, grads, n);                                               \
    }
SCATTER_WIDTH(32)
SCATTER_WIDTH(64)
SCATTER_WIDTH(128)

CLONES static void scatter_any(float *restrict weight, int64_t dim, const int32_t *restrict ids,
                               const uint8_t *restrict first, const float *restrict w, float scale,
                               const float *restrict grads, int64_t n) {
    scatter_rows(weight, dim, ids, first, w, scale, grads, n);
}

static void scatter(float *weight, int64_t dim, const int32_t *ids, const uint8_t *first, const float *w,
                    float scale, const float *grads, int64_t n) {
    switch (dim) {
    case 32: scatter_32(weight, ids, first, w, scale, grads, n); break;
    case 64: scatter_64(weight, ids, first, w, scale, grads, n); break;
    case 128: scatter_128(weight, ids, first, w, scale, grads, n); break;
    default: scatter_any(weight, dim, ids, first, w, scale, grads, n);
    }
}


CLONES static void add_rows(float *restrict weight, int64_t dim, const int64_t *restrict rows,
                            const float *restrict values, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH < n) PREFETCH_ROW(weight + rows[i + PREFETCH] * dim, dim);
        float *restrict row = weight + rows[i] * dim;
        const float *restrict v = values + i * dim;
        for (int64_t j = 0; j < dim; j++) row[j] += v[j];
    }
}

/* index_add: weight[rows[i]] += values[i] for i in order, as Tensor.index_add_(0, rows, values)
 * does on the CPU with one thread (the same additions in the same order: the same bits), at
 * 1.2-2x its speed for rows of 16-128 floats (its per-row dispatch is the difference). */
static PyObject *index_add(PyObject *self, PyObject *args) {
    unsigned long long weight, rows, values;
    long long num_rows, dim, n;
    if (!PyArg_ParseTuple(args, "KLLKKL", &weight, &num_rows, &dim, &rows, &values, &n)) return NULL;
    if (num_rows < 0 || dim <= 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "index_add: negative size");
        return NULL;
    }
    const int64_t *r = (const int64_t *)(uintptr_t)rows;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++)
        if (r[i] < 0 || r[i] >= num_rows) { bad = 1; break; }
    if (!bad) add_rows((float *)(uintptr_t)weight, dim, r, (const float *)(uintptr_t)values, n);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "index_add: a row is outside the table");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* gather: out[i] = table[rows[i]] (whole rows of `row_bytes` bytes, any dtype), what
 * torch.index_select(table, 0, rows) does, with the row PREFETCH ids ahead asked for (its
 * first four cache lines): the rows lie at random places of a table far larger than the
 * caches, and PyTorch's kernel waits for each in turn. Measured on a one-thread rank, fresh
 * rows each call (benchmarks/row_kernels.py): 4000 rows of 64 float32 from 500k, and 8000 of
 * 128 from 5M, in about 0.9x and 0.7x index_select's time. Rows of 128, 256 and 512
 * bytes get a loop of their own (a fixed-size copy the compiler inlines). Returns -1, nothing
 * written, when a row is outside the table. */
static inline ALWAYS_INLINE void gather_rows(char *restrict out, const char *restrict table, int64_t row_bytes,
                                             const void *rows, int index_bytes, int64_t n) {
    const int64_t *r64 = (const int64_t *)rows;
    const int32_t *r32 = (const int32_t *)rows;
    int lines = row_bytes >= 256 ? 4 : (int)((row_bytes + 63) / 64);
    for (int64_t i = 0; i < n; i++) {
        if (i + PREFETCH < n) {
            const char *p = table + (index_bytes == 8 ? r64[i + PREFETCH] : r32[i + PREFETCH]) * row_bytes;
            for (int l = 0; l < lines; l++) PREFETCH_LINE(p + 64 * l);
        }
        memcpy(out + i * row_bytes, table + (index_bytes == 8 ? r64[i] : r32[i]) * row_bytes, row_bytes);
    }
}

#define GATHER_WIDTH(B)                                                                                        \
    CLONES static void gather_##B(char *restrict out, const char *restrict table, const void *rows,            \
                                  int index_bytes, int64_t n) {                                                \
        if (index_bytes == 8) gather_rows(out, table, B, rows, 8, n);                                           \
        else gather_rows(out, table, B, rows, 4, n);                                                            \
    }
GATHER_WIDTH(128)
GATHER_WIDTH(256)
GATHER_WIDTH(512)

static void gather_any(char *out, const char *table, int64_t row_bytes, const void *rows, int index_bytes,
                       int64_t n) {
    switch (row_bytes) {
    case 128: gather_128(out, table, rows, index_bytes, n); break;
    case 256: gather_256(out, table, rows, index_bytes, n); break;
    case 512: gather_512(out, table, rows, index_bytes, n); break;
    default:
        if (index_bytes == 8) gather_rows(out, table, row_bytes, rows, 8, n);
        else gather_rows(out, table, row_bytes, rows, 4, n);
    }
}

static PyObject *gather(PyObject *self, PyObject *args) {
    unsigned long long out, table, rows;
    long long num_rows, row_bytes, n;
    int index_bytes;
    if (!PyArg_ParseTuple(args, "KKLLKiL", &out, &table, &num_rows, &row_bytes, &rows, &index_bytes, &n)) return NULL;
    if (num_rows < 0 || row_bytes <= 0 || n < 0 || (index_bytes != 4 && index_bytes != 8)) {
        PyErr_SetString(PyExc_ValueError, "gather: bad sizes");
        return NULL;
    }
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++) {
        int64_t r = index_bytes == 8 ? ((const int64_t *)(uintptr_t)rows)[i] : ((const int32_t *)(uintptr_t)rows)[i];
        if (r < 0 || r >= num_rows) { bad = 1; break; }
    }
    if (!bad) gather_any((char *)(uintptr_t)out, (const char *)(uintptr_t)table, row_bytes,
                         (const void *)(uintptr_t)rows, index_bytes, n);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_IndexError, "gather: a row is outside the table");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* bag_sum: the requester's sum of each unique id's duplicate gradients, written where each
 * row goes next, and whether every value is finite, in one pass:
 *
 *     row u = sum over k in bag u of scale * grad[perm[k]]     (bag u: perm[offsets[u]..offsets[u+1]))
 *     rows 0..split-1 -> first (the peers' rows: the exchange's outbox), the rest -> rest
 *
 * PyTorch takes an embedding_bag (its own new tensor), a copy of the peers' part into the
 * outbox and a sum for the non-finite flag (`amp.nonfinite_flag`): three passes, two over
 * every unique row. Each term is scaled before it is added, as embedding_bag's per-sample
 * weights scale it: a sum overflows where PyTorch's would. The grad rows are asked for PREFETCH
 * positions ahead. Finiteness: the sum
 * over every written value of (v - v) is 0 exactly when all are finite (inf - inf and NaN give
 * NaN), kept in 16 lanes so that the loop vectorises. Returns 1: all finite, 0: not; -1,
 * nothing written, when perm or offsets are out of range. */
static int64_t check_bags(const int64_t *perm, int64_t n, const int64_t *offsets, int64_t num_bags) {
    if ((num_bags == 0) != (n == 0) || (num_bags > 0 && offsets[0] != 0)) return -1;
    for (int64_t u = 1; u < num_bags; u++)
        if (offsets[u] <= offsets[u - 1] || offsets[u] >= n) return -1;
    for (int64_t k = 0; k < n; k++)
        if (perm[k] < 0 || perm[k] >= n) return -1;
    return 0;
}

static inline ALWAYS_INLINE int sum_bags(float *restrict first, float *restrict rest, int64_t split,
                                         const float *restrict grad, int64_t dim, const int64_t *restrict perm,
                                         int64_t n, const int64_t *restrict offsets, int64_t num_bags, float scale) {
    float acc[16] = {0};
    for (int64_t u = 0; u < num_bags; u++) {
        float *restrict row = u < split ? first + u * dim : rest + (u - split) * dim;
        int64_t start = offsets[u], end = u + 1 < num_bags ? offsets[u + 1] : n;
        for (int64_t k = start; k < end; k++) {
            if (k + PREFETCH < n) {
                const float *p = grad + perm[k + PREFETCH] * dim;
                for (int64_t l = 0; l < dim; l += 16) PREFETCH_LINE(p + l);
            }
            const float *restrict g = grad + perm[k] * dim;
            if (k == start) for (int64_t j = 0; j < dim; j++) row[j] = scale * g[j];
            else for (int64_t j = 0; j < dim; j++) row[j] += scale * g[j];
        }
        int64_t j = 0;
        for (; j + 16 <= dim; j += 16)
            for (int l = 0; l < 16; l++) acc[l] += row[j + l] - row[j + l];
        for (; j < dim; j++) acc[0] += row[j] - row[j];
    }
    float total = 0.0f;
    for (int l = 0; l < 16; l++) total += acc[l];
    return total == total;
}

#define SUM_WIDTH(D)                                                                                           \
    CLONES static int sum_bags_##D(float *first, float *rest, int64_t split, const float *grad,                 \
                                   const int64_t *perm, int64_t n, const int64_t *offsets, int64_t num_bags,    \
                                   float scale) {                                                              \
        return sum_bags(first, rest, split, grad, D, perm, n, offsets, num_bags, scale);                        \
    }
SUM_WIDTH(32)
SUM_WIDTH(64)
SUM_WIDTH(128)

CLONES static int sum_bags_any(float *first, float *rest, int64_t split, const float *grad, int64_t dim,
                               const int64_t *perm, int64_t n, const int64_t *offsets, int64_t num_bags, float scale) {
    return sum_bags(first, rest, split, grad, dim, perm, n, offsets, num_bags, scale);
}

static PyObject *bag_sum(PyObject *self, PyObject *args) {
    unsigned long long first, rest, grad, perm, offsets;
    long long split, dim, n, num_bags;
    float scale;
    if (!PyArg_ParseTuple(args, "KKLKLKLKLf", &first, &rest, &split, &grad, &dim, &perm, &n, &offsets, &num_bags,
                          &scale))
        return NULL;
    if (dim <= 0 || n < 0 || num_bags < 0 || split < 0 || split > num_bags) {
        PyErr_SetString(PyExc_ValueError, "bag_sum: bad sizes");
        return NULL;
    }
    const int64_t *p = (const int64_t *)(uintptr_t)perm, *o = (const int64_t *)(uintptr_t)offsets;
    float *f = (float *)(uintptr_t)first, *r = (float *)(uintptr_t)rest;
    const float *g = (const float *)(uintptr_t)grad;
    int64_t result;
    Py_BEGIN_ALLOW_THREADS
    result = check_bags(p, n, o, num_bags);
    if (!result) {
        switch (dim) {
        case 32: result = sum_bags_32(f, r, split, g, p, n, o, num_bags, scale); break;
        case 64: result = sum_bags_64(f, r, split, g, p, n, o, num_bags, scale); break;
        case 128: result = sum_bags_128(f, r, split, g, p, n, o, num_bags, scale); break;
        default: result = sum_bags_any(f, r, split, g, dim, p, n, o, num_bags, scale);
        }
    }
    Py_END_ALLOW_THREADS
    if (result < 0) {
        PyErr_SetString(PyExc_ValueError, "bag_sum: a position or a bag start is out of range");
        return NULL;
    }
    return PyBool_FromLong((long)result);
}

static PyObject *bag_scatter_add(PyObject *self, PyObject *args) {
    unsigned long long weight, ids, first, w, grads;
    long long rows, dim, pairs, n;
    float scale;
    if (!PyArg_ParseTuple(args, "KLLKKKfKLL", &weight, &rows, &dim, &ids, &first, &w, &scale, &grads, &pairs, &n))
        return NULL;
    if (rows < 0 || dim <= 0 || pairs < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "bag_scatter_add: negative size");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = check(rows, (const int32_t *)(uintptr_t)ids, (const uint8_t *)(uintptr_t)first, pairs, n);
    if (!bad)
        scatter((float *)(uintptr_t)weight, dim, (const int32_t *)(uintptr_t)ids, (const uint8_t *)(uintptr_t)first,
                (const float *)(uintptr_t)w, scale, (const float *)(uintptr_t)grads, n);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError,
                        "bag_scatter_add: an id is outside the table, or the bag starts do not match the gradient rows");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Each id's serving rank (its page's entry of `dest_of_page`, uint8 or int32) and local row
 * there (id + its page's entry of `shift`), and the count of ids per serving rank: what
 * `routing.Router.destinations` and a bincount compute in five passes, in one. -1 when an id
 * or a destination is out of range (nothing useful written). */
static int64_t route_ids(int64_t n, const int64_t *ids, int64_t page_size, int page_bits, const void *dest_of_page,
                         int dest_bytes, const int64_t *shift, int64_t pages, void *dest, int64_t *rows,
                         int64_t *counts, int64_t buckets) {
    const uint8_t *p8 = (const uint8_t *)dest_of_page;
    const int32_t *p32 = (const int32_t *)dest_of_page;
    uint8_t *d8 = (uint8_t *)dest;
    int32_t *d32 = (int32_t *)dest;
    for (int64_t q = 0; q < buckets; q++) counts[q] = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i];
        if (id < 0) return -1;
        int64_t page = page_bits >= 0 ? id >> page_bits : id / page_size;
        if (page >= pages) return -1;
        int64_t q = dest_bytes == 1 ? p8[page] : p32[page];
        if (q < 0 || q >= buckets) return -1;
        counts[q]++;
        if (dest_bytes == 1) d8[i] = (uint8_t)q; else d32[i] = (int32_t)q;
        rows[i] = id + shift[page];
    }
    return 0;
}

static PyObject *destinations(PyObject *self, PyObject *args) {
    unsigned long long ids, dest_of_page, shift, dest, rows, counts;
    long long n, page_size, pages, buckets;
    int page_bits, dest_bytes;
    if (!PyArg_ParseTuple(args, "LKLiKiKLKKKL", &n, &ids, &page_size, &page_bits, &dest_of_page, &dest_bytes, &shift,
                          &pages, &dest, &rows, &counts, &buckets))
        return NULL;
    if (n < 0 || page_size <= 0 || pages < 0 || buckets < 1 || (dest_bytes != 1 && dest_bytes != 4)) {
        PyErr_SetString(PyExc_ValueError, "destinations: bad sizes");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = route_ids(n, (const int64_t *)(uintptr_t)ids, page_size, page_bits, (const void *)(uintptr_t)dest_of_page,
                    dest_bytes, (const int64_t *)(uintptr_t)shift, pages, (void *)(uintptr_t)dest,
                    (int64_t *)(uintptr_t)rows, (int64_t *)(uintptr_t)counts, buckets);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "destinations: an id or a destination is out of range");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The requester's packing of one table's bags pooled on the owners: each id goes to the
 * bucket of its serving rank (0..world-1 its peers, `world` this rank), stably (a counting
 * sort), and the first id of each bag in each bucket is flagged: it starts a (bag, owner) pair,
 * whose partial sum comes back. Peers' ids are packed as int64 (low word: the local row, bit 31
 * set on a pair's first id; high word: the float32 weight's bits, or 0); this rank's ids stay
 * unpacked. One pass counts, one writes; `bag_routing.BagRouter._pooled_on_owner` does the same
 * in torch and numpy passes. Returns -1 (nothing useful written) when a destination is past
 * `world`, a row does not fit 31 bits, or the counts differ from `counts`. */
static int64_t partition(int64_t n, int64_t num_bags, const int64_t *offsets, const void *dest, int dest_bytes,
                         const int64_t *rows, const float *weights, int64_t world, const int64_t *counts,
                         int64_t *payload, int32_t *own_rows, uint8_t *own_first, float *own_weights,
                         int64_t *pairs, int64_t *pair_bag, int64_t *last) {
    const uint8_t *d8 = (const uint8_t *)dest;
    const int32_t *d32 = (const int32_t *)dest;
    int64_t buckets = world + 1, *cnt = last + buckets, *at = cnt + buckets, *pair_at = at + buckets;
    for (int64_t q = 0; q < buckets; q++) { last[q] = -1; cnt[q] = 0; pairs[q] = 0; }
    if (offsets[0] != 0 || offsets[num_bags] != n) return -1;
    for (int64_t b = 0; b < num_bags; b++) {
        if (offsets[b] > offsets[b + 1] || offsets[b + 1] > n) return -1;
        for (int64_t i = offsets[b]; i < offsets[b + 1]; i++) {
            int64_t q = dest_bytes == 1 ? d8[i] : d32[i];
            if (q < 0 || q >= buckets || rows[i] < 0 || rows[i] > INT32_MAX) return -1;
            cnt[q]++;
            if (last[q] != b) { last[q] = b; pairs[q]++; }
        }
    }
    int64_t ids = 0, bags = 0;
    for (int64_t q = 0; q < buckets; q++) {
        if (cnt[q] != counts[q]) return -1;
        at[q] = q < world ? ids : 0;
        ids += q < world ? cnt[q] : 0;
        pair_at[q] = bags;
        bags += pairs[q];
        last[q] = -1;
    }
    for (int64_t b = 0; b < num_bags; b++) {
        for (int64_t i = offsets[b]; i < offsets[b + 1]; i++) {
            int64_t q = dest_bytes == 1 ? d8[i] : d32[i];
            int first = last[q] != b;
            if (first) { last[q] = b; pair_bag[pair_at[q]++] = b; }
            int64_t j = at[q]++;
            if (q == world) {
                own_rows[j] = (int32_t)rows[i];
                own_first[j] = (uint8_t)first;
                if (weights) own_weights[j] = weights[i];
            } else {
                uint32_t low = (uint32_t)rows[i] | (first ? 0x80000000u : 0u);
                uint32_t high = 0;
                if (weights) memcpy(&high, &weights[i], 4);
                payload[j] = (int64_t)((uint64_t)low | ((uint64_t)high << 32));
            }
        }
    }
    return 0;
}

static PyObject *partition_bags(PyObject *self, PyObject *args) {
    unsigned long long offsets, dest, rows, weights, counts, payload, own_rows, own_first, own_weights, pairs,
        pair_bag, work;
    long long n, num_bags, world;
    int dest_bytes;
    if (!PyArg_ParseTuple(args, "LLKKiKKLKKKKKKKK", &n, &num_bags, &offsets, &dest, &dest_bytes, &rows, &weights, &world,
                          &counts, &payload, &own_rows, &own_first, &own_weights, &pairs, &pair_bag, &work))
        return NULL;
    if (n < 0 || num_bags < 0 || world < 1 || (dest_bytes != 1 && dest_bytes != 4)) {
        PyErr_SetString(PyExc_ValueError, "partition_bags: bad sizes");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = partition(n, num_bags, (const int64_t *)(uintptr_t)offsets, (const void *)(uintptr_t)dest, dest_bytes,
                    (const int64_t *)(uintptr_t)rows, (const float *)(uintptr_t)weights, world,
                    (const int64_t *)(uintptr_t)counts, (int64_t *)(uintptr_t)payload, (int32_t *)(uintptr_t)own_rows,
                    (uint8_t *)(uintptr_t)own_first, (float *)(uintptr_t)own_weights, (int64_t *)(uintptr_t)pairs,
                    (int64_t *)(uintptr_t)pair_bag, (int64_t *)(uintptr_t)work);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError,
                        "partition_bags: a destination or row is out of range, or the counts per rank differ");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The requester's routing of one lookup, one sort (what `routing.Router` does with a range
 * check, a page lookup, a stable sort and six torch passes).
 *
 * Each id (int32 or int64) is checked to lie in [0, limit) and becomes its key: with a page
 * table, id + page_offset[id >> page_bits] (id / page_size when page_bits < 0: the serving
 * rank * stride + its local row there); without one, the id itself. Each key (< bound <= 2^31)
 * and its position pack into one uint64 (key << 32 | position), sorted by an LSD radix sort
 * over the key's bits only (Knuth, TAOCP vol. 3, 5.2.5): each pass is stable, so equal keys
 * keep their positions in order -- the stable sort's permutation, bit for bit. One walk then
 * writes the unique keys (with stride > 0: key % stride, and counts[key / stride] += 1), where
 * each starts in the sorted order (the bags' offsets), the permutation, and each position's
 * unique number (gather_index). `perm` and `gather_index` (int64 [n] each) double as the
 * sort's two buffers. Returns the number of unique keys; -1 when an id is out of range, -2
 * when a key is (a page table that does not fit `bound`); outputs are then undefined. */
#define RADIX_BITS 11
static int64_t route_dedup(int64_t n, const void *ids, int id_bytes, int64_t limit, const int32_t *page_offset,
                           int page_bits, int64_t page_size, int64_t bound, int64_t stride, int64_t buckets,
                           int64_t *perm, int64_t *gather_index, int64_t *unique, int64_t *offsets, int64_t *counts) {
    const int32_t *i32 = (const int32_t *)ids;
    const int64_t *i64 = (const int64_t *)ids;
    uint64_t *a = (uint64_t *)perm, *b = (uint64_t *)gather_index;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = id_bytes == 4 ? i32[i] : i64[i];
        if (id < 0 || id >= limit) return -1;
        int64_t key = id;
        if (page_offset) key += page_offset[page_bits >= 0 ? id >> page_bits : id / page_size];
        if (key < 0 || key >= bound) return -2;
        a[i] = ((uint64_t)key << 32) | (uint64_t)i;
    }
    int bits = 0;
    while (bits < 32 && ((uint64_t)1 << bits) < (uint64_t)bound) bits++;
    int passes = (bits + RADIX_BITS - 1) / RADIX_BITS;
    if (passes == 0) passes = 1;
    int width = (bits + passes - 1) / passes;
    if (width == 0) width = 1;
    uint32_t count[1 << RADIX_BITS];
    uint64_t mask = ((uint64_t)1 << width) - 1;
    for (int p = 0; p < passes && n > 1; p++) {
        int shift = 32 + p * width;
        memset(count, 0, sizeof(uint32_t) << width);
        for (int64_t i = 0; i < n; i++) count[(a[i] >> shift) & mask]++;
        if (count[(a[0] >> shift) & mask] == (uint32_t)n) continue; /* one digit: nothing moves */
        uint32_t at = 0;
        for (uint64_t d = 0; d <= mask; d++) { uint32_t c = count[d]; count[d] = at; at += c; }
        for (int64_t i = 0; i < n; i++) b[count[(a[i] >> shift) & mask]++] = a[i];
        uint64_t *t = a; a = b; b = t;
    }
    if (a != (uint64_t *)perm) memcpy(perm, a, (size_t)n * sizeof(uint64_t));
    if (stride > 0)
        for (int64_t q = 0; q < buckets; q++) counts[q] = 0;
    int64_t u = 0;
    uint64_t previous = 0;
    for (int64_t i = 0; i < n; i++) {
        uint64_t v = (uint64_t)perm[i], key = v >> 32;
        int64_t position = (int64_t)(v & 0xffffffffu);
        if (i == 0 || key != previous) {
            if (stride > 0) {
                int64_t q = (int64_t)key / stride;
                if (q >= buckets) return -2;
                counts[q]++;
                unique[u] = (int64_t)key - q * stride;
            } else {
                unique[u] = (int64_t)key;
            }
            offsets[u] = i;
            u++;
            previous = key;
        }
        perm[i] = position;
        gather_index[position] = u - 1;
    }
    return u;
}

static PyObject *dedup(PyObject *self, PyObject *args) {
    unsigned long long ids, page_offset, perm, gather_index, unique, offsets, counts;
    long long n, limit, page_size, bound, stride, buckets;
    int id_bytes, page_bits;
    if (!PyArg_ParseTuple(args, "LKiLKiLLLLKKKKK", &n, &ids, &id_bytes, &limit, &page_offset, &page_bits, &page_size,
                          &bound, &stride, &buckets, &perm, &gather_index, &unique, &offsets, &counts))
        return NULL;
    if (n < 0 || n >= ((long long)1 << 32) || bound < 1 || bound > ((long long)1 << 31) || limit < 0 ||
        (id_bytes != 4 && id_bytes != 8) || (page_offset && page_bits < 0 && page_size < 1) || stride < 0 ||
        (stride > 0 && (buckets < 1 || !counts))) {
        PyErr_SetString(PyExc_ValueError, "dedup: bad sizes");
        return NULL;
    }
    int64_t u;
    Py_BEGIN_ALLOW_THREADS
    u = route_dedup(n, (const void *)(uintptr_t)ids, id_bytes, limit, (const int32_t *)(uintptr_t)page_offset,
                    page_bits, page_size, bound, stride, buckets, (int64_t *)(uintptr_t)perm,
                    (int64_t *)(uintptr_t)gather_index, (int64_t *)(uintptr_t)unique, (int64_t *)(uintptr_t)offsets,
                    (int64_t *)(uintptr_t)counts);
    Py_END_ALLOW_THREADS
    if (u == -1) {
        PyErr_SetString(PyExc_IndexError, "dedup: an id is out of range");
        return NULL;
    }
    if (u < 0) {
        PyErr_SetString(PyExc_ValueError, "dedup: a key is out of range (the page table does not fit the bound)");
        return NULL;
    }
    return PyLong_FromLongLong(u);
}

static PyMethodDef methods[] = {
    {"destinations", destinations, METH_VARARGS,
     "destinations(n, ids, page_size, page_bits, dest_of_page, dest_bytes, shift, pages, dest, rows, counts, buckets)"},
    {"dedup", dedup, METH_VARARGS,
     "dedup(n, ids, id_bytes, limit, page_offset_or_0, page_bits, page_size, bound, stride, buckets, perm, "
     "gather_index, unique, offsets, counts_or_0) -> number of unique keys"},
    {"index_add", index_add, METH_VARARGS, "index_add(weight_ptr, rows, dim, rows_ptr, values_ptr, n)"},
    {"bag_sum", bag_sum, METH_VARARGS,
     "bag_sum(first_ptr, rest_ptr, split, grad_ptr, dim, perm_ptr, n, offsets_ptr, num_bags, scale) -> all finite"},
    {"gather", gather, METH_VARARGS, "gather(out_ptr, table_ptr, num_rows, row_bytes, rows_ptr, index_bytes, n)"},
    {"partition_bags", partition_bags, METH_VARARGS,
     "partition_bags(n, num_bags, offsets, dest, dest_bytes, rows, weights_or_0, world, counts, payload, own_rows, "
     "own_first, own_weights_or_0, pairs, pair_bag, work)"},
    {"bag_scatter_add", bag_scatter_add, METH_VARARGS,
     "bag_scatter_add(weight_ptr, rows, dim, ids_ptr, first_ptr, weights_ptr_or_0, scale, grads_ptr, pairs, n)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scatter", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scatter(void) { return PyModule_Create(&module); }
