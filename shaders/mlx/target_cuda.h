// Target prologue: CUDA (mx.fast.cuda_kernel, compiled by NVRTC inside MLX).
// Everything target-specific the shared bodies need is defined here and in target_metal.h;
// the bodies (paged_decode.body, paged_reduce.body) and common.h use only these names.
//@@ header
#define PA_FN __device__ __forceinline__
#define PA_SHARED __shared__
#define PA_BARRIER() __syncthreads()
#define PA_UNROLL _Pragma("unroll")
// One 16-byte vector load (LDG.128); p must be 16-byte aligned.
#define PA_LOAD16(p) (*reinterpret_cast<const uint4*>(p))
#define PA_ZERO16 make_uint4(0u, 0u, 0u, 0u)
// A kernel input written in place (PA_APPEND's store of the new K/V row into the pools,
// which MLX passes as const inputs: the kernel owns that row during the step).
#define PA_WRITABLE(type, p) (const_cast<type*>(p))
// Streaming variants (LDNC): 1 read-only path without L1 allocation, 2 the same plus a 256-byte
// L2 fetch (a whole K/V row per miss), 3 a plain load with the 256-byte L2 fetch.
#define PA_LOAD16_STREAM(p) pa_ld_stream<LDNC>(reinterpret_cast<const uint4*>(p))
// Hint: start fetching the 128-byte line at p into L2 (no register, no wait), so more bytes are
// in flight than the registers of a tile can hold.
#define PA_PREFETCH_L2(p) asm volatile("prefetch.global.L2 [%0];" ::"l"(p))

typedef long long pa_i64;
typedef unsigned int pa_u32;
typedef uint4 pa_u32x4;

template <int MODE>
PA_FN uint4 pa_ld_stream(const uint4* p) {
  uint4 v;
  if (MODE == 1) {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else if (MODE == 2) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm("ld.global.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  }
  return v;
}
PA_FN float pa_bits_f32(pa_u32 u) { return __uint_as_float(u); }
// float16 bits in the low half of u -> float
PA_FN float pa_h2f(pa_u32 u) { return __half2float(__ushort_as_half((unsigned short)(u & 0xffffu))); }
PA_FN float pa_shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }
PA_FN float pa_warp_sum(float x) {
  PA_UNROLL
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
PA_FN float pa_warp_max(float x) {
  PA_UNROLL
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
PA_FN float pa_exp2(float x) { return exp2f(x); }
// Attention variants only (ADR 0010): the soft-cap and the log-sum-exp, both at full precision.
PA_FN float pa_tanh(float x) { return tanhf(x); }
PA_FN float pa_log2(float x) { return log2f(x); }
PA_FN float pa_fmax(float a, float b) { return fmaxf(a, b); }
PA_FN int pa_imin(int a, int b) { return a < b ? a : b; }
PA_FN int pa_imax(int a, int b) { return a > b ? a : b; }
PA_FN float pa_neg_inf() { return __int_as_float(0xff800000); }
PA_FN float pa_tof(__half x) { return __half2float(x); }
PA_FN float pa_tof(__nv_bfloat16 x) { return __bfloat162float(x); }
PA_FN float pa_tof(float x) { return x; }
template <typename U> PA_FN U pa_cvt(float v);
template <> PA_FN __half pa_cvt<__half>(float v) { return __float2half_rn(v); }
template <> PA_FN __nv_bfloat16 pa_cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> PA_FN float pa_cvt<float>(float v) { return v; }
//@@ body
  const int pa_tid = (int)threadIdx.x;
  const int pa_lane = pa_tid & 31;
  const int pa_warp = pa_tid >> 5;
  const int pa_group_x = (int)blockIdx.x;
  const int pa_group_y = (int)blockIdx.y;
  const int pa_group_z = (int)blockIdx.z;
