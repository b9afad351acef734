// GPU kernels that candle 0.11 lacks or runs slowly: flash attention, a fused group norm
// (+ SiLU) and its input gradient, a bias add, the GEGLU gate, leaky ReLU and nearest x2
// upsampling. Compiled to PTX by build.rs (feature `cuda`) and loaded through candle's
// custom-kernel API; the Rust side is `src/cuda/` (a module per kind of op).
#include <cuda_fp16.h>
#include <type_traits>

// ---------------------------------------------------------------------------------------------
// Flash attention, forward only (the online softmax of Dao et al.) on raw
// `mma.sync.m16n8k16` tensor-core instructions in FlashAttention-2's register layout: scores,
// probabilities and the output accumulator stay in registers, where each thread knows which
// rows it holds, so the [N, M] score matrix never leaves the SM and the softmax needs no
// shared-memory round trip. fp16 in and out, fp32 accumulation (so SD 2.x's "upcast
// attention" holds too).
//
// q: [B, N, H*D], k and v: [B, M, H*D], o: [B, N, H*D], rows contiguous: the layout of the
// projections' outputs, so no head split or merge copies are needed. DP is the head dim padded
// to a multiple of 16 (D % 8 == 0 is required for 16-byte loads).
//
// Keeping the tensor cores fed (a first version without these ran 1.4-2.5x slower):
//  - K and V tiles of 64 keys arrive by `cp.async` (global -> shared without passing through
//    registers) into two stages: tile i+1 is in flight while tile i is computed; one
//    __syncthreads per tile.
//  - K and V B fragments come from `ldmatrix.x4` (K plain, V transposed), each covering two
//    8-wide n tiles.
//  - For DP <= 64 each warp owns 32 query rows (two m16 tiles, WM = 2; block 128 rows) and
//    every B fragment it loads feeds two mma instead of one, halving shared-memory reads per
//    mma (256 bytes per 4096-flop mma at the SM's 128 bytes/clock would make shared memory,
//    not the tensor cores, set the pace), and each K/V tile in shared memory serves 128 rows.
//    Larger head dims keep WM = 1 (64 rows): two tiles' accumulators would not fit in 255
//    registers.
//
// Grid (ceil(N / fa_rows<DP>()), B * H): consecutive blocks share (b, h), so K and V of a head
// stay hot in L2. Block 128 threads. Dynamic shared memory 2 stages x (K + V) x 64 x (DP + 8)
// halves; src/cuda.rs (`flash_launch`) mirrors these figures.
//
// Shared layout in halves, each tile [64][LDH]: stage s has K at s * 2 * 64 * LDH and V right
// after it. The Q tile (up to 128 rows = K + V of one stage) is staged through stage 1 at the
// start, before tile 1 goes there.
//
// Fragment layouts (PTX ISA, m16n8k16, g = lane / 4, t = lane % 4): A registers hold
// (row g, cols 2t..2t+1), (row g+8, same), (row g, cols 2t+8..), (row g+8, cols 2t+8..); B
// registers (k 2t..2t+1, col g), (k 2t+8.., col g); C holds (row g, cols 2t, 2t+1) then
// (row g+8, same).

constexpr int BC = 64;  // keys per tile

// Row stride of a shared tile in halves: padded against bank conflicts.
template <int DP>
__host__ __device__ constexpr int tile_ld() {
  return DP + 8;
}

__device__ __forceinline__ unsigned pack_half2(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<unsigned*>(&h);
}

__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

constexpr int FA_WARPS = 4;
constexpr int FA_THREADS = FA_WARPS * 32;

// m16 row tiles per warp.
template <int DP>
__host__ __device__ constexpr int fa_wm() {
  return DP <= 64 ? 2 : 1;
}

// Query rows per block.
template <int DP>
__host__ __device__ constexpr int fa_rows() {
  return FA_WARPS * 16 * fa_wm<DP>();
}

// Blocks per SM that registers must allow (__launch_bounds__): DP <= 48 (SD 1.x's head dim 40
// pads to 48) fits in 168 registers without spilling (ptxas 13.0, sm_90), so three blocks (12
// warps) share an SM; larger DP need ~200-240 registers: two blocks.
template <int DP>
__host__ __device__ constexpr int fa_min_blocks() {
  return DP <= 48 ? 3 : 2;
}

