// Target prologue: Metal (mx.fast.metal_kernel). Mirrors target_cuda.h name for name.
// MLX prepends metal_stdlib and `using namespace metal;`; bodies are templated kernels there.
//@@ header
#define PA_FN inline
#define PA_SHARED threadgroup
#define PA_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define PA_UNROLL _Pragma("clang loop unroll(full)")
// One 16-byte vector load; p must be 16-byte aligned and in the device address space.
#define PA_LOAD16(p) (*reinterpret_cast<const device uint4*>(p))
#define PA_ZERO16 uint4(0u)
// A kernel input written in place (PA_APPEND's store of the new K/V row into the pools,
// which MLX passes as const inputs: the kernel owns that row during the step).
#define PA_WRITABLE(type, p) (const_cast<device type*>(p))
// Streaming variant: Metal has no L1-bypass hint here; same as PA_LOAD16.
#define PA_LOAD16_STREAM(p) PA_LOAD16(p)
// L2 prefetch hint: Metal exposes none, so it compiles to nothing (the logic is unchanged).
#define PA_PREFETCH_L2(p) ((void)(p))

typedef long pa_i64;
typedef uint pa_u32;
typedef uint4 pa_u32x4;

PA_FN float pa_bits_f32(pa_u32 u) { return as_type<float>(u); }
// float16 bits in the low half of u -> float
PA_FN float pa_h2f(pa_u32 u) { return float(as_type<half>(ushort(u & 0xffffu))); }
PA_FN float pa_shfl_xor(float x, int mask) { return simd_shuffle_xor(x, ushort(mask)); }
PA_FN float pa_warp_sum(float x) { return simd_sum(x); }
PA_FN float pa_warp_max(float x) { return simd_max(x); }
PA_FN float pa_exp2(float x) { return metal::exp2(x); }
// Attention variants only (ADR 0010). precise:: because Metal compiles with fast math, whose
// tanh is not accurate for large |x| (MLX's own Tanh uses precise:: for the same reason).
PA_FN float pa_tanh(float x) { return metal::precise::tanh(x); }
PA_FN float pa_log2(float x) { return metal::precise::log2(x); }
PA_FN float pa_fmax(float a, float b) { return metal::fmax(a, b); }
PA_FN int pa_imin(int a, int b) { return a < b ? a : b; }
PA_FN int pa_imax(int a, int b) { return a > b ? a : b; }
PA_FN float pa_neg_inf() { return as_type<float>(0xff800000u); }
template <typename U> PA_FN float pa_tof(U x) { return static_cast<float>(x); }
template <typename U> PA_FN U pa_cvt(float v) { return static_cast<U>(v); }
//@@ body
  const int pa_tid = int(thread_position_in_threadgroup.x);
  const int pa_lane = int(thread_index_in_simdgroup);
  const int pa_warp = int(simdgroup_index_in_threadgroup);
  const int pa_group_x = int(threadgroup_position_in_grid.x);
  const int pa_group_y = int(threadgroup_position_in_grid.y);
  const int pa_group_z = int(threadgroup_position_in_grid.z);
