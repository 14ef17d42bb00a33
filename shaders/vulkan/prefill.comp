#version 450
// Paged prefill attention (ragged plans on the fused path): flash-attention-style tiles (fp32
// math on FMAs, no cooperative matrices) that read K/V blocks in place through the block table.
//
// One workgroup per (query tile, KV head h). A tile is up to QT consecutive queries of one
// sequence (the host's tiles buffer: first row, row count; count 0 is a padding tile), and the
// workgroup serves all G query heads of h for them: RW = QT*G rows, row r = query r/G, head r%G,
// so each K/V row is read once per RW rows. It walks the union of its rows' key ranges in key
// tiles of KT keys; Q (pre-scaled, fp32) sits in shared memory for the whole walk. Per key tile:
//   load     the tile's K and V rows, widened to fp32, K into shared memory (the loads were
//            issued during the previous tile's PV, so their latency hides behind it).
//   S = QK^T each thread computes an RB x KB block of scores in registers (rows sr + i*NSR, keys
//            sk + j*NSK), masked per row to [rs, re): causal end re = lens[row], window start as
//            decode.comp. Row maxima go through shared memory (NSK partials per row); every
//            thread of a row then holds the same running max m, rescales its share of the
//            running sum l and writes P = exp(S - m). Meanwhile V replaces K in shared memory.
//   O += PV  each thread owns ORB rows x OCV vec4 columns of the output in registers (rows
//            rg + i*NRG, columns dg + k*NDG), rescaled by the row's correction exp(m_old - m).
// The decode kernel's layout (every lane holding a slice of every row, scores reduced across
// lanes one at a time) spilled registers once it served QT*G = 16 rows; here a thread's state
// is a few small register blocks whatever RW is. Shared arrays are read with strides that keep
// the 8 threads of a 16-byte access phase on distinct banks (odd row strides: in vec4 for Q and
// K/V, in floats for P). No subgroup operation: correct for any subgroup size. The accumulators
// and score blocks are only indexed inside unrolled loops: spirv-opt keeps a loop with a branch
// around them rolled, and a dynamic index puts the array in local memory (4.5x slower on an H200).
//
// Output as decode.comp's fused path: row (b + j) * HQ + h*G + g of outbuf at pc.out_off, float32
// or (OUT_F16=1) fp16 pairs packed in uint32. Rows past the tile's count are not written; a row
// with an empty range gives zeros; a NaN/inf in q gives NaN (l is NaN, not 0).
//
// Defines (all set by the host, backend._prefill_layout): DP (padded head dim), G, HKV, BS (block
// size), QT (queries per tile), KT (keys per tile, a multiple of 8), WG (workgroup size), NDG (PV
// column groups), NRG (PV row groups; divides the padded row count RWP), F16 (1: 16-bit pool, two
// halves per uint32), BF16 (1: those halves are bfloat16), OUT_F16, Q_F16. Shared memory (bytes):
// 16*QSV*(RWP + KT) + 4*RWP*(KT + NSK + 2); the host keeps it <= 48 KiB (NVIDIA's limit) by its
// choice of QT and KT.
// Attention variants (ADR 0010), compile-time as in decode.comp (all default 0): SOFTCAP (cap in
// pc.cap_bits), ALIBI (slopes at varp[0, HQ)), SINKS (sinks at varp[HQ, 2HQ)), LSE (each row's
// natural-log denominator into lsebuf at pc.lse_off).

#extension GL_EXT_control_flow_attributes : enable
#extension GL_GOOGLE_include_directive : enable