// 16 bytes global -> shared, asynchronously; when !valid nothing is read (src-size 0) and the
// 16 bytes are zero-filled. `src` must still be a valid, aligned address: callers pass the
// matrix base then.
__device__ __forceinline__ void cp_async_16(half* dst, const half* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies become visible only after a __syncthreads that follows their own wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [first, first + ROWS) of a [rows, ld] matrix, columns [0, DP), into shared [ROWS][LDH]
// by cp.async; rows >= `rows` and columns >= D are zero-filled (D % 8 == 0, so a 16-byte unit
// is either wholly inside [0, D) or wholly outside). Every element of [ROWS][0, DP) is written,
// so nothing of an earlier tile survives in the stage. Each thread keeps one 16-byte column
// unit and walks rows STEP apart (threads past STEP * UNITS idle): little address arithmetic
// to keep live across the main loop.
template <int DP, int ROWS>
__device__ __forceinline__ void load_tile_async(half* dst, const half* src, size_t ld, int first,
                                                int rows, int D) {
  constexpr int UNITS = DP / 8;             // 16-byte units per row
  constexpr int STEP = FA_THREADS / UNITS;  // rows per pass
  constexpr int PASSES = (ROWS + STEP - 1) / STEP;
  const int r0 = threadIdx.x / UNITS, c = (threadIdx.x % UNITS) * 8;
  if (r0 >= STEP) return;
  const bool col_ok = c < D;
#pragma unroll
  for (int p = 0; p < PASSES; p++) {
    const int r = r0 + p * STEP;
    if (ROWS % STEP == 0 || r < ROWS) {
      const bool valid = col_ok && first + r < rows;
      const half* from = valid ? src + (size_t)(first + r) * ld + c : src;
      cp_async_16(dst + r * tile_ld<DP>() + c, from, valid);
    }
  }
}

// ldmatrix .x4: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses (16 bytes each,
// 16-byte aligned) of matrix i, and register i receives matrix i's fragment: without .trans,
// lane L holds (row L/4, cols 2(L%4), 2(L%4)+1); with .trans, (rows 2(L%4), 2(L%4)+1, col L/4)
// of the matrix as stored.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const half* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const half* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// q's rows are `ldq` halves apart and k's and v's `ldkv` (H * D when packed; more where they are
// slices of one fused projection's rows); o is written packed, rows H * D apart.
template <int DP>
__device__ void flash_attention(const half* q, const half* k, const half* v, half* o, int N,
                                   int M, int H, int D, int ldq, int ldkv, float scale_log2) {
  constexpr int LDH = tile_ld<DP>();
  constexpr int WM = fa_wm<DP>();
  constexpr int ROWS = fa_rows<DP>();
  constexpr int NT = BC / 8;   // score tiles of 8 keys
  constexpr int DT = DP / 8;   // output tiles of 8 dims (even: DP % 16 == 0)
  constexpr int KD = DP / 16;  // k steps of S = Q K^T
  constexpr int STAGE = 2 * BC * LDH;
  static_assert(ROWS <= 2 * BC, "the Q tile is staged in one K + V stage");
  static_assert(NT % 2 == 0 && DT % 2 == 0, "ldmatrix.x4 covers two n tiles");
  extern __shared__ __align__(16) unsigned char smem[];
  half* const sm = (half*)smem;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int b = blockIdx.y / H, h = blockIdx.y % H;
  const int row0 = blockIdx.x * ROWS;
  const size_t ld = (size_t)H * D;
  const half* qb = q + (size_t)b * N * ldq + (size_t)h * D;
  const half* kb = k + (size_t)b * M * ldkv + (size_t)h * D;
  const half* vb = v + (size_t)b * M * ldkv + (size_t)h * D;
  half* ob = o + (size_t)b * N * ld + (size_t)h * D;
  const int tiles = (M + BC - 1) / BC;

  // Prologue: Q into stage 1, tile 0 into stage 0, one group.
  load_tile_async<DP, ROWS>(sm + STAGE, qb, ldq, row0, N, D);
  load_tile_async<DP, BC>(sm, kb, ldkv, 0, M, D);
  load_tile_async<DP, BC>(sm + BC * LDH, vb, ldkv, 0, M, D);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // Q A fragments: warp w, tile mt holds rows (w * WM + mt) * 16 .. + 15 of the block.
  // A layout (m16n8k16, g = lane / 4, t = lane % 4): a0 (row g, cols 2t, 2t+1), a1 (row g+8,
  // same cols), a2 (row g, cols 2t+8, 2t+9), a3 (row g+8, cols 2t+8, 2t+9).
  unsigned qa[WM][KD][4];
#pragma unroll
  for (int mt = 0; mt < WM; mt++) {
    const half* qw = sm + STAGE + (warp * WM + mt) * 16 * LDH;
#pragma unroll
    for (int kk = 0; kk < KD; kk++) {
      qa[mt][kk][0] = *(const unsigned*)(qw + g * LDH + kk * 16 + 2 * t);
      qa[mt][kk][1] = *(const unsigned*)(qw + (g + 8) * LDH + kk * 16 + 2 * t);
      qa[mt][kk][2] = *(const unsigned*)(qw + g * LDH + kk * 16 + 2 * t + 8);
      qa[mt][kk][3] = *(const unsigned*)(qw + (g + 8) * LDH + kk * 16 + 2 * t + 8);
    }
  }
  __syncthreads();  // every warp has its Q: stage 1 may take tile 1

  // Per-lane ldmatrix row addresses (offsets in halves within a tile).
  // K (S = Q K^T, B[k = dim][n = key] = K[key][dim]): the B fragment of n tile j and k step kk
  // is b0 = (dims 16kk + 2t, +1; key 8j + g), b1 = (dims 16kk + 8 + 2t, +1; key 8j + g). In
  // shared K[key][dim] these are row fragments of the 8x8 matrices (keys 8j.., dims 16kk..)
  // and (keys 8j.., dims 16kk + 8..), so plain ldmatrix with matrices 0..3 = (j, low dims),
  // (j, high dims), (j+1, low), (j+1, high) gives b0, b1 of j then b0, b1 of j + 1. Lane L
  // addresses matrix L / 8, row L % 8: key 8 * (L / 16) + L % 8, dim 8 * ((L / 8) % 2).
  const int k_lane = (8 * (lane / 16) + lane % 8) * LDH + 8 * ((lane / 8) % 2);
  // V (O += P V, B[k = key][n = dim] = V[key][dim]): b0 = (keys 16kk + 2t, +1; dim 8j + g),
  // b1 = (keys 16kk + 8 + 2t, +1; dim 8j + g): column pairs of V[key][dim], i.e. the
  // transposed-load fragment of the 8x8 matrices (keys 16kk.., dims 8j..) and (keys 16kk + 8..,
  // dims 8j..). Matrices 0..3 = (low keys, j), (high keys, j), (low keys, j+1), (high keys,
  // j+1). Lane L addresses key L % 16 (= 8 * ((L / 8) % 2) + L % 8), dim 8 * (L / 16).
  const int v_lane = (lane % 16) * LDH + 8 * (lane / 16);

  float m[WM][2], l[WM][2];
  float acc[WM][DT][4];
#pragma unroll
  for (int mt = 0; mt < WM; mt++) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int j = 0; j < DT; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[mt][j][e] = 0.f;
  }

  for (int tile = 0; tile < tiles; tile++) {
    const int c0 = tile * BC;
    // Tile + 1 into the other stage. Its last readers (tile - 1's compute, or the Q fragment
    // loads) are all behind the __syncthreads that ended the previous iteration.
    if (tile + 1 < tiles) {
      half* next = sm + ((tile + 1) & 1) * STAGE;
      load_tile_async<DP, BC>(next, kb, ldkv, c0 + BC, M, D);
      load_tile_async<DP, BC>(next + BC * LDH, vb, ldkv, c0 + BC, M, D);
      cp_async_commit();
    }
    const half* ks = sm + (tile & 1) * STAGE;
    const half* vs = ks + BC * LDH;

    // S = Q K^T; C layout: s[mt][j] holds (row g, keys 8j + 2t, +1) then (row g + 8, same).
    float s[WM][NT][4];
#pragma unroll
    for (int mt = 0; mt < WM; mt++)
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) s[mt][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; kk++)
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        unsigned kf[4];
        ldmatrix_x4(kf, ks + j * 8 * LDH + kk * 16 + k_lane);
#pragma unroll
        for (int mt = 0; mt < WM; mt++) {
          mma_16816(s[mt][j], qa[mt][kk], kf[0], kf[1]);
          mma_16816(s[mt][j + 1], qa[mt][kk], kf[2], kf[3]);
        }
      }

    // Online softmax, the usual arithmetic, per m tile: rows g (e = 0, 1) and g + 8
    // (e = 2, 3), a row's 64 scores spread over the 4 lanes of a quad. Keys >= M (only in the
    // last tile) get -inf, hence probability 0; every tile has a key < M, so the max is finite.
    const bool ragged = c0 + BC > M;
    unsigned pa[WM][BC / 16][4];  // P as fp16 A fragments
