/* Attention for short sequences on CPUs with AVX-512 BF16, for lorafit's inference path (src/lorafit/kernels.py).

   out = softmax(Q K^T * scale, masked) V, per (batch, head), in bf16: the products are exact, sums and the softmax
   are fp32, and the probabilities are rounded to bf16 for the second product, as in PyTorch's CPU flash attention.
   That kernel works in blocks of 32 queries through small GEMM calls, whose fixed cost dominates at the 30-130
   tokens of a news text; this one keeps a whole head in L1 and calls the dot-product instruction directly. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 exp_ps(__m512 x) { /* Cephes expf, x <= 0 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* r[0..15] (16 rows of 16 32-bit words) transposed in place. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

#define MAX_D 128
#define QB 4

/* nq (<= QB) query rows i0.. of head (b, h): scores, softmax, and the weighted sum of V. nq independent accumulator
   chains hide the latency of the dot-product instruction. */
static inline __attribute__((always_inline)) void rows(
    const int nq, int64_t i0, int64_t b, int64_t h, const uint16_t *q, const uint8_t *mask, uint16_t *out,
    int64_t H, int64_t Lq, int64_t Lk, int64_t Lk16, int64_t D, const int64_t *qs, const int64_t *ms, float scale,
    const uint32_t *kt, const uint32_t *vp, float *s, uint16_t *pb) {
    const int64_t P = D / 2, R = D / 16;
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    const uint32_t *qrow[QB];
    const uint8_t *mrow[QB];
    __m512 vmax[QB];
    for (int r = 0; r < nq; r++) {
        qrow[r] = (const uint32_t *)(q + b * qs[0] + h * qs[1] + (i0 + r) * qs[2]);
        mrow[r] = mask ? mask + b * ms[0] + h * ms[1] + (i0 + r) * ms[2] : NULL;
        vmax[r] = ninf;
    }
    for (int64_t j = 0; j < Lk16; j += 32) { /* two blocks of 16 keys at a time where there are two */
        const int nb = Lk16 - j >= 32 ? 2 : 1;
        __m512 acc[QB][2];
        for (int r = 0; r < nq; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int64_t p = 0; p < P; p++) {
            const __m512bh k0 = (__m512bh)_mm512_load_si512(kt + p * Lk16 + j);
            const __m512bh k1 = nb == 2 ? (__m512bh)_mm512_load_si512(kt + p * Lk16 + j + 16) : k0;
            for (int r = 0; r < nq; r++) {
                const __m512bh qq = (__m512bh)_mm512_set1_epi32(qrow[r][p]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qq, k0);
                if (nb == 2) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qq, k1);
            }
        }
        for (int x = 0; x < nb; x++) {
            const int64_t jx = j + 16 * x;
            const __mmask16 inside = Lk - jx >= 16 ? 0xFFFF : (__mmask16)((1u << (Lk - jx)) - 1);
            for (int r = 0; r < nq; r++) {
                __mmask16 valid = inside;
                if (mrow[r]) valid = _mm_mask_cmpneq_epi8_mask(inside, _mm_maskz_loadu_epi8(inside, mrow[r] + jx), _mm_setzero_si128());
                __m512 sc = _mm512_mask_blend_ps(valid, ninf, _mm512_mul_ps(acc[r][x], _mm512_set1_ps(scale)));
                _mm512_store_ps(s + r * Lk16 + jx, sc);
                vmax[r] = _mm512_max_ps(vmax[r], sc);
            }
        }
    }
    float inv[QB];
    for (int r = 0; r < nq; r++) {
        const float m = _mm512_reduce_max_ps(vmax[r]);
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < Lk16; j += 16) {
            __m512 x = _mm512_load_ps(s + r * Lk16 + j);
            __m512 e = m == -__builtin_inff() ? _mm512_setzero_ps()
                                                : _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), exp_ps(_mm512_sub_ps(x, _mm512_set1_ps(m))));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_store_si256((__m256i *)(pb + r * Lk16 + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        const float total = _mm512_reduce_add_ps(vsum);
        inv[r] = total > 0 ? 1.0f / total : 0.0f; /* every key masked: zeros */
    }
    __m512 acc[QB][MAX_D / 16];
    for (int r = 0; r < nq; r++)
        for (int64_t c = 0; c < R; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t jp = 0; jp < (Lk + 1) / 2; jp++) {
        for (int64_t c = 0; c < R; c++) {
            __m512bh vv = (__m512bh)_mm512_load_si512(vp + jp * D + 16 * c);
            for (int r = 0; r < nq; r++)
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_set1_epi32(((const uint32_t *)(pb + r * Lk16))[jp]), vv);
        }
    }
    for (int r = 0; r < nq; r++) {
        uint16_t *o = out + ((b * Lq + i0 + r) * H + h) * D;
        for (int64_t c = 0; c < R; c++)
            _mm256_storeu_si256((__m256i *)(o + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]))));
    }
}