// KVQ (quantized pools, ADR 0011; kv_read.glsl): vectors of 8 packed values dequantized into the
// shared K/V tile, as 16-bit pools' vectors are widened.
#include "kv_read.glsl"
#if KVQ
struct KVW { VTYPE d; SCT s; };
#define KVT KVW
#elif F16
#define VEC 8
#define VTYPE uvec4
#else
#define VEC 4
#define VTYPE vec4
#endif
#define NV (DP / VEC)                     // pool vectors per token row
#define NDV (DP / 4)                      // vec4 columns per row
#define QSV (NDV | 1)                     // shared row stride of Q and K/V in vec4 (odd)
#define HQ (HKV * G)
#define RW (QT * G)                       // live rows per workgroup
#define NSK 8                             // S: key groups
#define NSR (WG / NSK)                    // S: row groups
#define RWP (((RW + NSR - 1) / NSR) * NSR) // rows padded to the S layout; rows >= RW are idle
#define RB (RWP / NSR)                    // S: rows per thread
#define KB (KT / NSK)                     // S: keys per thread
#define ORB (RWP / NRG)                   // PV: rows per thread
#define OCV ((NDV + NDG - 1) / NDG)       // PV: vec4 columns per thread
#define PS (KT + 1)                       // P row stride in floats (odd)
#define NLD ((KT * NV + WG - 1) / WG)     // pool vectors per thread per K (and V) tile
#define NEG_BIG (-1.0e30)
#ifndef SOFTCAP
#define SOFTCAP 0
#endif
#ifndef ALIBI
#define ALIBI 0
#endif
#ifndef SINKS
#define SINKS 0
#endif
#ifndef LSE
#define LSE 0
#endif

#if KT % NSK != 0 || RWP % NRG != 0 || NRG * NDG > WG
#error "prefill.comp: inconsistent tile layout"
#endif

layout(local_size_x = WG) in;

layout(std430, binding = 0) readonly buffer KPool { VTYPE kpool[]; };
layout(std430, binding = 1) readonly buffer VPool { VTYPE vpool[]; };
// [rows, HQ, DP] read 4 elements at a time (DP and q_off are multiples of 4): float32, or
// (Q_F16=1) fp16 pairs in uint32 words when the caller's q was fp16.
#if Q_F16
layout(std430, binding = 2) readonly buffer Q { uvec2 qbuf[]; };
vec4 q4_at(uint i) { uvec2 w = qbuf[i]; return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y)); }
#else
layout(std430, binding = 2) readonly buffer Q { vec4 qbuf[]; };
vec4 q4_at(uint i) { return qbuf[i]; }
#endif
layout(std430, binding = 3) readonly buffer Tables { int tables[]; };
layout(std430, binding = 4) readonly buffer Lens { int lens[]; };
// [rows, HQ, DP] from element offset out_off (a multiple of 4): one vec4 or 4 packed halves.
#if OUT_F16
layout(std430, binding = 5) writeonly buffer Out { uvec2 outbuf[]; };
#else
layout(std430, binding = 5) writeonly buffer Out { vec4 outbuf[]; };
#endif
layout(std430, binding = 6) readonly buffer Tiles { int tiles[]; };
#if ALIBI || SINKS
layout(std430, binding = 7) readonly buffer VarP { float varp[]; };  // slopes [HQ], sinks [HQ]
#define B_LSE 8
#else
#define B_LSE 7
#endif
#if LSE
layout(std430, binding = B_LSE) writeonly buffer Lse { float lsebuf[]; };  // [rows, HQ]
#define B_KS (B_LSE + 1)
#else
#define B_KS B_LSE
#endif
#if KVQ_AFFINE
layout(std430, binding = B_KS) readonly buffer KScale { SCT kscale[]; };  // [slots, HKV, DP/GS]
layout(std430, binding = B_KS + 1) readonly buffer VScale { SCT vscale[]; };
#endif
#ifndef KVT
#define KVT VTYPE
#endif
#if KVQ
#define KSCALE_OR_1 KSCALE
#define VSCALE_OR_1 VSCALE
#else
#define KSCALE_OR_1 1.0
#define VSCALE_OR_1 1.0
#endif

layout(push_constant) uniform Params {
    uint q_off;       // element offset of this layer's q [rows, HQ, DP]
    uint out_off;     // element offset of the output
    uint tab_off;     // int offset of the block tables [B, maxb], one row per sequence
    uint maxb;        // block-table width
    uint num_blocks;  // pool blocks (block ids are clamped below this)
    uint window;      // 0: no window
    uint scale_bits;  // softmax scale, float bits
    uint nsplit;      // unused (decode.comp's split-K)
    uint chunk;       // unused
    uint lens_off;    // int offset of the rows' context lens [rows] (causal mask applied)
    uint seq_off;     // int offset of the rows' sequences [rows] (their table rows)
    uint cap_bits;    // SOFTCAP: the cap, float bits
    uint lse_off;     // LSE: float offset of this layer's lse [rows, HQ]
} pc;