#pragma unroll
    for (int mt = 0; mt < WM; mt++) {
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float x = s[mt][j][e] * scale_log2;
          if (ragged && c0 + j * 8 + 2 * t + (e & 1) >= M) x = -INFINITY;
          s[mt][j][e] = x;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; r++) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
        const float m_new = fmaxf(m[mt][r], tile_max[r]);
        alpha[r] = exp2f(m[mt][r] - m_new);
        m[mt][r] = m_new;
      }
      float tile_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const float p = exp2f(s[mt][j][e] - m[mt][e >> 1]);
          s[mt][j][e] = p;
          tile_sum[e >> 1] += p;
        }
#pragma unroll
      for (int r = 0; r < 2; r++) {
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 1);
        tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], 2);
        l[mt][r] = l[mt][r] * alpha[r] + tile_sum[r];
      }
#pragma unroll
      for (int j = 0; j < DT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[mt][j][e] *= alpha[e >> 1];
      // Score tiles 2kk and 2kk + 1 (keys 16kk + 2t.. and 16kk + 8 + 2t.., rows g and g + 8)
      // are exactly the A fragment a0..a3 of keys 16kk..16kk + 15.
#pragma unroll
      for (int kk = 0; kk < BC / 16; kk++) {
        pa[mt][kk][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][kk][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][kk][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++)
#pragma unroll
      for (int j = 0; j < DT; j += 2) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, vs + kk * 16 * LDH + j * 8 + v_lane);
#pragma unroll
        for (int mt = 0; mt < WM; mt++) {
          mma_16816(acc[mt][j], pa[mt][kk], vf[0], vf[1]);
          mma_16816(acc[mt][j + 1], pa[mt][kk], vf[2], vf[3]);
        }
      }

    // Tile + 1 has landed (this thread's part, then everyone's), and nobody reads this stage
    // any more: the next iteration may fill it with tile + 2.
    cp_async_wait<0>();
    __syncthreads();
  }

