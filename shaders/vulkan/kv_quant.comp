#version 450
// KV append into a quantized pool (ADR 0011): the new tokens' K and V rows (float32 [N, HKV, DP],
// already rounded to the pool's dtype by the host) are quantized here and stored at their slots.
// One invocation per (token, head, chunk), grid-stride; slots outside the pool are skipped.
//   KVQ 1 int8, 2 int4 (MLX's affine groups: mx.quantize's scale, bias and packing, element j of a
//         word in bits [j * BITS, (j + 1) * BITS)); a chunk is one group of GS elements, whose
//         (scale, bias) pair goes to kscale/vscale in the pool's dtype (F16: packHalf2x16, BF16:
//         bfloat16 halves, else float32 vec2).
//   KVQ 3 float8 e4m3fn (vLLM's fp8: stored = e4m3fn(x / scale), round to nearest even,
//         saturating at +-448; NaN saturates by its sign as mx.to_fp8); a chunk is 4 elements,
//         one word. K's scale in pc.kscale_bits, V's in pc.vscale_bits.
// Defines: KVQ, DP (padded head dim; a multiple of 8), GS (group size, affine), HKV, F16, BF16, WG.
layout(local_size_x = WG) in;

#define AFFINE (KVQ == 1 || KVQ == 2)
#if KVQ == 2
#define BITS 4
#else
#define BITS 8
#endif
#define PER_WORD (32 / BITS)
#define WPH (DP / PER_WORD)            // data words per (token, head)
#if AFFINE
#define CHUNK GS
#else
#define CHUNK 4
#endif
#define NCH (DP / CHUNK)               // chunks per (token, head)

#if AFFINE && !F16
#define SCT vec2
#else
#define SCT uint
#endif

layout(std430, binding = 0) writeonly buffer KData { uint kdata[]; };
layout(std430, binding = 1) writeonly buffer VData { uint vdata[]; };
layout(std430, binding = 2) readonly buffer KNew { float knew[]; };
layout(std430, binding = 3) readonly buffer VNew { float vnew[]; };
layout(std430, binding = 4) readonly buffer Slots { int slots[]; };
#if AFFINE
layout(std430, binding = 5) writeonly buffer KScale { SCT kscale[]; };  // [slots, HKV, DP / GS]
layout(std430, binding = 6) writeonly buffer VScale { SCT vscale[]; };
#endif

layout(push_constant) uniform Params {
    uint n;            // tokens
    uint src_off;      // float offset of this layer's rows in knew/vnew
    uint slot_off;     // offset into slots
    uint num_slots;    // num_blocks * block_size
    uint kscale_bits;  // fp8: K's scale, float bits
    uint vscale_bits;  // fp8: V's scale
} pc;

#if AFFINE
uint bf16_bits(float x) {  // round to nearest even; NaN stays NaN
    uint u = floatBitsToUint(x);
    return isnan(x) ? ((u >> 16) | 0x40u) : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

SCT pack_scale(float scale, float bias) {
#if F16 && BF16
    return bf16_bits(scale) | (bf16_bits(bias) << 16);
#elif F16
    return packHalf2x16(vec2(scale, bias));
#else
    return vec2(scale, bias);
#endif
}

// One group of GS elements at src: mx.quantize's arithmetic. The scale spans the group's range
// and the edge of larger magnitude is represented exactly; codes use the float32 scale and bias,
// the stored pair is rounded to the pool's dtype.
void quantize_group(uint which, uint src, uint dst, uint sdst) {
    float wmax = -1.0 / 0.0;
    float wmin = 1.0 / 0.0;
    for (uint e = 0u; e < GS; ++e) {
        float w = which == 0u ? knew[src + e] : vnew[src + e];
        wmax = max(wmax, w);
        wmin = min(wmin, w);
    }
    const float n_bins = float((1 << BITS) - 1);
    bool mask = abs(wmin) > abs(wmax);
    float scale = max((wmax - wmin) / n_bins, 1e-7);
    scale = mask ? scale : -scale;
    float edge = mask ? wmin : wmax;
    float q0 = roundEven(edge / scale);
    float bias = 0.0;
    if (q0 != 0.0) {
        scale = edge / q0;
        bias = edge;
    }
    for (uint w = 0u; w < GS / PER_WORD; ++w) {
        uint word = 0u;
        for (uint j = 0u; j < PER_WORD; ++j) {
            float x = which == 0u ? knew[src + w * PER_WORD + j] : vnew[src + w * PER_WORD + j];
            float q = clamp(roundEven((x - bias) / scale), 0.0, n_bins);
            word |= uint(isnan(q) ? 0.0 : q) << (j * BITS);
        }
        if (which == 0u) kdata[dst + w] = word; else vdata[dst + w] = word;
    }
    if (which == 0u) kscale[sdst] = pack_scale(scale, bias); else vscale[sdst] = pack_scale(scale, bias);
}
#else
uint to_e4m3(float x) {
    uint sign = (floatBitsToUint(x) >> 24) & 0x80u;
    float a = isnan(x) ? 448.0 : min(abs(x), 448.0);
    int e;
    frexp(a, e);                                  // a = m * 2^e, m in [0.5, 1)
    e = max(e - 1, -6);
    float step = ldexp(1.0, e - 3);               // the grid step at a (subnormals: 2^-9)
    float v = min(roundEven(a / step) * step, 448.0);
    uint code;
    if (v >= 0.015625) {                          // normal: 2^-6 and up
        int ev;
        frexp(v, ev);
        ev -= 1;
        code = uint((ev + 7) << 3) + uint(ldexp(v, -ev) * 8.0 - 8.0);
    } else {
        code = uint(v * 512.0);
    }
    return code | sign;
}
#endif

void main() {
    const uint total = pc.n * HKV * NCH;
    const uint stride = gl_NumWorkGroups.x * WG;
    for (uint i = gl_GlobalInvocationID.x; i < total; i += stride) {
        uint t = i / (HKV * NCH);
        uint hc = i - t * (HKV * NCH);            // head * NCH + chunk
        int s = slots[pc.slot_off + t];
        if (s < 0 || uint(s) >= pc.num_slots) continue;
        uint head = hc / NCH;
        uint c = hc - head * NCH;
        uint src = pc.src_off + (t * HKV + head) * DP + c * CHUNK;
        uint dst = (uint(s) * HKV + head) * WPH + c * (CHUNK / PER_WORD);
#if AFFINE
        uint sdst = (uint(s) * HKV + head) * NCH + c;
        quantize_group(0u, src, dst, sdst);
        quantize_group(1u, src, dst, sdst);
#else
        const float ks = uintBitsToFloat(pc.kscale_bits);
        const float vs = uintBitsToFloat(pc.vscale_bits);
        uint kw = 0u, vw = 0u;
        for (uint j = 0u; j < 4u; ++j) {
            kw |= to_e4m3(knew[src + j] / ks) << (8u * j);
            vw |= to_e4m3(vnew[src + j] / vs) << (8u * j);
        }
        kdata[dst] = kw;
        vdata[dst] = vw;
#endif
    }
}
