#version 450
// Paged decode attention, fused: reads K/V blocks in place through the block table.
//
// One workgroup per (sequence b, KV head h[, split s]); it serves all G query heads of the group
// so every K/V byte is read once. Threads form "lane groups" of TPT lanes; a lane group owns one
// token at a time and each lane owns NL vectors of VEC elements of the (padded) head dim, loaded
// with one 16-byte load each (uvec4 = 8 halves for fp16 pools, vec4 for fp32 pools). Partial dot
// products are reduced across the lane group with subgroup shuffles, then each lane group keeps
// an online softmax (running max m, sum l, fp32 accumulator) per query head. Lane groups are
// merged through shared memory at the end.
//
// SPLITK=0: writes the normalised output [B, HQ, DP]: float32, or with OUT_F16=1 fp16 pairs packed
//           in uint32 words (half the bytes the host reads back when the caller's q is fp16).
// SPLITK=1: workgroup (b*HKV+h, s) covers tokens [start + s*chunk, start + (s+1)*chunk) and writes
//           the unnormalised partial accumulator plus (m, l) for splitk_reduce.comp.
//
// Defines (all set by the host): DP (padded head dim), G (query heads per KV head), HKV, BS (block
// size), WG (workgroup size), OUT_F16, Q_F16 (q staged as fp16 pairs), TPT (lanes per token, power
// of 2 <= subgroup size), F16 (1: 16-bit pool, two halves per uint32), BF16 (1: those halves are
// bfloat16), U (tokens per lane group per iteration), SPLITK.
// Attention variants (ADR 0010), compile-time so the plain kernel is unchanged (all default 0):
// SOFTCAP (s = cap * tanh(s / cap), cap in pc.cap_bits), ALIBI (s += slope[hq] * (key_pos -
// query_pos), slopes in varp[0, HQ)), SINKS (exp(sink[hq]) joins the denominator, varp[HQ, 2HQ);
// split-K leaves it to the reduce), LSE (the natural log of each row's denominator into lsebuf
// at pc.lse_off; split-K: the reduce writes it).
// KVQ (quantized pools, ADR 0011; kv_read.glsl): vectors of 8 packed values dequantized on load.
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_shuffle : enable
#extension GL_GOOGLE_include_directive : enable

#include "kv_read.glsl"
#if KVQ
#elif F16
#define VEC 8
#define VTYPE uvec4
#else
#define VEC 4
#define VTYPE vec4
#endif
#define NV (DP / VEC)                 // vectors per token row
#define NL ((NV + TPT - 1) / TPT)     // vectors per lane
#define NG (WG / TPT)                 // lane groups per workgroup
#define HQ (HKV * G)
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
#define FUSED_SINKS (SINKS && !SPLITK)
#define FUSED_LSE (LSE && !SPLITK)

layout(local_size_x = WG) in;

layout(std430, binding = 0) readonly buffer KPool { VTYPE kpool[]; };
layout(std430, binding = 1) readonly buffer VPool { VTYPE vpool[]; };
#if Q_F16
// q staged as fp16 pairs in uint32 words (the caller's q was fp16): half the bytes the host
// writes, and no float16 -> float32 conversion on the host (ADR 0008).
layout(std430, binding = 2) readonly buffer Q { uint qbuf[]; };
float q_at(uint i) {
    vec2 p = unpackHalf2x16(qbuf[i >> 1u]);
    return (i & 1u) == 0u ? p.x : p.y;
}
#else
layout(std430, binding = 2) readonly buffer Q { float qbuf[]; };
float q_at(uint i) { return qbuf[i]; }
#endif
layout(std430, binding = 3) readonly buffer Tables { int tables[]; };
layout(std430, binding = 4) readonly buffer Lens { int lens[]; };
#if OUT_F16 && !SPLITK
layout(std430, binding = 5) writeonly buffer Out { uint outbuf[]; };
#else
layout(std430, binding = 5) writeonly buffer Out { float outbuf[]; };
#endif
#if SPLITK
layout(std430, binding = 6) writeonly buffer PartML { float part_ml[]; };
#define B_VAR 7
#else
#define B_VAR 6
#endif
#if ALIBI || FUSED_SINKS
layout(std430, binding = B_VAR) readonly buffer VarP { float varp[]; };  // slopes [HQ], sinks [HQ]
#define B_LSE (B_VAR + 1)
#else
#define B_LSE B_VAR
#endif
#if FUSED_LSE
layout(std430, binding = B_LSE) writeonly buffer Lse { float lsebuf[]; };  // [rows, HQ]
#define B_KS (B_LSE + 1)
#else
#define B_KS B_LSE
#endif
#if KVQ_AFFINE
layout(std430, binding = B_KS) readonly buffer KScale { SCT kscale[]; };  // [slots, HKV, DP/GS]
layout(std430, binding = B_KS + 1) readonly buffer VScale { SCT vscale[]; };
#endif