#pragma unroll
  for (int mt = 0; mt < WM; mt++)
#pragma unroll
    for (int r = 0; r < 2; r++) {
      const int n = row0 + (warp * WM + mt) * 16 + g + 8 * r;
      if (n >= N) continue;
      const float inv_l = 1.f / l[mt][r];
      half* out = ob + (size_t)n * ld;
#pragma unroll
      for (int j = 0; j < DT; j++) {
        const int c = j * 8 + 2 * t;
        if (c < D)
          *(__half2*)(out + c) =
              __floats2half2_rn(acc[mt][j][2 * r] * inv_l, acc[mt][j][2 * r + 1] * inv_l);
      }
    }
}

#define FLASH_ATTENTION(DP)                                                               \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, fa_min_blocks<DP>())              \
      flash_attention_f16_##DP(const half* q, const half* k, const half* v, half* o, int N, \
                                int M, int H, int D, int ldq, int ldkv, float scale_log2) {  \
    flash_attention<DP>(q, k, v, o, N, M, H, D, ldq, ldkv, scale_log2);                   \
  }

FLASH_ATTENTION(16)
FLASH_ATTENTION(32)
FLASH_ATTENTION(48)
FLASH_ATTENTION(64)
FLASH_ATTENTION(80)
FLASH_ATTENTION(96)
FLASH_ATTENTION(128)
FLASH_ATTENTION(160)

