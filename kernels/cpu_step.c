/* Fused forward steps of a fully connected network on the CPU, and their backward.
 *
 * The C side of kernels/cpu_step.py (read its docstring first). One call does, for
 * every sample of the batch, what the torch path does with about a hundred small
 * tensor ops: select K pending outboxes (SPEC 5.1, 6), gather their fan-out rows and
 * add the currents (5.3), evaluate the receivers (5.4), and the forward bookkeeping
 * (pending flags, barrier messages, pre-spike potentials, stop condition). The
 * arithmetic is the torch path's, operation for operation and in the same order
 * (no FMA: built with -ffp-contract=off), so spikes and potentials are bitwise those
 * of backend="torch" whenever the selected slots are added in the same order.
 *
 * Tensors are passed as raw pointers to contiguous row-major buffers; bool is one byte.
 * State tensors are updated in place.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* --- the counter hash of asynctrain/rng.py -------------------------------------- */
#define GOLDEN 0x9E3779B9u
#define C1 0x85EBCA6Bu
#define C2 0xC2B2AE35u

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= C1;
    h ^= h >> 13;
    h *= C2;
    h ^= h >> 16;
    return h;
}

static uint32_t counter_hash(uint32_t seed, uint32_t stream, uint32_t t, uint32_t step) {
    uint32_t h = fmix32(seed ^ GOLDEN);
    h = fmix32(h ^ (stream * GOLDEN));
    h = fmix32(h ^ (t * GOLDEN));
    h = fmix32(h ^ (step * GOLDEN));
    return h;
}

static inline float uniform_at(uint32_t h0, int64_t row, int64_t col) {
    uint32_t hb = fmix32(((uint32_t)row * GOLDEN) ^ h0);
    uint32_t h = hb ^ fmix32((uint32_t)col);
    h *= C1;
    h ^= h >> 15;
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

/* rng.input_order_key: the top 23 bits of the same finished hash */
static inline int64_t order_key_at(uint32_t h0, int64_t row, int64_t col) {
    uint32_t hb = fmix32(((uint32_t)row * GOLDEN) ^ h0);
    uint32_t h = hb ^ fmix32((uint32_t)col);
    h *= C1;
    h ^= h >> 15;
    return (int64_t)(h >> 9);
}

enum { STREAM_RS_KEY = 1, STREAM_MOMENTUM_NOISE = 2, STREAM_NETWORK_DROPOUT = 3,
       STREAM_REFRACTORY_DROPOUT = 4, STREAM_INPUT_ORDER = 6, STREAM_FILL = 7 };

/* --- what stays fixed during a call ----------------------------------------------- */
typedef struct {
    int64_t B, W, K, F;           /* batch, state width (N + 1), slots per step, row length */
    int64_t n_slots;              /* L + 2: per-layer delivery counters */
    int64_t out_lo, out_hi;       /* output columns */
    const int64_t *source_slot;   /* [W] */
    const int64_t *slot_lo, *slot_hi;  /* [n_slots]: the columns that slot l's sources reach */
    const uint8_t *is_source;     /* [W] */
    const uint8_t *is_input;      /* [W] */
    const int32_t *sync;          /* [W] */
    const void *theta;            /* [W] */
    const void *wt;               /* [W, F] */
    int32_t policy_ms, refractory, barrier, stop_output, eager_first, detach_reset;
    int32_t input_random;         /* MS: pending inputs in the pass's random order (SPEC 6) */
    int32_t fill;                 /* fill_slots (SPEC 8): free slots take fillers, -1 - column */
    double noise, p_ref, p_net, alpha;
    int64_t max_steps, steps_after_output;
    uint32_t seed;
    /* state, in place */
    void *v, *o, *acc;            /* [B, W], [B, W], [B, n_out] */
    uint8_t *refr;                /* [B, W] */
    int32_t *n_in;                /* [B, W] */
    /* pass bookkeeping (forward only), in place */
    uint8_t *pending;             /* [B, W] */
    void *pre_spike, *spike_sum;  /* [B, W] */
    int64_t *steps, *first_out;   /* [B] */
    uint8_t *done;                /* [B] */
    int64_t hist_bins;            /* currents-to-spike histogram (0: not recorded) */
    int64_t *hist;                /* [hist_bins], in place */
    uint8_t *fillable;            /* [B, W] fill candidates: outbox holds gradient (fill only) */
} Ctx;

/* A replayed step's flags per column (kernels/step_spec.py: REFR_BEFORE, RECEIVED, GATE) */
enum { REFR_BEFORE = 1, RECEIVED = 2, GATE = 4 };

/* A recorded slot: fillers are -1 - column */
#define DEC(i) ((i) < 0 ? -1 - (int64_t)(i) : (int64_t)(i))

/* Eight bool bytes at once (pending rows are mostly zero: skip them a word at a time). */
static inline uint64_t word8(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* --- top-k by packed key ------------------------------------------------------------ */
static inline int64_t packed_key(float key, int64_t col, int64_t width) {
    float k0 = key + 0.0f;  /* -0.0 -> +0.0 */
    int32_t bits;
    memcpy(&bits, &k0, 4);
    int64_t b = bits < 0 ? (int64_t)(bits ^ 0x7FFFFFFF) : (int64_t)bits;
    return (int64_t)(((uint64_t)b << 32) | (uint64_t)(width - 1 - col));
}

/* Move the n largest of a[0..m) to a[0..n) (any order): quickselect. */
static void top_n(int64_t *a, int64_t m, int64_t n) {
    if (n >= m) return;
    int64_t lo = 0, hi = m - 1;
    while (lo < hi) {
        int64_t pivot = a[lo + (hi - lo) / 2], i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { int64_t t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (n - 1 <= j) hi = j;
        else if (n - 1 >= i) lo = i;
        else return;
    }
}

static int cmp_desc(const void *x, const void *y) {
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return a < b ? 1 : (a > b ? -1 : 0);
}

/* One template per float type. */
#define SCALAR float
#define SUFFIX f32
#include "cpu_step_impl.h"
#undef SCALAR
#undef SUFFIX
#define SCALAR double
#define SUFFIX f64
#include "cpu_step_impl.h"
