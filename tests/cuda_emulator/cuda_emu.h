// A CPU emulation of the CUDA subset that TVM's CUDA codegen emits, for testing optc's GPU code
// on machines without a GPU (tests/cuda_emulation.py drives it).
//
// Every GPU thread of a block is a fiber (ucontext); __syncthreads and warp shuffles are barriers
// among the fibers; blocks run one after another. __shared__ arrays become function statics,
// shared by the fibers of the block that runs. Vector types carry their CUDA alignment, so
// -fsanitize=alignment reports the loads that would fault on a GPU (cudaErrorMisalignedAddress).
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>

#define uint unsigned int
#define uchar unsigned char
#define ushort unsigned short
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(2) uchar2 { unsigned char x, y; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(2) char2 { signed char x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline int2 make_int2(int a, int b) { return {a, b}; }
static inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
static inline longlong2 make_longlong2(long long a, long long b) { return {a, b}; }
static inline ushort2 make_ushort2(unsigned short a, unsigned short b) { return {a, b}; }
static inline uchar2 make_uchar2(unsigned char a, unsigned char b) { return {a, b}; }
static inline uchar4 make_uchar4(unsigned char a, unsigned char b, unsigned char c, unsigned char d) { return {a, b, c, d}; }
static inline char2 make_char2(signed char a, signed char b) { return {a, b}; }
static inline char4 make_char4(signed char a, signed char b, signed char c, signed char d) { return {a, b, c, d}; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
using half = _Float16;  // IEEE binary16, as numpy.float16 and CUDA half
using std::max;
using std::min;

struct emu_dim3 { unsigned x, y, z; };
struct EmuFiber { ucontext_t ctx; emu_dim3 tid; int lane, warp; bool done; int waiting; };
struct EmuWarp { uint64_t slot[32]; int count; unsigned long gen; };
extern EmuFiber* emu_cur;
extern emu_dim3 emu_block_idx, emu_block_dim, emu_grid_dim;
extern EmuWarp emu_warps[32];
extern int emu_block_count, emu_live;
extern unsigned long emu_block_gen;
void emu_yield();
unsigned emu_activemask();
void emu_launch(const std::function<void()>& body, emu_dim3 grid, emu_dim3 block);

#define threadIdx (emu_cur->tid)
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim

static inline void __syncthreads() {
  unsigned long gen = emu_block_gen;
  if (++emu_block_count == emu_live) { emu_block_count = 0; ++emu_block_gen; return; }
  emu_cur->waiting = 1;
  while (emu_block_gen == gen) emu_yield();
  emu_cur->waiting = 0;
}

static inline void emu_warp_barrier(unsigned mask) {
  EmuWarp& w = emu_warps[emu_cur->warp];
  unsigned long gen = w.gen;
  if (++w.count == __builtin_popcount(mask)) { w.count = 0; ++w.gen; return; }
  emu_cur->waiting = 2;
  while (w.gen == gen) emu_yield();
  emu_cur->waiting = 0;
}

static inline unsigned __activemask() { return emu_activemask(); }

// mode 0: from lane `arg` of the segment; 1: from lane + arg (down); 2: from lane - arg (up)
template <class T> static inline T emu_shfl(unsigned mask, T v, int arg, int mode, int width) {
  EmuWarp& w = emu_warps[emu_cur->warp];
  int lane = emu_cur->lane;
  if (!(mask >> lane & 1)) { fprintf(stderr, "EMU: a shuffle by lane %d, outside its mask\n", lane); abort(); }
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  emu_warp_barrier(mask);  // every lane of the mask has published its value
  int base = lane & ~(width - 1), src;
  if (mode == 0) src = base + arg % width;
  else if (mode == 1) src = lane + arg < base + width ? lane + arg : lane;
  else src = lane - arg >= base ? lane - arg : lane;
  T r;
  uint64_t got = w.slot[src];
  memcpy(&r, &got, sizeof(T));
  emu_warp_barrier(mask);  // every lane has read before any lane publishes again
  return r;
}
template <class T> static inline T __shfl_sync(unsigned m, T v, int l, int w = 32) { return emu_shfl(m, v, l, 0, w); }
template <class T> static inline T __shfl_down_sync(unsigned m, T v, int d, int w = 32) { return emu_shfl(m, v, d, 1, w); }
template <class T> static inline T __shfl_up_sync(unsigned m, T v, int d, int w = 32) { return emu_shfl(m, v, d, 2, w); }
