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
