#version 450
// Split-K reduction: merges the NSPLIT partial (m, l, unnormalised o) of each (b, query head) row
// written by decode.comp (SPLITK=1) into the normalised output. One workgroup per row, threads
// over the head dim. Defines: DP (padded head dim), WG, OUT_F16 (fp16 pairs packed in uint32);
// variants (ADR 0010, default 0): SINKS (exp(sink[hq]) joins each denominator; HQ and the sinks
// at varp[HQ, 2HQ) as decode.comp lays them out), LSE (each row's natural-log denominator).
#ifndef SINKS
#define SINKS 0
#endif
#ifndef LSE
#define LSE 0
#endif
layout(local_size_x = WG) in;

layout(std430, binding = 0) readonly buffer PartO { float part_o[]; };
layout(std430, binding = 1) readonly buffer PartML { float part_ml[]; };
#if OUT_F16
layout(std430, binding = 2) writeonly buffer Out { uint outbuf[]; };
#else
layout(std430, binding = 2) writeonly buffer Out { float outbuf[]; };
#endif

#if SINKS
layout(std430, binding = 3) readonly buffer VarP { float varp[]; };  // slopes [HQ], sinks [HQ]
#define B_LSE 4
#else
#define B_LSE 3
#endif
#if LSE
layout(std430, binding = B_LSE) writeonly buffer Lse { float lsebuf[]; };  // [rows]
#endif

layout(push_constant) uniform Params {
    uint part_off;  // partial row offset of this layer
    uint out_off;   // float offset of this layer's output [B, HQ, DP]
    uint nsplit;
    uint rows;      // B * HQ
    uint lse_off;   // LSE: float offset of this layer's lse [B * HQ]
} pc;

void main() {
    const uint row = gl_WorkGroupID.x;
    if (row >= pc.rows) return;
    const uint p0 = pc.part_off + row * pc.nsplit;
    float M = -1.0e30;
    for (uint s = 0u; s < pc.nsplit; ++s) M = max(M, part_ml[(p0 + s) * 2u]);
#if SINKS
    const float sk = varp[HQ + row % HQ];
    M = max(M, sk);
#endif
    float L = 0.0;
    for (uint s = 0u; s < pc.nsplit; ++s) L += part_ml[(p0 + s) * 2u + 1u] * exp(part_ml[(p0 + s) * 2u] - M);
#if SINKS
    L += exp(sk - M);
#endif
#if LSE
    if (gl_LocalInvocationID.x == 0u) lsebuf[pc.lse_off + row] = L == 0.0 ? -1.0 / 0.0 : M + log(L);
#endif
#if OUT_F16
    for (uint d = 2u * gl_LocalInvocationID.x; d < DP; d += 2u * WG) {
        vec2 o = vec2(0.0);
        for (uint s = 0u; s < pc.nsplit; ++s)
            o += vec2(part_o[(p0 + s) * DP + d], part_o[(p0 + s) * DP + d + 1u]) * exp(part_ml[(p0 + s) * 2u] - M);
        outbuf[(pc.out_off + row * DP + d) / 2u] = packHalf2x16(L == 0.0 ? vec2(0.0) : o / L);
    }
#else
    for (uint d = gl_LocalInvocationID.x; d < DP; d += WG) {
        float o = 0.0;
        for (uint s = 0u; s < pc.nsplit; ++s) o += part_o[(p0 + s) * DP + d] * exp(part_ml[(p0 + s) * 2u] - M);
        outbuf[pc.out_off + row * DP + d] = L == 0.0 ? 0.0 : o / L;  // NaN (from a NaN q) stays NaN
    }
#endif
}