// ---------------------------------------------------------------------------------------------
// Element conversions, vector loads and a warp's sum, shared by the kernels below.

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f(half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f(float x) { return x; }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ half from_f(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ float from_f(float x) { return x; }

// VEC consecutive elements as floats, in one load of up to 16 bytes where they fit (the
// offsets are multiples of VEC: the caller's geometry), and back.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (sizeof(T) * VEC == 16 || sizeof(T) * VEC == 8 || sizeof(T) * VEC == 4) {
    using Raw = std::conditional_t<sizeof(T) * VEC == 16, uint4,
                                   std::conditional_t<sizeof(T) * VEC == 8, uint2, unsigned>>;
    const Raw raw = *reinterpret_cast<const Raw*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; i++) out[i] = to_f(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) out[i] = to_f(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (sizeof(T) * VEC == 16 || sizeof(T) * VEC == 8 || sizeof(T) * VEC == 4) {
    using Raw = std::conditional_t<sizeof(T) * VEC == 16, uint4,
                                   std::conditional_t<sizeof(T) * VEC == 8, uint2, unsigned>>;
    Raw raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; i++) e[i] = from_f<T>(in[i]);
    *reinterpret_cast<Raw*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) p[i] = from_f<T>(in[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  return v;
}

#include "norm_kernels.cuh"

// ---------------------------------------------------------------------------------------------
// Elementwise: a bias along one axis (a linear layer's last axis, a convolution's channels),
// and diffusers' GEGLU gate. candle runs both through strided broadcast kernels at about a tenth
// of memory speed. Grid-stride loops; n < 2^31.

template <typename T>
__device__ void add_bias(const T* y, const T* bias, T* out, unsigned n, unsigned inner,
                         unsigned channels, unsigned per_sample) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = from_f<T>(to_f(y[i]) + to_f(bias[(i / per_sample) * channels + (i / inner) % channels]));
}

// value * gelu(gate), gelu's erf form (as torch's gelu).
__device__ __forceinline__ float gated_gelu(float value, float gate) {
  return value * 0.5f * gate * (1.f + erff(gate * 0.70710678118654752f));
}

// h: [rows, 2F] -> out: [rows, F], out = h[:, :F] * gelu(h[:, F:]).
template <typename T>
__device__ void geglu(const T* h, T* out, unsigned n, unsigned f) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned r = i / f, c = i % f;
    out[i] = from_f<T>(gated_gelu(to_f(h[2 * r * f + c]), to_f(h[2 * r * f + f + c])));
  }
}

// The same, VEC outputs per thread (16 bytes), for F a multiple of VEC and `h` 16-byte aligned:
// one division per vector instead of per element, and a few wide accesses instead of many
// 2-byte ones. The same arithmetic per element as `geglu`. `vectors` = rows * F / VEC.
template <typename T, int VEC>
__device__ void geglu_vec(const T* h, T* out, unsigned vectors, unsigned f) {
  const unsigned per_row = f / VEC;
  for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += gridDim.x * blockDim.x) {
    const unsigned r = v / per_row, c = (v % per_row) * VEC;
    float value[VEC], gate[VEC];
    load_vec<T, VEC>(h + 2 * r * f + c, value);
    load_vec<T, VEC>(h + 2 * r * f + f + c, gate);
#pragma unroll
    for (int k = 0; k < VEC; k++) value[k] = gated_gelu(value[k], gate[k]);
    store_vec<T, VEC>(out + v * VEC, value);
  }
}

// out = x >= 0 ? x : slope * x (candle's leaky_relu takes five kernels and four temporaries).
template <typename T>
__device__ void leaky_relu(const T* x, T* out, unsigned n, float slope) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const float v = to_f(x[i]);
    out[i] = from_f<T>(v >= 0.f ? v : slope * v);
  }
}

// The softmax's input gradient over rows of m scores (attention's backward):
// out = p * (dp - row_dot[row]), row_dot each row's sum of p * dp. One pass in fp32.
template <typename T>
__device__ void softmax_grad(const T* p, const T* dp, const T* row_dot, T* out, unsigned n,
                             unsigned m) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = from_f<T>(to_f(p[i]) * (to_f(dp[i]) - to_f(row_dot[i / m])));
}