shared vec4 sh_q[RWP * QSV];
shared vec4 sh_kv[KT * QSV];    // the K tile, then the V tile
shared float sh_p[RWP * PS];    // probabilities of the key tile
shared float sh_part[RWP * NSK]; // per (row, key group): the tile's partial max; at the end, sums
shared float sh_c[RWP];         // this key tile's correction factor per row

// Key range [x, y) of query j of the tile, clamped to what the table can address.
uvec2 row_range(uint b, uint j) {
    uint L = min(uint(max(lens[pc.lens_off + b + j], 0)), pc.maxb * BS);
    return uvec2((pc.window > 0u && L > pc.window) ? L - pc.window : 0u, L);
}

// Pool vector vi of key `key` of the tile, widened into the shared K/V tile.
void store_kv(uint key, uint vi, KVT w, float fs) {
#if KVQ
    float f[VEC];
    dequant(w.d, w.s, fs, f);
    sh_kv[key * QSV + 2u * vi] = vec4(f[0], f[1], f[2], f[3]);
    sh_kv[key * QSV + 2u * vi + 1u] = vec4(f[4], f[5], f[6], f[7]);
#elif F16 && BF16
    // bfloat16 is the top half of a float32: widening is a shift (low half first, little-endian).
    const uvec4 hi = w & 0xFFFF0000u;
    sh_kv[key * QSV + 2u * vi] = uintBitsToFloat(uvec4(w.x << 16, hi.x, w.y << 16, hi.y));
    sh_kv[key * QSV + 2u * vi + 1u] = uintBitsToFloat(uvec4(w.z << 16, hi.z, w.w << 16, hi.w));
#elif F16
    sh_kv[key * QSV + 2u * vi] = vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));
    sh_kv[key * QSV + 2u * vi + 1u] = vec4(unpackHalf2x16(w.z), unpackHalf2x16(w.w));
#else
    sh_kv[key * QSV + vi] = w;
#endif
}

// Issues the loads of the K and V rows of key tile [base, base + KT): pool vector idx % NV of key
// idx / NV for idx = tid + n*WG. Keys past `end` read as zeros (p is 0 there, and 0 * garbage
// could be NaN).
void load_tile(uint base, uint end, uint tab_base, uint h, out KVT kr[NLD], out KVT vr[NLD]) {
    const uint tid = gl_LocalInvocationID.x;
    [[unroll]] for (int n = 0; n < NLD; ++n) {
        uint idx = tid + uint(n) * WG;
        uint t = base + idx / NV;
#if KVQ
        kr[n].d = VTYPE(0);
        vr[n].d = VTYPE(0);
        kr[n].s = SCT(0);
        vr[n].s = SCT(0);
#else
        kr[n] = VTYPE(0);
        vr[n] = VTYPE(0);
#endif
        if (idx < KT * NV && t < end) {  // t < end <= maxb*BS: inside the table row
            // Clamped block id: never leave the pool.
            uint blk = min(uint(tables[tab_base + t / BS]), pc.num_blocks - 1u);
            uint row = ((blk * BS + t % BS) * HKV + h) * NV + idx % NV;
#if KVQ
            kr[n].d = kpool[row];
            vr[n].d = vpool[row];
#if KVQ_AFFINE
            uint srow = ((blk * BS + t % BS) * HKV + h) * (DP / GS) + ((idx % NV) * VEC) / GS;
            kr[n].s = kscale[srow];
            vr[n].s = vscale[srow];
#endif
#else
            kr[n] = kpool[row];
            vr[n] = vpool[row];
#endif
        }
    }
}

