// Shared helpers, written only in terms of the target prologue (target_cuda.h / target_metal.h).

// Unpack one 32-bit word of K/V data into floats. KIND: 0 float16, 1 bfloat16, 2 float32.
// 16-bit kinds give two values (element 2i in the low half, little-endian); float32 gives one.
template <int KIND>
PA_FN float pa_lo(pa_u32 w) {
  return KIND == 2 ? pa_bits_f32(w) : (KIND == 1 ? pa_bits_f32(w << 16) : pa_h2f(w));
}
template <int KIND>
PA_FN float pa_hi(pa_u32 w) {
  return KIND == 1 ? pa_bits_f32(w & 0xffff0000u) : pa_h2f(w >> 16);
}

// Unpack a 16-byte vector W (pa_u32x4) of KIND data into F[0..8) (float32: F[0..4)).
#define PA_UNPACK16(W, F)                                                  \
  do {                                                                     \
    if (KIND == 2) {                                                       \
      F[0] = pa_bits_f32(W.x); F[1] = pa_bits_f32(W.y);                    \
      F[2] = pa_bits_f32(W.z); F[3] = pa_bits_f32(W.w);                    \
    } else {                                                               \
      F[0] = pa_lo<KIND>(W.x); F[1] = pa_hi<KIND>(W.x);                    \
      F[2] = pa_lo<KIND>(W.y); F[3] = pa_hi<KIND>(W.y);                    \
      F[4] = pa_lo<KIND>(W.z); F[5] = pa_hi<KIND>(W.z);                    \
      F[6] = pa_lo<KIND>(W.w); F[7] = pa_hi<KIND>(W.w);                    \
    }                                                                      \
  } while (0)

// Quantized K/V (paged_decode.body, PA_KV 1 int8, 2 int4, 3 float8_e4m3): the element in the
// low bits of w. Affine codes come back as exact floats through the 2^23 trick (an OR and a
// subtraction instead of an int-to-float conversion, which runs at a fraction of the FMA rate
// on NVIDIA GPUs); the group's scale and bias are applied by the caller. An e4m3fn code becomes
// a float16 of the same sign, exponent bits and mantissa bits (bias 15 for 7: value / 2^8, its
// subnormals exact, as float16 subnormals), so the kernel's fp8 scales carry the 2^8; codes
// 0x7f/0xff (NaN) read as +-480, but pools never hold them (writes saturate at +-448).
template <int KV>
PA_FN float pa_kv_elem(pa_u32 w) {
  if (KV == 3) {
    return pa_h2f(((w & 0x7fu) << 7) | ((w & 0x80u) << 8));
  }
  return pa_bits_f32(0x4B000000u | (w & (KV == 2 ? 0xfu : 0xffu))) - 8388608.0f;
}

// Unpack a 16-byte vector W (pa_u32x4) of quantized data into F[0..128 / PA_QB): element i of
// a word in its bits [i * PA_QB, (i + 1) * PA_QB), words in order (MLX's packing).
#define PA_UNPACK_KV(W, F)                                                 \
  do {                                                                     \
    const pa_u32 pa_w4[4] = {W.x, W.y, W.z, W.w};                          \
    PA_UNROLL                                                              \
    for (int i = 0; i < 4; ++i) {                                          \
      PA_UNROLL                                                            \
      for (int b = 0; b < 32 / PA_QB; ++b) {                               \
        F[i * (32 / PA_QB) + b] = pa_kv_elem<PA_KV>(pa_w4[i] >> (b * PA_QB)); \
      }                                                                    \
    }                                                                      \
  } while (0)