#define ELEMENTWISE(T, NAME)                                                                  \
  extern "C" __global__ void add_bias_##NAME(const T* y, const T* bias, T* out, unsigned n,   \
                                             unsigned inner, unsigned channels,              \
                                             unsigned per_sample) {                          \
    add_bias<T>(y, bias, out, n, inner, channels, per_sample);                               \
  }                                                                                           \
  extern "C" __global__ void geglu_##NAME(const T* h, T* out, unsigned n, unsigned f) {       \
    geglu<T>(h, out, n, f);                                                                   \
  }                                                                                           \
  extern "C" __global__ void geglu_vec_##NAME(const T* h, T* out, unsigned vectors,           \
                                              unsigned f) {                                   \
    geglu_vec<T, 16 / sizeof(T)>(h, out, vectors, f);                                         \
  }                                                                                           \
  extern "C" __global__ void leaky_relu_##NAME(const T* x, T* out, unsigned n, float slope) { \
    leaky_relu<T>(x, out, n, slope);                                                          \
  }                                                                                           \
  extern "C" __global__ void softmax_grad_##NAME(const T* p, const T* dp, const T* row_dot,   \
                                                 T* out, unsigned n, unsigned m) {            \
    softmax_grad<T>(p, dp, row_dot, out, n, m);                                               \
  }

ELEMENTWISE(half, f16)
ELEMENTWISE(float, f32)

// ---------------------------------------------------------------------------------------------
// Nearest-neighbour ×2 upsampling over NCHW: one thread per input pixel writes its 2×2 block as
// two paired stores (candle's generic resize kernel runs at a quarter of torch's speed).
// x: [planes, h, w] -> out: [planes, 2h, 2w]; n = planes * h * w.

template <typename T, typename T2>
__device__ void upsample_2x(const T* x, T* out, unsigned n, unsigned h, unsigned w) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned col = i % w, row = (i / w) % h, plane = i / (w * h);
    T2 pair;
    pair.x = x[i];
    pair.y = x[i];
    T2* top = (T2*)(out + ((size_t)plane * 2 * h + 2 * row) * 2 * w + 2 * col);
    top[0] = pair;
    top[w] = pair;  // the next output row: 2w elements = w pairs further
  }
}

extern "C" __global__ void upsample_2x_f16(const half* x, half* out, unsigned n, unsigned h,
                                           unsigned w) {
  upsample_2x<half, __half2>(x, out, n, h, w);
}
extern "C" __global__ void upsample_2x_f32(const float* x, float* out, unsigned n, unsigned h,
                                           unsigned w) {
  upsample_2x<float, float2>(x, out, n, h, w);
}

// The same over channels-last memory: x [B, H, W, C] -> out [B, 2H, 2W, C], one thread per
// input element, its four copies written where the warp's neighbours write theirs.
template <typename T>
__device__ void upsample_2x_nhwc(const T* x, T* out, unsigned n, unsigned h, unsigned w,
                                 unsigned c) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned ch = i % c, col = (i / c) % w, row = (i / (c * w)) % h, b = i / (c * w * h);
    const T value = x[i];
    T* top = out + (((size_t)b * 2 * h + 2 * row) * 2 * w + 2 * col) * c + ch;
    top[0] = value;
    top[c] = value;
    top[(size_t)2 * w * c] = value;
    top[(size_t)2 * w * c + c] = value;
  }
}

extern "C" __global__ void upsample_2x_nhwc_f16(const half* x, half* out, unsigned n, unsigned h,
                                                unsigned w, unsigned c) {
  upsample_2x_nhwc<half>(x, out, n, h, w, c);
}
extern "C" __global__ void upsample_2x_nhwc_f32(const float* x, float* out, unsigned n,
                                                unsigned h, unsigned w, unsigned c) {
  upsample_2x_nhwc<float>(x, out, n, h, w, c);
}

// Keeps the stream busy for `ns` nanoseconds (one thread): the work queued behind it meanwhile
// then runs back to back, without the host's launch gaps, as a replayed CUDA graph runs it
// (choice.rs times its per-shape choices so).
extern "C" __global__ void hold_stream(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

#include "restore_kernels.cuh"
#include "backward_kernels.cuh"