void store_tile(KVT w[NLD], float fs) {
    const uint tid = gl_LocalInvocationID.x;
    [[unroll]] for (int n = 0; n < NLD; ++n) {
        uint idx = tid + uint(n) * WG;
        if (idx < KT * NV) store_kv(idx / NV, idx % NV, w[n], fs);
    }
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint tile = gl_WorkGroupID.x / HKV;
    const uint h = gl_WorkGroupID.x % HKV;
    const uint b = uint(tiles[2u * tile]);        // first query row of the tile
    const uint cnt = uint(tiles[2u * tile + 1u]);
    if (cnt == 0u) return;                        // whole workgroup: no barrier is skipped
    const float scale = uintBitsToFloat(pc.scale_bits);

    // The union of the rows' ranges: the same values in every thread, so loop bounds are uniform.
    uint start = 0xFFFFFFFFu;
    uint end = 0u;
    for (uint j = 0u; j < cnt; ++j) {
        uvec2 r = row_range(b, j);
        start = min(start, r.x);
        end = max(end, r.y);
    }
    start = min(start, end);
    const uint tab_base = pc.tab_off + uint(lens[pc.seq_off + b]) * pc.maxb;  // a tile is one sequence's

    KVT kr[NLD];
    KVT vr[NLD];
    if (start < end) load_tile(start, end, tab_base, h, kr, vr);

    for (uint idx = tid; idx < RWP * NDV; idx += WG) {
        uint r = idx / NDV;
        uint c = idx % NDV;
        uint j = r / G;
        vec4 q = vec4(0.0);  // idle rows: zeros, never written out
        if (r < RW && j < cnt)
            q = q4_at(pc.q_off / 4u + ((b + j) * HQ + h * G + r % G) * NDV + c) * scale;
        sh_q[r * QSV + c] = q;
    }

    // S layout: this thread's rows, their ranges (idle rows: empty, so fully masked) and their
    // online softmax state. The NSK threads of a row hold the same running max m and each its
    // share of the running sum l (the sum over its own keys).
    const uint sk = tid % NSK;
    const uint sr = tid / NSK;
    uint rlo[RB];
    uint rhi[RB];
    float m[RB];
    float l[RB];
    [[unroll]] for (int i = 0; i < RB; ++i) {
        uint r = sr + uint(i) * NSR;
        uvec2 rr = (r < RW && r / G < cnt) ? row_range(b, r / G) : uvec2(0u);
        rlo[i] = rr.x;
        rhi[i] = rr.y;
        m[i] = NEG_BIG;
        l[i] = 0.0;
    }
    // PV layout.
    const uint dg = tid % NDG;
    const uint rg = tid / NDG;
    const bool pv = tid < NRG * NDG;
    vec4 acc[ORB][OCV];
    [[unroll]] for (int i = 0; i < ORB; ++i)
        [[unroll]] for (int k = 0; k < OCV; ++k) acc[i][k] = vec4(0.0);

    for (uint base = start; base < end; base += KT) {
        store_tile(kr, KSCALE_OR_1);
        barrier();  // K tile (and, the first time, Q) in place

        float s[RB][KB];
        [[unroll]] for (int i = 0; i < RB; ++i)
            [[unroll]] for (int j = 0; j < KB; ++j) s[i][j] = 0.0;
        for (uint c = 0u; c < NDV; ++c) {
            vec4 k[KB];
            [[unroll]] for (int j = 0; j < KB; ++j) k[j] = sh_kv[(sk + uint(j) * NSK) * QSV + c];
            [[unroll]] for (int i = 0; i < RB; ++i) {
                vec4 q = sh_q[(sr + uint(i) * NSR) * QSV + c];
                [[unroll]] for (int j = 0; j < KB; ++j) s[i][j] += dot(q, k[j]);
            }
        }
        [[unroll]] for (int i = 0; i < RB; ++i) {
            float pm = NEG_BIG;
            [[unroll]] for (int j = 0; j < KB; ++j) {
                uint t = base + sk + uint(j) * NSK;
#if SOFTCAP
                const float cap = uintBitsToFloat(pc.cap_bits);
                s[i][j] = cap * tanh(s[i][j] / cap);
#endif
#if ALIBI
                // Key position minus the row's own position (its causal end - 1).
                s[i][j] += varp[h * G + (sr + uint(i) * NSR) % G] * (float(t) - float(rhi[i]) + 1.0);
#endif
                s[i][j] = (t >= rlo[i] && t < rhi[i]) ? s[i][j] : -1.0 / 0.0;
                pm = max(pm, s[i][j]);
            }
            sh_part[(sr + uint(i) * NSR) * NSK + sk] = pm;
        }
        barrier();  // K consumed, partial maxima in place

        store_tile(vr, VSCALE_OR_1);
        [[unroll]] for (int i = 0; i < RB; ++i) {
            const uint r = sr + uint(i) * NSR;
            float mx = m[i];
            [[unroll]] for (int g = 0; g < NSK; ++g) mx = max(mx, sh_part[r * NSK + uint(g)]);
            float corr = exp(m[i] - mx);
            m[i] = mx;
            float psum = 0.0;
            [[unroll]] for (int j = 0; j < KB; ++j) {
                // Masked keys: exp(-inf) = 0. A NaN score makes p, l and the output NaN.
                float p = exp(s[i][j] - mx);
                sh_p[r * PS + sk + uint(j) * NSK] = p;
                psum += p;
            }
            l[i] = l[i] * corr + psum;
            if (sk == 0u) sh_c[r] = corr;
        }
        // The next tile's loads fly during O += PV.
        if (base + KT < end) load_tile(base + KT, end, tab_base, h, kr, vr);
        barrier();  // V, P and the corrections in place

        if (pv) {
            [[unroll]] for (int i = 0; i < ORB; ++i) {
                float corr = sh_c[rg + uint(i) * NRG];
                [[unroll]] for (int k = 0; k < OCV; ++k) acc[i][k] *= corr;
            }
            for (uint key = 0u; key < KT; ++key) {
                vec4 v[OCV];
                [[unroll]] for (int k = 0; k < OCV; ++k) {
#if NDV % NDG == 0
                    v[k] = sh_kv[key * QSV + dg + uint(k) * NDG];
#else
                    // Columns past NDV are never written out; clamp the read inside the row.
                    v[k] = sh_kv[key * QSV + min(dg + uint(k) * NDG, uint(NDV - 1))];
#endif
                }
                [[unroll]] for (int i = 0; i < ORB; ++i) {
                    float p = sh_p[(rg + uint(i) * NRG) * PS + key];
                    [[unroll]] for (int k = 0; k < OCV; ++k) acc[i][k] += p * v[k];
                }
            }
        }
        barrier();  // sh_kv, sh_p, sh_part and sh_c are refilled next tile
    }

    // Each row's sum l: the shares of its NSK threads (and its max m, for the sinks and LSE).
    [[unroll]] for (int i = 0; i < RB; ++i) {
        sh_part[(sr + uint(i) * NSR) * NSK + sk] = l[i];
#if SINKS || LSE
        if (sk == 0u) sh_c[sr + uint(i) * NSR] = m[i];
#endif
    }
    barrier();
    if (!pv) return;
    // acc is indexed by unrolled loops only: stores are guarded, the loops have no branches
    // around acc (spirv-opt leaves such a loop rolled), else acc would live in local memory.
    [[unroll]] for (int i = 0; i < ORB; ++i) {
        const uint r = rg + uint(i) * NRG;
        const uint j = r / G;
        const bool live = r < RW && j < cnt;
        float lsum = 0.0;
        [[unroll]] for (int g = 0; g < NSK; ++g) lsum += sh_part[r * NSK + uint(g)];
        float wsink = 1.0;  // SINKS: the accumulator's rescale to the max with the sink
#if SINKS || LSE
        float mrow = sh_c[r];
#endif
#if SINKS
        {
            const float sink = varp[HQ + h * G + r % G];
            const float m2 = max(mrow, sink);
            wsink = exp(mrow - m2);
            lsum = lsum * wsink + exp(sink - m2);
            mrow = m2;
        }
#endif
#if LSE
        if (live && dg == 0u)
            lsebuf[pc.lse_off + (b + j) * HQ + h * G + r % G] =
                lsum == 0.0 ? -1.0 / 0.0 : mrow + log(lsum);
#endif
        const uint base = (pc.out_off + ((b + j) * HQ + h * G + r % G) * DP) / 4u;
        [[unroll]] for (int k = 0; k < OCV; ++k) {
            const uint c = dg + uint(k) * NDG;
            // lsum == 0: empty range -> zeros. A NaN/inf q makes it NaN, which must come out NaN.
            vec4 o = lsum == 0.0 ? vec4(0.0) : acc[i][k] * wsink / lsum;
            if (live && c < NDV) {
#if OUT_F16
                outbuf[base + c] = uvec2(packHalf2x16(o.xy), packHalf2x16(o.zw));
#else
                outbuf[base + c] = o;
#endif
            }
        }
    }
}
