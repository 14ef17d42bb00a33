#version 450
// Paged prefill attention on tensor cores (VK_NV_cooperative_matrix): the flash-attention walk of
// prefill.comp with S = QK^T and O += PV as fp16 x fp16 -> fp32 16x16x16 cooperative-matrix
// products. Selected by geometry.prefill_kernel (fp16 pool and q, head dim 64/128, no attention
// variant, a device with the extension and 32-wide subgroups); prefill.comp serves the rest.
// Design and the H200 bench command: ADR 0008, "Cooperative-matrix prefill".
//
// One workgroup per (query tile, KV head h), as prefill.comp: a tile is up to QT queries of one
// sequence (the host's tiles buffer) and its rows are row r = query r/G, head r%G, padded to
// BR = 16*NW rows, NW = WG/32 subgroups. Subgroup w owns rows [16w, 16w + 16) from start to end:
// its Q (16 x DP, fp16, pre-scaled) sits in cooperative matrices for the whole walk, and only the
// K/V staging is shared by the workgroup. Per key tile of BC keys:
//   stage    every thread: the tile's K and V rows from the pool (through the block table), fp16,
//            into shared memory (keys past the range read as zeros).
//   S = QK^T subgroup w: BC/16 fp32 16x16 accumulators, stored to its rows of sh_s.
//   softmax  lane pair (2i, 2i+1) of subgroup w owns row 16w + i, each half of the tile's keys:
//            mask (causal end and window start per row, as prefill.comp), tile max (shuffle
//            with the pair), running max m, correction exp(m_old - m), P = exp(S - m) as fp16
//            into sh_p, running sum l (each lane its share).
//   O += PV  a cooperative matrix cannot be scaled per row (its lane layout is opaque), so each
//            tile's PV goes through the subgroup's rows of sh_s (BC/16 column chunks of 16 at a
//            time) into O in registers: the lane pair of row i holds its 16 x DP slice as
//            DP/16 chunks x 8 floats, O = O * corr + PV.
// Shared memory is subgroup-private except the K/V tile, so the subgroup phases synchronise with
// subgroup barriers and the workgroup meets twice per tile (before and after the staging).
//
// Output as prefill.comp: row (b + j) * HQ + h*G + g of outbuf at pc.out_off, float32 or
// (OUT_F16=1) fp16 pairs; rows past the tile's count are not written; an empty range gives zeros.
//
// Defines (host: geometry.coop_defines): DP (head dim, 64 or 128), G, HKV, BS, QT, BC (keys per
// tile: 32 or 64), WG (threads: 32 * NW), OUT_F16, Q_F16 (must be 1: q is fp16 pairs). The pool
// is fp16.
// Shared memory (bytes): 16*KSV*max(BR, 2*BC) + 16*BR*PSV + 4*BR*SS <= 48 KiB.

#extension GL_NV_cooperative_matrix : enable
#extension GL_KHR_memory_scope_semantics : enable
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : enable
#extension GL_EXT_control_flow_attributes : enable
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_shuffle : enable

#define NW (WG / 32)                // subgroups (32 lanes each; the host checks the device's)
#define BR (16 * NW)                // rows per workgroup: 16 per subgroup
#define HQ (HKV * G)
#define RW (QT * G)                 // live rows
#define NV (DP / 8)                 // uvec4 (8 halves) per head row
#define KSV (NV + 1)                // K/V/Q shared row stride in uvec4 (16 bytes of padding)
#define PSV (BC / 8 + 1)            // P shared row stride in uvec4
#define SS (BC + 4)                 // S shared row stride in floats (16-byte rows)
#define NK (DP / 16)                // 16-wide slices of the head dim
#define NN (BC / 16)                // 16-wide slices of the key tile
#define HALF (BC / 2)               // keys per lane in the softmax
#define NEG_BIG (-1.0e30)

#if RW > BR || DP % 16 != 0 || BC % 32 != 0 || WG % 32 != 0
#error "prefill_coop.comp: inconsistent tile layout"
#endif
#if !Q_F16
#error "prefill_coop.comp: q must be fp16 (a float32 q runs prefill.comp)"
#endif

#define A16 fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define C32 fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>

layout(local_size_x = WG) in;

