// Target prologue: CPU emulation, for tests only (tests/backends/kernel_emulation.py). Mirrors
// shaders/mlx/target_cuda.h name for name so the shared bodies compile unchanged with g++:
// each GPU thread of a threadgroup is a fiber (ucontext) of one OS thread, switched at
// barriers, so a threadgroup's fibers really interleave at every PA_BARRIER and warp shuffle
// (a shuffle is an exchange through memory between two barriers of the warp's 32 fibers);
// threadgroups run one after another, so PA_SHARED can be static. What it checks is the
// bodies' logic (indexing, unpacking, dequantization, softmax, split-K, barriers reached by
// every thread); loads, NVRTC/Metal compilation and timing are the GPU's.
//@@ header
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#define PA_FN inline
#define PA_SHARED static
#define PA_BARRIER() pa_cpu_wait(pa_cpu_cta)
#define PA_UNROLL
#define PA_LOAD16(p) pa_load16(p)
#define PA_ZERO16 pa_u32x4{0u, 0u, 0u, 0u}
// A kernel input written in place (PA_APPEND's store of the new K/V row into the pools,
// which MLX passes as const inputs: the kernel owns that row during the step).
#define PA_WRITABLE(type, p) (const_cast<type*>(p))
#define PA_LOAD16_STREAM(p) pa_load16(p)
#define PA_PREFETCH_L2(p) ((void)(p))

typedef long long pa_i64;
typedef unsigned int pa_u32;
struct pa_u32x4 { pa_u32 x, y, z, w; };
struct pa_bf16 { uint16_t bits; };

// Fibers: pa_cpu_tid is the running one; a barrier counts arrivals, and a fiber that is not
// the last yields to the scheduler until the barrier's generation moves on.
struct pa_cpu_barrier { int count = 0, arrived = 0, gen = 0; };
struct pa_cpu_fiber { ucontext_t ctx; bool done = false; std::vector<char> stack; };
int pa_cpu_tid;
int pa_cpu_group[3];
long pa_cpu_progress;
ucontext_t pa_cpu_main;
std::vector<pa_cpu_fiber> pa_cpu_fibers;
const std::function<void()>* pa_cpu_kernel;
pa_cpu_barrier pa_cpu_cta;
pa_cpu_barrier pa_cpu_warp[32];
float pa_cpu_lanes[1024];

inline void pa_cpu_wait(pa_cpu_barrier& b) {
  const int gen = b.gen;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
    ++pa_cpu_progress;
    return;
  }
  while (b.gen == gen) swapcontext(&pa_cpu_fibers[pa_cpu_tid].ctx, &pa_cpu_main);
}

// A 16-byte load must be 16-byte aligned on the GPU: here it is checked.
template <class P>
PA_FN pa_u32x4 pa_load16(const P* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16) {
    fprintf(stderr, "misaligned 16-byte load\n");
    abort();
  }
  pa_u32x4 v;
  std::memcpy(&v, p, 16);
  return v;
}
PA_FN float pa_bits_f32(pa_u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
PA_FN float pa_h2f(pa_u32 u) {
  const uint16_t h = (uint16_t)(u & 0xffffu);
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return (float)x;
}
PA_FN float pa_shfl_xor(float x, int mask) {
  const int t = pa_cpu_tid, w = t >> 5;
  pa_cpu_lanes[t] = x;
  pa_cpu_wait(pa_cpu_warp[w]);
  const float y = pa_cpu_lanes[(w << 5) | ((t & 31) ^ mask)];
  pa_cpu_wait(pa_cpu_warp[w]);
  return y;
}
PA_FN float pa_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += pa_shfl_xor(x, o);
  return x;
}
PA_FN float pa_warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, pa_shfl_xor(x, o));
  return x;
}
PA_FN float pa_exp2(float x) { return exp2f(x); }
PA_FN float pa_tanh(float x) { return tanhf(x); }
PA_FN float pa_log2(float x) { return log2f(x); }
PA_FN float pa_fmax(float a, float b) { return fmaxf(a, b); }
PA_FN int pa_imin(int a, int b) { return a < b ? a : b; }
PA_FN int pa_imax(int a, int b) { return a > b ? a : b; }
PA_FN float pa_neg_inf() { return -INFINITY; }
PA_FN float pa_tof(_Float16 x) { return (float)x; }
PA_FN float pa_tof(pa_bf16 x) { return pa_bits_f32((pa_u32)x.bits << 16); }
PA_FN float pa_tof(float x) { return x; }
template <typename U> PA_FN U pa_cvt(float v);
template <> PA_FN _Float16 pa_cvt<_Float16>(float v) { return (_Float16)v; }
template <> PA_FN float pa_cvt<float>(float v) { return v; }
template <> PA_FN pa_bf16 pa_cvt<pa_bf16>(float v) {   // round to nearest even, NaN kept
  pa_u32 u;
  std::memcpy(&u, &v, 4);
  if (std::isnan(v)) return pa_bf16{(uint16_t)((u >> 16) | 0x40u)};
  return pa_bf16{(uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline void pa_cpu_entry() {
  (*pa_cpu_kernel)();
  pa_cpu_fibers[pa_cpu_tid].done = true;
  ++pa_cpu_progress;
}

// Run `kernel` over a grid of threadgroups (one after another) of `threads` threads each; the
// scheduler resumes the unfinished fibers in turn, and stops the program when a whole turn
// makes no progress (threads waiting at a barrier the others never reach).
inline void pa_cpu_launch(int gx, int gy, int gz, int threads, const std::function<void()>& kernel) {
  pa_cpu_kernel = &kernel;
  for (int z = 0; z < gz; ++z)
    for (int y = 0; y < gy; ++y)
      for (int x = 0; x < gx; ++x) {
        pa_cpu_group[0] = x;
        pa_cpu_group[1] = y;
        pa_cpu_group[2] = z;
        pa_cpu_cta = pa_cpu_barrier{threads, 0, 0};
        for (int w = 0; w < threads / 32; ++w) pa_cpu_warp[w] = pa_cpu_barrier{32, 0, 0};
        pa_cpu_fibers.assign(threads, pa_cpu_fiber{});
        for (auto& f : pa_cpu_fibers) {
          f.stack.resize(1 << 18);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &pa_cpu_main;
          makecontext(&f.ctx, pa_cpu_entry, 0);
        }
        for (int left = threads; left > 0;) {
          const long before = pa_cpu_progress;
          left = 0;
          for (int t = 0; t < threads; ++t) {
            if (pa_cpu_fibers[t].done) continue;
            pa_cpu_tid = t;
            swapcontext(&pa_cpu_main, &pa_cpu_fibers[t].ctx);
            left += !pa_cpu_fibers[t].done;
          }
          if (left && pa_cpu_progress == before) {
            fprintf(stderr, "deadlock: threads wait at a barrier the others never reach\n");
            exit(4);
          }
        }
      }
}
//@@ body
  const int pa_tid = pa_cpu_tid;
  const int pa_lane = pa_tid & 31;
  const int pa_warp = pa_tid >> 5;
  const int pa_group_x = pa_cpu_group[0];
  const int pa_group_y = pa_cpu_group[1];
  const int pa_group_z = pa_cpu_group[2];
