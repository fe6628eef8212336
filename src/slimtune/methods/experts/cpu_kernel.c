/* Fused CPU inference kernel for routed expert adapters (see cpu_kernel.py).
 *
 * For routed rows i in [begin, end):
 *   out[t] += sum_{j<k} gate[i,j] * scaling * B[e] (A[e] x[t]),   t = tok[i] (or i), e = eid[i,j]
 * with A: (E, r, din) and bt = B transposed per expert: (E, r, dout), all float32, row-major.
 * Each token row of x is read once and each row of out read and written once, where grouping
 * by expert writes k rows per token and adds them up afterwards. Rows are independent:
 * callers split [0, n) across threads.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_KR 256 /* k * r; larger adapters take the grouped path */

/* W floats; aligned(4) makes loads and stores through it unaligned-safe. GCC/Clang vector
   extensions: one AVX-512 register (or two AVX ones) on x86, four NEON registers on ARM. */
#define W 16
#define COLS 64 /* output columns per block, kept in registers (COLS / W accumulators) */
typedef float vec __attribute__((vector_size(4 * W), aligned(4)));

static inline vec load8(const float *p) { return *(const vec *)p; }
static inline void store8(float *p, vec v) { *(vec *)p = v; }
static inline float hsum8(vec v)
{
    float s = 0.0f;
    for (int l = 0; l < W; l++)
        s += v[l];
    return s;
}

/* z[p] = rows[p] . xr for p < M: M accumulators. M is a compile-time constant so that they
   stay in registers (indexed by a runtime count they would live on the stack). */
#define DOTS(M)                                                                      \
    static void dots##M(const float *const *rows, const float *xr, int64_t din,      \
                        float *z)                                                    \
    {                                                                                \
        vec acc[M] = {{0}};                                                          \
        int64_t d = 0;                                                               \
        for (; d + W <= din; d += W) {                                               \
            const vec xv = load8(xr + d);                                            \
            for (int p = 0; p < M; p++)                                              \
                acc[p] += load8(rows[p] + d) * xv;                                   \
        }                                                                            \
        for (int p = 0; p < M; p++) {                                                \
            float s = hsum8(acc[p]);                                                 \
            for (int64_t e = d; e < din; e++)                                        \
                s += rows[p][e] * xr[e];                                             \
            z[p] = s;                                                                \
        }                                                                            \
    }
DOTS(8)
DOTS(4)
DOTS(2)
DOTS(1)

/* z[p] = rows[p] . xr for p < m, in groups of 8, 4, 2, 1 */
static void dots(const float *const *rows, int64_t m, const float *xr, int64_t din, float *z)
{
    int64_t p = 0;
    for (; p + 8 <= m; p += 8)
        dots8(rows + p, xr, din, z + p);
    if (p + 4 <= m) {
        dots4(rows + p, xr, din, z + p);
        p += 4;
    }
    if (p + 2 <= m) {
        dots2(rows + p, xr, din, z + p);
        p += 2;
    }
    if (p < m)
        dots1(rows + p, xr, din, z + p);
}

static int run(const float *restrict x, float *restrict out,
                           const float *restrict a, const float *restrict bt,
                           const int64_t *restrict tok, const int64_t *restrict eid,
                           const float *restrict gate, float *restrict zbuf,
                           int64_t begin, int64_t end, int64_t din, int64_t dout,
                           int64_t r, int64_t k, float scaling)
{
    const int64_t kr = k * r;
    if (kr > MAX_KR)
        return -1;
    const float *rows[MAX_KR];

    /* z[i] = gates * (A_e x[t]): the token's k*r dot products, 8 at a time */
    for (int64_t i = begin; i < end; i++) {
        const float *xr = x + (tok ? tok[i] : i) * din;
        for (int64_t p = 0; p < kr; p++)
            rows[p] = a + (eid[i * k + p / r] * r + p % r) * din;
        float *z = zbuf + i * kr;
        dots(rows, kr, xr, din, z);
        for (int64_t p = 0; p < kr; p++)
            z[p] *= gate[i * k + p / r] * scaling;
    }

    /* out[t] += z[i] @ [B rows], COLS output columns at a time in registers; runs of rows
       with the same experts (callers sort rows by expert set) reuse each block of B from
       L1 */
    for (int64_t i = begin; i < end;) {
        int64_t stop = i + 1;
        while (stop < end) {
            int same = 1;
            for (int64_t j = 0; j < k; j++)
                same &= eid[stop * k + j] == eid[i * k + j];
            if (!same)
                break;
            stop++;
        }
        for (int64_t p = 0; p < kr; p++)
            rows[p] = bt + (eid[i * k + p / r] * r + p % r) * dout;
        int64_t c0 = 0;
        for (; c0 + COLS <= dout; c0 += COLS) {
            for (int64_t ii = i; ii < stop; ii++) {
                float *yr = out + (tok ? tok[ii] : ii) * dout + c0;
                const float *z = zbuf + ii * kr;
                vec acc[COLS / W];
                for (int u = 0; u < COLS / W; u++)
                    acc[u] = load8(yr + W * u);
                for (int64_t p = 0; p < kr; p++) {
                    const float *br = rows[p] + c0;
                    const float zp = z[p];
                    for (int u = 0; u < COLS / W; u++)
                        acc[u] += zp * load8(br + W * u);
                }
                for (int u = 0; u < COLS / W; u++)
                    store8(yr + W * u, acc[u]);
            }
        }
        for (int64_t ii = i; ii < stop; ii++) {
            float *yr = out + (tok ? tok[ii] : ii) * dout;
            const float *z = zbuf + ii * kr;
            for (int64_t c = c0; c < dout; c++) {
                float s = yr[c];
                for (int64_t p = 0; p < kr; p++)
                    s += z[p] * rows[p][c];
                yr[c] = s;
            }
        }
        i = stop;
    }
    return 0;
}

/* Rows are independent: each thread takes a contiguous share of [0, n). Built with OpenMP
   it shares torch's OpenMP runtime (same libgomp soname, already loaded by torch), so its
   threads are torch's intra-op threads rather than more threads competing with them. */
int routed_lowrank_add_f32(const float *x, float *out, const float *a, const float *bt,
                           const int64_t *tok, const int64_t *eid, const float *gate,
                           float *zbuf, int64_t n, int64_t din, int64_t dout, int64_t r,
                           int64_t k, float scaling, int64_t threads)
{
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        status |= run(x, out, a, bt, tok, eid, gate, zbuf, n * id / nt, n * (id + 1) / nt,
                      din, dout, r, k, scaling);
    }
#else
    (void)threads;
    status = run(x, out, a, bt, tok, eid, gate, zbuf, 0, n, din, dout, r, k, scaling);
#endif
    return status;
}