// Bindings as prefill.comp (the pool: fp16 in 16-byte vectors of 8 halves).
layout(std430, binding = 0) readonly buffer KPool { uvec4 kpool[]; };
layout(std430, binding = 1) readonly buffer VPool { uvec4 vpool[]; };
layout(std430, binding = 2) readonly buffer Q { uvec2 qbuf[]; };  // fp16 pairs (Q_F16=1 only)
vec4 q4_at(uint i) { uvec2 w = qbuf[i]; return vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y)); }
layout(std430, binding = 3) readonly buffer Tables { int tables[]; };
layout(std430, binding = 4) readonly buffer Lens { int lens[]; };
#if OUT_F16
layout(std430, binding = 5) writeonly buffer Out { uvec2 outbuf[]; };
#else
layout(std430, binding = 5) writeonly buffer Out { vec4 outbuf[]; };
#endif
layout(std430, binding = 6) readonly buffer Tiles { int tiles[]; };

layout(push_constant) uniform Params {  // prefill.comp's block (ATTN_PUSH words)
    uint q_off, out_off, tab_off, maxb, num_blocks, window, scale_bits, nsplit, chunk, lens_off,
         seq_off, cap_bits, lse_off;
} pc;

// The K tile at [0, BC*KSV), the V tile after it; before the walk, Q's staging (BR rows).
#define KVROWS (BR > 2 * BC ? BR : 2 * BC)
shared uvec4 sh_h[KVROWS * KSV];
shared uvec4 sh_p[BR * PSV];   // P, fp16: row r, key k at half k of row r
// S (fp32); then the PV chunks of the same rows. A float array: glslang 11.13 stores fp32
// cooperative matrices to scalar arrays only.
shared float sh_s[BR * SS];

vec4 s4_at(uint i) { return vec4(sh_s[i], sh_s[i + 1u], sh_s[i + 2u], sh_s[i + 3u]); }

uvec2 row_range(uint b, uint j) {
    uint L = min(uint(max(lens[pc.lens_off + b + j], 0)), pc.maxb * BS);
    return uvec2((pc.window > 0u && L > pc.window) ? L - pc.window : 0u, L);
}