layout(push_constant) uniform Params {
    uint q_off;       // element offset of this layer's q [B, HQ, DP]
    uint out_off;     // fused: float offset of the output; split-K: partial row offset
    uint tab_off;     // int offset of the block tables [B, maxb], one row per sequence
    uint maxb;        // block-table width
    uint num_blocks;  // pool blocks (block ids are clamped below this)
    uint window;      // 0: no window
    uint scale_bits;  // softmax scale, float bits
    uint nsplit;      // split-K: splits per (b, h)
    uint chunk;       // split-K: tokens per split
    uint lens_off;    // int offset of the rows' context lens [rows] (causal mask applied)
    uint seq_off;     // int offset of the rows' sequences [rows] (their table rows)
    uint cap_bits;    // SOFTCAP: the cap, float bits
    uint lse_off;     // LSE: float offset of this layer's lse [rows, HQ]
} pc;

shared float sh_m[NG];
shared float sh_l[NG];
shared float sh_acc[NG * DP];

#if !KVQ
void load_vec(VTYPE v, out float f[VEC]) {
#if F16 && BF16
    // bfloat16 is the top half of a float32: widening is a shift (low half first, little-endian).
    for (int c = 0; c < 4; ++c) {
        f[2 * c] = uintBitsToFloat(v[c] << 16);
        f[2 * c + 1] = uintBitsToFloat(v[c] & 0xFFFF0000u);
    }
#elif F16
    for (int c = 0; c < 4; ++c) {
        vec2 h = unpackHalf2x16(v[c]);
        f[2 * c] = h.x;
        f[2 * c + 1] = h.y;
    }
#else
    for (int c = 0; c < 4; ++c) f[c] = v[c];
#endif
}
#endif

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint lane = tid % TPT;
    const uint lg = tid / TPT;
    const uint bh = gl_WorkGroupID.x;
    const uint b = bh / HKV;
    const uint h = bh % HKV;
    const float scale = uintBitsToFloat(pc.scale_bits);

    // Context range, clamped to what the table can address.
    uint L = uint(max(lens[pc.lens_off + b], 0));
    L = min(L, pc.maxb * BS);
    uint start = (pc.window > 0u && L > pc.window) ? L - pc.window : 0u;
    uint end = L;
#if SPLITK
    const uint split = gl_WorkGroupID.y;
    start = start + split * pc.chunk;
    end = min(end, start + pc.chunk);