/* q, k, v: bf16 (B, H, L, D) with any strides in elements over (b, h, l) and unit stride over d; mask: bool
   (B, Hm, Lq, Lk) strides over (b, h, i) (0 where broadcast), unit stride over j, or NULL; out: bf16 (B, Lq, H, D),
   contiguous. D must be a multiple of 32 and at most MAX_D. Returns 0; -1 for an unsupported shape, -2 out of memory. */
int lorafit_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                      int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                      const int64_t *qs, const int64_t *ks, const int64_t *vs, const int64_t *ms, float scale, int threads) {
    if (D % 32 || D > MAX_D || Lk < 1 || Lq < 1) return -1;
    int failed = 0;
    const int64_t Lk16 = (Lk + 15) & ~(int64_t)15, P = D / 2;
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                            39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
#pragma omp parallel num_threads(threads)
    {
        uint32_t *kt = aligned_alloc(64, P * Lk16 * 4);           /* K^T as bf16 pairs: kt[p][j] = (k[j][2p], k[j][2p+1]) */
        uint32_t *vp = aligned_alloc(64, (Lk16 / 2) * D * 4);     /* V as row pairs: vp[jp][d] = (v[2jp][d], v[2jp+1][d]) */
        float *s = aligned_alloc(64, QB * Lk16 * 4);
        uint16_t *pb = aligned_alloc(64, (QB * Lk16 * 2 + 63) & ~(int64_t)63);
        if (!kt || !vp || !s || !pb) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H; task++) {
            if (!kt || !vp || !s || !pb) continue;
            const int64_t b = task / H, h = task % H;
            const uint16_t *kb = k + b * ks[0] + h * ks[1], *vb = v + b * vs[0] + h * vs[1];
            for (int64_t j = 0; j < Lk16; j += 16) {
                for (int64_t p = 0; p < P; p += 16) {
                    __m512i r[16];
                    for (int64_t x = 0; x < 16; x++)
                        r[x] = j + x < Lk ? _mm512_loadu_si512(kb + (j + x) * ks[2] + 2 * p) : _mm512_setzero_si512();
                    transpose16(r);
                    for (int64_t x = 0; x < 16; x++) _mm512_store_si512(kt + (p + x) * Lk16 + j, r[x]);
                }
            }
            for (int64_t jp = 0; jp < (Lk + 1) / 2; jp++) {
                for (int64_t d = 0; d < D; d += 32) {
                    __m512i r0 = 2 * jp < Lk ? _mm512_loadu_si512(vb + 2 * jp * vs[2] + d) : _mm512_setzero_si512();
                    __m512i r1 = 2 * jp + 1 < Lk ? _mm512_loadu_si512(vb + (2 * jp + 1) * vs[2] + d) : _mm512_setzero_si512();
                    _mm512_store_si512(vp + jp * D + d, _mm512_permutex2var_epi16(r0, lo_idx, r1));
                    _mm512_store_si512(vp + jp * D + d + 16, _mm512_permutex2var_epi16(r0, hi_idx, r1));
                }
            }
            for (int64_t i = 0; i < Lq; i += QB) {
                switch (Lq - i >= QB ? QB : Lq - i) {
                case 4: rows(4, i, b, h, q, mask, out, H, Lq, Lk, Lk16, D, qs, ms, scale, kt, vp, s, pb); break;
                case 3: rows(3, i, b, h, q, mask, out, H, Lq, Lk, Lk16, D, qs, ms, scale, kt, vp, s, pb); break;
                case 2: rows(2, i, b, h, q, mask, out, H, Lq, Lk, Lk16, D, qs, ms, scale, kt, vp, s, pb); break;
                default: rows(1, i, b, h, q, mask, out, H, Lq, Lk, Lk16, D, qs, ms, scale, kt, vp, s, pb);
                }
            }
        }
        free(kt); free(vp); free(s); free(pb);
    }
    return failed ? -2 : 0;
}