uvec4 pack8(vec4 a, vec4 b) {
    return uvec4(packHalf2x16(a.xy), packHalf2x16(a.zw), packHalf2x16(b.xy), packHalf2x16(b.zw));
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint w = gl_SubgroupID;
    const uint lane = gl_SubgroupInvocationID;
    const uint tile = gl_WorkGroupID.x / HKV;
    const uint h = gl_WorkGroupID.x % HKV;
    const uint b = uint(tiles[2u * tile]);
    const uint cnt = uint(tiles[2u * tile + 1u]);
    if (cnt == 0u) return;                        // whole workgroup: no barrier is skipped
    const float scale = uintBitsToFloat(pc.scale_bits);

    uint start = 0xFFFFFFFFu;
    uint end = 0u;
    for (uint j = 0u; j < cnt; ++j) {
        uvec2 r = row_range(b, j);
        start = min(start, r.x);
        end = max(end, r.y);
    }
    start = min(start, end);
    const uint tab_base = pc.tab_off + uint(lens[pc.seq_off + b]) * pc.maxb;

    // Q, scaled in fp32, then fp16 (idle rows: zeros).
    for (uint idx = tid; idx < BR * NV; idx += WG) {
        const uint r = idx / NV;
        const uint c = idx % NV;
        uvec4 v = uvec4(0u);
        if (r < RW && r / G < cnt) {
            const uint q0 = pc.q_off / 4u + ((b + r / G) * HQ + h * G + r % G) * (DP / 4) + 2u * c;
            v = pack8(q4_at(q0) * scale, q4_at(q0 + 1u) * scale);
        }
        sh_h[r * KSV + c] = v;
    }
    barrier();
    A16 qa[NK];
    [[unroll]] for (int k = 0; k < NK; ++k)
        coopMatLoadNV(qa[k], sh_h, 16u * w * KSV + 2u * uint(k), KSV, false);

    // This lane's row (of its subgroup's 16) and key half; its row's range and softmax state.
    const uint ri = lane >> 1;
    const uint half_ = lane & 1u;
    const uint r = 16u * w + ri;
    const uvec2 rr = (r < RW && r / G < cnt) ? row_range(b, r / G) : uvec2(0u);
    float m = NEG_BIG;
    float l = 0.0;
    vec4 o[NK][2];
    [[unroll]] for (int j = 0; j < NK; ++j) o[j][0] = o[j][1] = vec4(0.0);

    for (uint base = start; base < end; base += BC) {
        barrier();  // Q's staging, or the previous tile's K and V, consumed
        for (uint idx = tid; idx < BC * NV; idx += WG) {
            const uint key = idx / NV;
            const uint t = base + key;
            uvec4 kw = uvec4(0u);
            uvec4 vw = uvec4(0u);
            if (t < end) {  // t < end <= maxb*BS: inside the table row; the block id clamped
                const uint blk = min(uint(tables[tab_base + t / BS]), pc.num_blocks - 1u);
                const uint row = ((blk * BS + t % BS) * HKV + h) * NV + idx % NV;
                kw = kpool[row];
                vw = vpool[row];
            }
            sh_h[key * KSV + idx % NV] = kw;
            sh_h[(BC + key) * KSV + idx % NV] = vw;
        }
        barrier();

        // S = Q K^T: K^T is K read column-major.
        [[unroll]] for (int n = 0; n < NN; ++n) {
            C32 s = C32(0.0);
            [[unroll]] for (int k = 0; k < NK; ++k) {
                A16 kb;
                coopMatLoadNV(kb, sh_h, 16u * uint(n) * KSV + 2u * uint(k), KSV, true);
                s = coopMatMulAddNV(qa[k], kb, s);
            }
            coopMatStoreNV(s, sh_s, 16u * w * SS + 16u * uint(n), SS, false);
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();

        // Online softmax over this lane's HALF keys of row r.
        float sv[HALF];
        float pm = NEG_BIG;
        [[unroll]] for (int i = 0; i < HALF / 4; ++i) {
            const vec4 s4 = s4_at(r * SS + half_ * HALF + 4u * uint(i));
            [[unroll]] for (int e = 0; e < 4; ++e) {
                const uint t = base + half_ * HALF + uint(4 * i + e);
                sv[4 * i + e] = (t >= rr.x && t < rr.y) ? s4[e] : -1.0 / 0.0;
                pm = max(pm, sv[4 * i + e]);
            }
        }
        const float mx = max(m, max(pm, subgroupShuffleXor(pm, 1u)));
        const float corr = exp(m - mx);
        m = mx;
        float psum = 0.0;
        [[unroll]] for (int i = 0; i < HALF / 8; ++i) {
            vec4 p0, p1;
            [[unroll]] for (int e = 0; e < 4; ++e) {
                p0[e] = exp(sv[8 * i + e] - mx);      // masked: exp(-inf) = 0
                p1[e] = exp(sv[8 * i + 4 + e] - mx);
            }
            psum += dot(p0, vec4(1.0)) + dot(p1, vec4(1.0));
            sh_p[r * PSV + half_ * (HALF / 8) + uint(i)] = pack8(p0, p1);
        }
        l = l * corr + psum;
        subgroupMemoryBarrierShared();
        subgroupBarrier();

        // O = O * corr + P V, NN column chunks of 16 at a time through this subgroup's sh_s rows.
        A16 pa[NN];
        [[unroll]] for (int kk = 0; kk < NN; ++kk)
            coopMatLoadNV(pa[kk], sh_p, 16u * w * PSV + 2u * uint(kk), PSV, false);
        [[unroll]] for (int j0 = 0; j0 < NK; j0 += NN) {
            [[unroll]] for (int jj = 0; jj < NN; ++jj) {
                if (j0 + jj < NK) {  // compile-time condition (unrolled): uniform
                    C32 pv = C32(0.0);
                    [[unroll]] for (int kk = 0; kk < NN; ++kk) {
                        A16 vb;
                        coopMatLoadNV(vb, sh_h, (BC + 16u * uint(kk)) * KSV + 2u * uint(j0 + jj),
                                      KSV, false);
                        pv = coopMatMulAddNV(pa[kk], vb, pv);
                    }
                    coopMatStoreNV(pv, sh_s, 16u * w * SS + 16u * uint(jj), SS, false);
                }
            }
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            [[unroll]] for (int jj = 0; jj < NN; ++jj) {
                if (j0 + jj < NK) {
                    const uint at = r * SS + 16u * uint(jj) + 8u * half_;
                    o[j0 + jj][0] = o[j0 + jj][0] * corr + s4_at(at);
                    o[j0 + jj][1] = o[j0 + jj][1] * corr + s4_at(at + 4u);
                }
            }
            subgroupBarrier();  // the chunks read before the next ones overwrite them
        }
    }

    const float lsum = l + subgroupShuffleXor(l, 1u);
    if (!(r < RW && r / G < cnt)) return;
    const float inv = lsum == 0.0 ? 0.0 : 1.0 / lsum;  // empty range: zeros
    const uint ob = (pc.out_off + ((b + r / G) * HQ + h * G + r % G) * DP) / 4u;
    [[unroll]] for (int j = 0; j < NK; ++j) {
        [[unroll]] for (int x = 0; x < 2; ++x) {
            const vec4 v = o[j][x] * inv;
            const uint at = ob + 4u * uint(j) + 2u * half_ + uint(x);
#if OUT_F16
            outbuf[at] = uvec2(packHalf2x16(v.xy), packHalf2x16(v.zw));
#else
            outbuf[at] = v;
#endif
        }
    }
}