#endif

    // This lane's slice of the G query heads, pre-scaled.
    float qr[G][NL * VEC];
    for (int g = 0; g < G; ++g) {
        uint qbase = pc.q_off + (b * HQ + h * G + uint(g)) * DP;
        for (int i = 0; i < NL; ++i) {
            uint vi = lane + uint(i) * TPT;
            for (int e = 0; e < VEC; ++e)
                qr[g][i * VEC + e] = (vi < NV) ? q_at(qbase + vi * VEC + uint(e)) * scale : 0.0;
        }
    }

    float m[G];
    float l[G];
    float acc[G][NL * VEC];
    for (int g = 0; g < G; ++g) {
        m[g] = NEG_BIG;
        l[g] = 0.0;
        for (int j = 0; j < NL * VEC; ++j) acc[g][j] = 0.0;
    }

    const uint tab_base = pc.tab_off + uint(lens[pc.seq_off + b]) * pc.maxb;
    const uint last_block = pc.num_blocks - 1u;

    // The loop bound is uniform over the workgroup, so every lane reaches the shuffles.
    for (uint base = start; base < end; base += NG * U) {
        VTYPE kv[U][NL];
        VTYPE vv[U][NL];
#if KVQ_AFFINE
        SCT ksc[U][NL];
        SCT vsc[U][NL];
#endif
        bool valid[U];
        // Issue all loads of the U tokens first.
        for (int u = 0; u < U; ++u) {
            uint t = base + lg + uint(u) * NG;
            valid[u] = t < end;
            uint tt = valid[u] ? t : start;
            uint blk = min(uint(tables[tab_base + tt / BS]), last_block);  // clamp: never leave the pool
            uint row = ((blk * BS + tt % BS) * HKV + h) * NV;
            for (int i = 0; i < NL; ++i) {
                uint vi = lane + uint(i) * TPT;
                bool ok = valid[u] && vi < NV;
                kv[u][i] = ok ? kpool[row + vi] : VTYPE(0);
                vv[u][i] = ok ? vpool[row + vi] : VTYPE(0);
#if KVQ_AFFINE
                uint srow = ((blk * BS + tt % BS) * HKV + h) * (DP / GS) + (vi * VEC) / GS;
                ksc[u][i] = ok ? kscale[srow] : SCT(0);
                vsc[u][i] = ok ? vscale[srow] : SCT(0);
#endif
            }
        }
        // Scores.
        float s[U][G];
        for (int u = 0; u < U; ++u) {
            float kf[NL * VEC];
            for (int i = 0; i < NL; ++i) {
                float f[VEC];
#if KVQ_AFFINE
                dequant(kv[u][i], ksc[u][i], 1.0, f);
#elif KVQ
                dequant(kv[u][i], 0u, KSCALE, f);
#else
                load_vec(kv[u][i], f);
#endif
                for (int e = 0; e < VEC; ++e) kf[i * VEC + e] = f[e];
            }
            for (int g = 0; g < G; ++g) {
                float d = 0.0;
                for (int j = 0; j < NL * VEC; ++j) d += qr[g][j] * kf[j];
                for (uint off = TPT / 2u; off > 0u; off >>= 1u) d += subgroupShuffleXor(d, off);
#if SOFTCAP
                const float cap = uintBitsToFloat(pc.cap_bits);
                d = cap * tanh(d / cap);
#endif
#if ALIBI
                // Key position minus the query's own position (L - 1).
                d += varp[h * G + uint(g)] * (float(base + lg + uint(u) * NG) - float(L) + 1.0);
#endif
                s[u][g] = valid[u] ? d : -1.0 / 0.0;
            }
        }
        // Online softmax update, one rescale per U tokens.
        float vf[U][NL * VEC];
        for (int u = 0; u < U; ++u) {
            for (int i = 0; i < NL; ++i) {
                float f[VEC];
#if KVQ_AFFINE
                dequant(vv[u][i], vsc[u][i], 1.0, f);
#elif KVQ
                dequant(vv[u][i], 0u, VSCALE, f);
#else
                load_vec(vv[u][i], f);
#endif
                for (int e = 0; e < VEC; ++e) vf[u][i * VEC + e] = f[e];
            }
        }
        for (int g = 0; g < G; ++g) {
            float mx = m[g];
            for (int u = 0; u < U; ++u) mx = max(mx, s[u][g]);
            float corr = exp(m[g] - mx);
            float p[U];
            float psum = 0.0;
            for (int u = 0; u < U; ++u) {
                p[u] = exp(s[u][g] - mx);
                psum += p[u];
            }
            l[g] = l[g] * corr + psum;
            m[g] = mx;
            for (int j = 0; j < NL * VEC; ++j) {
                float a = acc[g][j] * corr;
                for (int u = 0; u < U; ++u) a += p[u] * vf[u][j];
                acc[g][j] = a;
            }
        }
    }

    // Merge the NG lane groups, one query head at a time.
    for (int g = 0; g < G; ++g) {
        if (lane == 0u) {
            sh_m[lg] = m[g];
            sh_l[lg] = l[g];
        }
        for (int i = 0; i < NL; ++i) {
            uint vi = lane + uint(i) * TPT;
            if (vi < NV)
                for (int e = 0; e < VEC; ++e) sh_acc[lg * DP + vi * VEC + uint(e)] = acc[g][i * VEC + e];
        }
        barrier();
        float M = NEG_BIG;
        for (uint j = 0u; j < NG; ++j) M = max(M, sh_m[j]);
        float Lsum = 0.0;
        for (uint j = 0u; j < NG; ++j) Lsum += sh_l[j] * exp(sh_m[j] - M);
        const uint row = b * HQ + h * G + uint(g);
        // FUSED_SINKS: the denominator and the LSE are taken at max(M, sink); the lane groups'
        // accumulators stay weighted at M below, so the output is rescaled by wsink once.
        float wsink = 1.0;
        float Mden = M;
#if FUSED_SINKS
        {
            const float sk = varp[HQ + h * G + uint(g)];
            Mden = max(M, sk);
            wsink = exp(M - Mden);
            Lsum = Lsum * wsink + exp(sk - Mden);
        }
#endif
#if FUSED_LSE
        if (tid == 0u) lsebuf[pc.lse_off + row] = Lsum == 0.0 ? -1.0 / 0.0 : Mden + log(Lsum);
#endif
#if OUT_F16 && !SPLITK
        // Two adjacent elements per thread, one packed word (DP is a multiple of 8 or 4: even).
        for (uint d = 2u * tid; d < DP; d += 2u * WG) {
            float o0 = 0.0, o1 = 0.0;
            for (uint j = 0u; j < NG; ++j) {
                float w = exp(sh_m[j] - M);
                o0 += sh_acc[j * DP + d] * w;
                o1 += sh_acc[j * DP + d + 1u] * w;
            }
            vec2 o = Lsum == 0.0 ? vec2(0.0) : vec2(o0, o1) * wsink / Lsum;
            outbuf[(pc.out_off + row * DP + d) / 2u] = packHalf2x16(o);
        }
#else
        for (uint d = tid; d < DP; d += WG) {
            float o = 0.0;
            for (uint j = 0u; j < NG; ++j) o += sh_acc[j * DP + d] * exp(sh_m[j] - M);
#if SPLITK
            outbuf[(pc.out_off + row * pc.nsplit + split) * DP + d] = o;
#else
            // Lsum == 0: empty range -> zeros. A NaN/inf q makes Lsum NaN, which must come out NaN.
            outbuf[pc.out_off + row * DP + d] = Lsum == 0.0 ? 0.0 : o * wsink / Lsum;
#endif
        }
#endif
#if SPLITK
        if (tid == 0u) {
            uint p = (pc.out_off + row * pc.nsplit + split) * 2u;
            part_ml[p] = M;
            part_ml[p + 1u] = Lsum;
        }
#endif
        barrier();
    }
}
