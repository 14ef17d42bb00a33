// Reading a quantized pool's vectors (ADR 0011), shared by decode.comp and prefill.comp: set
// before the pool bindings. KVQ 0 plain (nothing here); 1 int8 and 3 fp8 (a vector is 8 bytes,
// uvec2), 2 int4 (8 nibbles, one uint). Affine (1, 2): each vector's group has a (scale, bias)
// pair in kscale/vscale, in the pool's dtype (F16: two halves, F16 && BF16: two bfloat16 halves,
// else a float32 vec2); values are q * scale + bias. fp8: e4m3fn * the pool's K or V scale
// (KSC / VSC: float bits).
#ifndef KVQ
#define KVQ 0
#endif
#define KVQ_AFFINE (KVQ == 1 || KVQ == 2)
#if KVQ
#define VEC 8
#if KVQ == 2
#define VTYPE uint
#else
#define VTYPE uvec2
#endif
#if KVQ_AFFINE && !F16
#define SCT vec2
#else
#define SCT uint
#endif
#if KVQ == 3
#define KSCALE uintBitsToFloat(uint(KSC))
#define VSCALE uintBitsToFloat(uint(VSC))
#else
#define KSCALE 1.0
#define VSCALE 1.0
#endif

vec2 scale_bias(SCT s) {
#if !KVQ_AFFINE
    return vec2(1.0, 0.0);
#elif F16 && BF16
    return vec2(uintBitsToFloat(s << 16), uintBitsToFloat(s & 0xFFFF0000u));
#elif F16
    return unpackHalf2x16(s);
#else
    return s;
#endif
}

float e4m3(uint b) {  // an e4m3fn byte, exactly (the quantizer never writes its NaN codes)
    uint e = (b >> 3) & 15u;
    float m = float(b & 7u);
    float mag = e == 0u ? m * (1.0 / 512.0) : (1.0 + m * 0.125) * exp2(float(e) - 7.0);
    return (b & 0x80u) != 0u ? -mag : mag;
}

// The 8 values of one vector: v its packed data, s its group's (scale, bias), fs the fp8 scale.
void dequant(VTYPE v, SCT s, float fs, out float f[VEC]) {
#if KVQ == 1
    vec2 sb = scale_bias(s);
    for (int c = 0; c < 2; ++c)
        for (int j = 0; j < 4; ++j) f[4 * c + j] = float((v[c] >> (8 * j)) & 0xFFu) * sb.x + sb.y;
#elif KVQ == 2
    vec2 sb = scale_bias(s);
    for (int j = 0; j < 8; ++j) f[j] = float((v >> (4 * j)) & 0xFu) * sb.x + sb.y;
#else
    for (int c = 0; c < 2; ++c)
        for (int j = 0; j < 4; ++j) f[4 * c + j] = e4m3((v[c] >> (8 * j)) & 0xFFu) * fs;
#endif
}
#endif
