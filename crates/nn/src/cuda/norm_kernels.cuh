// Group norm (NCHW and channels-last, + SiLU) and its input gradient, layer norm. Included by kernels.cu
// after its element conversions and vector loads.

// Group norm over NCHW (torch.nn.GroupNorm), optionally followed by SiLU, statistics in fp32.
// In NCHW a (batch, group) pair is one contiguous run of len = channels_per_group * HW values,
// so the work splits into `splits` chunks per group: pass 1 writes each chunk's (count, mean,
// M2) (Welford), pass 2 merges a group's chunks (Chan et al.) and normalises its chunk.
// Grid (B * G, splits), block 256 for both passes.

struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

__device__ __forceinline__ Moments warp_merge(Moments x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    Moments o{__shfl_xor_sync(0xffffffff, x.n, off), __shfl_xor_sync(0xffffffff, x.mean, off),
              __shfl_xor_sync(0xffffffff, x.m2, off)};
    x = merge(x, o);
  }
  return x;
}


// The elements [begin, end) of group blockIdx.x that chunk blockIdx.y of its splits covers,
// counted from base, the group's first element (every group-norm kernel's grid).
struct GroupChunk {
  long begin, end, base;
};

__device__ __forceinline__ GroupChunk group_chunk(long len, int splits) {
  const long chunk = (len + splits - 1) / splits;
  const long begin = blockIdx.y * chunk;
  return GroupChunk{begin, min(len, begin + chunk), (long)blockIdx.x * len};
}

template <typename T>
__device__ void group_norm_stats(const T* x, float* partial, long len, int splits) {
  const auto [begin, end, base] = group_chunk(len, splits);
  const T* xg = x + base;
  Moments acc{0.f, 0.f, 0.f};
  for (long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_f(xg[i]);
    acc.n += 1.f;
    const float delta = v - acc.mean;
    acc.mean += delta / acc.n;
    acc.m2 += delta * (v - acc.mean);
  }
  acc = warp_merge(acc);
  __shared__ Moments per_warp[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < blockDim.x / 32 ? per_warp[lane] : Moments{0.f, 0.f, 0.f};
    acc = warp_merge(acc);
    if (lane == 0) {
      float* p = partial + ((long)blockIdx.x * splits + blockIdx.y) * 3;
      p[0] = acc.n;
      p[1] = acc.mean;
      p[2] = acc.m2;
    }
  }
}

// Mean and 1/std of group blockIdx.x, merged from its chunks' moments.
__device__ __forceinline__ void group_moments(const float* partial, int splits, float eps,
                                              float* mean, float* rstd) {
  Moments acc{0.f, 0.f, 0.f};
  const float* p = partial + (long)blockIdx.x * splits * 3;
  for (int s = 0; s < splits; s++) acc = merge(acc, Moments{p[3 * s], p[3 * s + 1], p[3 * s + 2]});
  *mean = acc.mean;
  *rstd = rsqrtf(acc.m2 / acc.n + eps);
}

template <typename T>
__device__ void group_norm_apply(const T* x, T* y, const float* partial, const T* weight,
                                 const T* bias, long len, int splits, long hw,
                                 int channels_per_group, int groups, float eps, int silu) {
  __shared__ float stats[2];
  if (threadIdx.x == 0) group_moments(partial, splits, eps, &stats[0], &stats[1]);
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const auto [begin, end, base] = group_chunk(len, splits);
  const int first_channel = (blockIdx.x % groups) * channels_per_group;
  for (long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int c = first_channel + (int)(i / hw);
    float v = (to_f(x[base + i]) - mean) * rstd * to_f(weight[c]) + to_f(bias[c]);
    if (silu) v = v / (1.f + __expf(-v));
    y[base + i] = from_f<T>(v);
  }
}

#define GROUP_NORM(T, NAME)                                                                   \
  extern "C" __global__ void __launch_bounds__(256)                                           \
      group_norm_stats_##NAME(const T* x, float* partial, long len, int splits) {            \
    group_norm_stats<T>(x, partial, len, splits);                                            \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256) group_norm_apply_##NAME(                  \
      const T* x, T* y, const float* partial, const T* weight, const T* bias, long len,      \
      int splits, long hw, int channels_per_group, int groups, float eps, int silu) {        \
    group_norm_apply<T>(x, y, partial, weight, bias, len, splits, hw, channels_per_group,     \
                        groups, eps, silu);                                                   \
  }

GROUP_NORM(half, f16)
GROUP_NORM(float, f32)

// Group norm over channels-last memory [N, HW, C] (same statistics, same output values). A
// group is no longer one contiguous run, so the work is cut the other way: grid (N, splits),
// each block a chunk of one sample's pixels, every thread a fixed run of `vec` channels of one
// group (vec divides channels_per_group) on rows = blockDim / (C / vec) pixels at a time: the
// loads of a warp stay contiguous. Pass 1 writes each (sample, group, chunk)'s moments where the
// NCHW kernels do, pass 2 merges them per group in shared memory and normalises the chunk.
// blockDim.x: a multiple of C / vec and of 32, at most 1024; groups at most 128.

struct PixelChunk {
  long begin, end;
};

__device__ __forceinline__ PixelChunk pixel_chunk(long hw, int splits) {
  const long chunk = (hw + splits - 1) / splits;
  const long begin = blockIdx.y * chunk;
  return PixelChunk{begin, min(hw, begin + chunk)};
}


// The thread's VEC values of `added` ([N, C], a term added to every pixel of a sample's
// channel before the norm: a ResNet block's time embedding) for sample blockIdx.x, channels
// `first`..; zeros where there is none.
template <typename T, int VEC>
__device__ __forceinline__ void added_terms(const T* __restrict__ added, int channels, int first,
                                            float (&t)[VEC]) {
  if (added) {
    load_vec<T, VEC>(added + (long)blockIdx.x * channels + first, t);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i++) t[i] = 0.f;
  }
}

// Pass 1 of 3, the statistics of x + added (`added` may be null). `per_thread`: shared scratch
// of blockDim.x moments, declared by the kernel (a shared array declared here would be one per
// instance of the template). Where `kept` is not null, the chunk of x (without `added`) is
// also copied there (the one-pass kernel's shared memory), pixel `begin` first.
template <typename T, int VEC>
__device__ void group_norm_stats_nhwc(const T* __restrict__ x, const T* __restrict__ added,
                                      float* __restrict__ partial, long hw, int channels,
                                      int groups, int splits, Moments* per_thread,
                                      T* __restrict__ kept = nullptr) {
  const int lanes = channels / VEC, rows = blockDim.x / lanes;
  const int lane = threadIdx.x % lanes, row = threadIdx.x / lanes;
  const auto [begin, end] = pixel_chunk(hw, splits);
  const T* xs = x + (long)blockIdx.x * hw * channels + lane * VEC;
  float t[VEC];
  added_terms<T, VEC>(added, channels, lane * VEC, t);
  // Sums of differences from the thread's first value: no division per element, and no
  // cancellation where a group's mean is large against its spread.
  const float shift = begin + row < end ? to_f(xs[(begin + row) * channels]) + t[0] : 0.f;
  float s1 = 0.f, s2 = 0.f;
  int count = 0;
  // Unrolled so that several loads are in flight per thread (a thread's loads are small).
#pragma unroll 4
  for (long p = begin + row; p < end; p += rows) {
    float v[VEC];
    load_vec<T, VEC>(xs + p * channels, v);
    if (kept) store_vec<T, VEC>(kept + (p - begin) * channels + lane * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
      const float d = v[i] + t[i] - shift;
      s1 += d;
      s2 += d * d;
    }
    count += VEC;
  }
  Moments acc{0.f, 0.f, 0.f};
  if (count > 0) {
    const float n = (float)count;
    acc = Moments{n, shift + s1 / n, fmaxf(s2 - s1 * s1 / n, 0.f)};
  }
  per_thread[threadIdx.x] = acc;
  __syncthreads();
  const int lanes_per_group = channels / groups / VEC;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    Moments m{0.f, 0.f, 0.f};
    for (int r = 0; r < rows; r++)
      for (int l = g * lanes_per_group; l < (g + 1) * lanes_per_group; l++)
        m = merge(m, per_thread[r * lanes + l]);
    float* out = partial + (((long)blockIdx.x * groups + g) * splits + blockIdx.y) * 3;
    out[0] = m.n;
    out[1] = m.mean;
    out[2] = m.m2;
  }
}

// Pass 2 of 3: each (sample, group)'s chunks merged into its mean and 1 / std, a warp per
// group, lanes taking every 32nd chunk. Done once here, not in each block of pass 3, where
// every block merged every group of its sample before it could start. rows = B * G.
extern "C" __global__ void group_norm_finalize_nhwc(const float* __restrict__ partial,
                                                    float* __restrict__ stats, int rows,
                                                    int splits, float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps: blockDim.x is a multiple of 32
  Moments m{0.f, 0.f, 0.f};
  const float* p = partial + (long)row * splits * 3;
  for (int s = lane; s < splits; s += 32) m = merge(m, Moments{p[3 * s], p[3 * s + 1], p[3 * s + 2]});
  m = warp_merge(m);
  if (lane == 0) {
    stats[2 * row] = m.mean;
    stats[2 * row + 1] = rsqrtf(m.m2 / m.n + eps);
  }
}

// y = x * scale + offset per channel (the affine folded into the normalisation by group
// statistics `mean`, `rstd` of x + added, and `added` into the offset), SiLU on request, over
// the block's chunk: `src` and `dst` at its first pixel and the thread's first channel.
template <typename T, int VEC>
__device__ __forceinline__ void normalise_chunk(const T* __restrict__ src, T* __restrict__ dst,
                                                long pixels, int channels, float mean,
                                                float rstd, const T* __restrict__ weight,
                                                const T* __restrict__ bias,
                                                const T* __restrict__ added, int first, int silu) {
  const int rows = blockDim.x / (channels / VEC), row = threadIdx.x / (channels / VEC);
  float scale[VEC], offset[VEC], t[VEC];
  load_vec<T, VEC>(weight + first, scale);
  load_vec<T, VEC>(bias + first, offset);
  added_terms<T, VEC>(added, channels, first, t);
#pragma unroll
  for (int i = 0; i < VEC; i++) {
    scale[i] *= rstd;
    offset[i] += (t[i] - mean) * scale[i];
  }
#pragma unroll 4
  for (long p = row; p < pixels; p += rows) {
    float v[VEC];
    load_vec<T, VEC>(src + p * channels, v);
#pragma unroll
    for (int i = 0; i < VEC; i++) {
      v[i] = fmaf(v[i], scale[i], offset[i]);
      if (silu) v[i] = v[i] / (1.f + __expf(-v[i]));
    }
    store_vec<T, VEC>(dst + p * channels, v);
  }
}

template <typename T, int VEC>
__device__ void group_norm_apply_nhwc(const T* __restrict__ x, const T* __restrict__ added,
                                      T* __restrict__ y, const float* __restrict__ stats,
                                      const T* __restrict__ weight, const T* __restrict__ bias,
                                      long hw, int channels, int groups, int splits, int silu) {
  const int first = threadIdx.x % (channels / VEC) * VEC, g = first / (channels / groups);
  const float* st = stats + ((long)blockIdx.x * groups + g) * 2;
  const auto [begin, end] = pixel_chunk(hw, splits);
  const long at = ((long)blockIdx.x * hw + begin) * channels + first;
  normalise_chunk<T, VEC>(x + at, y + at, end - begin, channels, st[0], st[1], weight, bias, added,
                          first, silu);
}

// All three passes in one kernel, for maps whose every chunk can be resident at once (a
// cooperative launch, grid (N, splits)): each block keeps its chunk in shared memory while
// pass 1 reads it, publishes its moments, waits for the other blocks of its sample, merges
// the sample's moments per group (a warp per group) and normalises the kept chunk. x is read
// once instead of twice, and one launch replaces three: at SD's latent sizes the work is a few
// microseconds and the launches and the waits between them were most of the time.
// `arrived`: one zeroed counter per sample.
template <typename T, int VEC>
__device__ void group_norm_nhwc_resident(const T* __restrict__ x, const T* __restrict__ added,
                                         T* __restrict__ y,
                                         float* __restrict__ partial,
                                         unsigned* __restrict__ arrived,
                                         const T* __restrict__ weight,
                                         const T* __restrict__ bias, long hw, int channels,
                                         int groups, int splits, float eps, int silu,
                                         Moments* per_thread, float2* group_stats) {
  extern __shared__ __align__(16) unsigned char kept_bytes[];
  T* kept = reinterpret_cast<T*>(kept_bytes);
  group_norm_stats_nhwc<T, VEC>(x, added, partial, hw, channels, groups, splits, per_thread,
                                kept);
  // The barrier of a sample's blocks, as cooperative groups' grid sync makes it: the block's
  // moments are written (__syncthreads), made visible to the device, then counted.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(arrived + blockIdx.x, 1u);
    while (*reinterpret_cast<volatile unsigned*>(arrived + blockIdx.x) < (unsigned)splits) {
      __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < groups; g += blockDim.x / 32) {
    const float* p = partial + ((long)blockIdx.x * groups + g) * splits * 3;
    Moments m{0.f, 0.f, 0.f};
    // L2 reads: other blocks wrote these after this SM may have cached the lines.
    for (int s = lane; s < splits; s += 32)
      m = merge(m, Moments{__ldcg(p + 3 * s), __ldcg(p + 3 * s + 1), __ldcg(p + 3 * s + 2)});
    m = warp_merge(m);
    if (lane == 0) group_stats[g] = make_float2(m.mean, rsqrtf(m.m2 / m.n + eps));
  }
  __syncthreads();
  const int first = threadIdx.x % (channels / VEC) * VEC;
  const float2 st = group_stats[first / (channels / groups)];
  const auto [begin, end] = pixel_chunk(hw, splits);
  const long at = ((long)blockIdx.x * hw + begin) * channels + first;
  normalise_chunk<T, VEC>(kept + first, y + at, end - begin, channels, st.x, st.y, weight, bias,
                          added, first, silu);
}

// The kernels take `vec` at run time (1, 2, 4 or 8) and run the instance compiled for it.
#define WITH_VEC(vec, CALL) \
  switch (vec) {            \
    case 8: CALL(8); break; \
    case 4: CALL(4); break; \
    case 2: CALL(2); break; \
    default: CALL(1);       \
  }

#define GN_STATS_CALL(V) \
  group_norm_stats_nhwc<Elem, V>(x, added, partial, hw, channels, groups, splits, per_thread)
#define GN_APPLY_CALL(V)                                                                      \
  group_norm_apply_nhwc<Elem, V>(x, added, y, stats, weight, bias, hw, channels, groups, splits, \
                                 silu)
#define GN_RESIDENT_CALL(V)                                                                   \
  group_norm_nhwc_resident<Elem, V>(x, added, y, partial, arrived, weight, bias, hw, channels, \
                                    groups, splits, eps, silu, per_thread, group_stats)
#define GROUP_NORM_NHWC(T, NAME)                                                              \
  extern "C" __global__ void __launch_bounds__(1024) group_norm_stats_nhwc_##NAME(            \
      const T* x, const T* added, float* partial, long hw, int channels, int groups, int vec,  \
      int splits) {                                                                           \
    using Elem = T;                                                                           \
    __shared__ Moments per_thread[1024];                                                      \
    WITH_VEC(vec, GN_STATS_CALL)                                                              \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(1024) group_norm_apply_nhwc_##NAME(            \
      const T* x, const T* added, T* y, const float* stats, const T* weight, const T* bias,   \
      long hw, int channels, int groups, int vec, int splits, int silu) {                     \
    using Elem = T;                                                                           \
    WITH_VEC(vec, GN_APPLY_CALL)                                                              \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(1024) group_norm_nhwc_resident_##NAME(         \
      const T* x, const T* added, T* y, float* partial, unsigned* arrived, const T* weight,   \
      const T* bias, long hw, int channels, int groups, int vec, int splits, float eps,       \
      int silu) {                                                                             \
    using Elem = T;                                                                           \
    __shared__ Moments per_thread[1024];                                                      \
    __shared__ float2 group_stats[128];                                                       \
    WITH_VEC(vec, GN_RESIDENT_CALL)                                                           \
  }

GROUP_NORM_NHWC(half, f16)
GROUP_NORM_NHWC(float, f32)

// The input gradient of group norm (+ SiLU), for training through a frozen network. After
// group_norm_stats on x: pass 1 sums dxhat and dxhat·xhat over each chunk of a group, pass 2
// writes dx = rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)), where dxhat is the output's
// gradient through SiLU (if any) times the scale.


// The gradient of the normalised value xhat of channel c, from the output's gradient g.
__device__ __forceinline__ float group_norm_dxhat(float xhat, float g, float gamma, float beta,
                                                  int silu) {
  if (silu) {
    const float y = xhat * gamma + beta;
    const float s = 1.f / (1.f + __expf(-y));
    g *= s * (1.f + y * (1.f - s));
  }
  return g * gamma;
}

template <typename T>
__device__ void group_norm_grad_sums(const T* x, const T* grad, const float* partial,
                                     const T* weight, const T* bias, float* sums, long len,
                                     int splits, long hw, int channels_per_group, int groups,
                                     float eps, int silu) {
  __shared__ float stats[2];
  if (threadIdx.x == 0) group_moments(partial, splits, eps, &stats[0], &stats[1]);
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const auto [begin, end, base] = group_chunk(len, splits);
  const int first_channel = (blockIdx.x % groups) * channels_per_group;
  float a = 0.f, b = 0.f;
  for (long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int c = first_channel + (int)(i / hw);
    const float xhat = (to_f(x[base + i]) - mean) * rstd;
    const float d = group_norm_dxhat(xhat, to_f(grad[base + i]), to_f(weight[c]), to_f(bias[c]), silu);
    a += d;
    b += d * xhat;
  }
  a = warp_sum(a);
  b = warp_sum(b);
  __shared__ float per_warp[2][32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    per_warp[0][warp] = a;
    per_warp[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < blockDim.x / 32;
    a = warp_sum(live ? per_warp[0][lane] : 0.f);
    b = warp_sum(live ? per_warp[1][lane] : 0.f);
    if (lane == 0) {
      float* out = sums + ((long)blockIdx.x * splits + blockIdx.y) * 2;
      out[0] = a;
      out[1] = b;
    }
  }
}

template <typename T>
__device__ void group_norm_grad_apply(const T* x, const T* grad, const float* partial,
                                      const float* sums, const T* weight, const T* bias, T* dx,
                                      long len, int splits, long hw, int channels_per_group,
                                      int groups, float eps, int silu) {
  __shared__ float stats[4];
  if (threadIdx.x == 0) {
    group_moments(partial, splits, eps, &stats[0], &stats[1]);
    float a = 0.f, b = 0.f;
    for (int s = 0; s < splits; s++) {
      a += sums[((long)blockIdx.x * splits + s) * 2];
      b += sums[((long)blockIdx.x * splits + s) * 2 + 1];
    }
    stats[2] = a / (float)len;
    stats[3] = b / (float)len;
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1], mean_d = stats[2], mean_dx = stats[3];
  const auto [begin, end, base] = group_chunk(len, splits);
  const int first_channel = (blockIdx.x % groups) * channels_per_group;
  for (long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int c = first_channel + (int)(i / hw);
    const float xhat = (to_f(x[base + i]) - mean) * rstd;
    const float d = group_norm_dxhat(xhat, to_f(grad[base + i]), to_f(weight[c]), to_f(bias[c]), silu);
    dx[base + i] = from_f<T>(rstd * (d - mean_d - xhat * mean_dx));
  }
}

#define GROUP_NORM_GRAD(T, NAME)                                                              \
  extern "C" __global__ void __launch_bounds__(256) group_norm_grad_sums_##NAME(              \
      const T* x, const T* grad, const float* partial, const T* weight, const T* bias,        \
      float* sums, long len, int splits, long hw, int channels_per_group, int groups,         \
      float eps, int silu) {                                                                  \
    group_norm_grad_sums<T>(x, grad, partial, weight, bias, sums, len, splits, hw,            \
                            channels_per_group, groups, eps, silu);                           \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(256) group_norm_grad_apply_##NAME(             \
      const T* x, const T* grad, const float* partial, const float* sums, const T* weight,    \
      const T* bias, T* dx, long len, int splits, long hw, int channels_per_group,            \
      int groups, float eps, int silu) {                                                      \
    group_norm_grad_apply<T>(x, grad, partial, sums, weight, bias, dx, len, splits, hw,       \
                             channels_per_group, groups, eps, silu);                          \
  }

GROUP_NORM_GRAD(half, f16)
GROUP_NORM_GRAD(float, f32)

// Layer norm over rows of `cols` (torch.nn.LayerNorm over the last axis, with weight and bias):
// a warp per row, four rows a block, the row held in registers as CHUNKS vectors of VEC per
// lane (cols a multiple of VEC, at most 32 * VEC * CHUNKS), so x is read once; the mean, then
// the mean squared deviation from it, in fp32, as torch computes them. candle's kernel reads
// each element twice, one at a time, with one warp a block.
__device__ __forceinline__ float warp_all_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

template <typename T, int VEC, int CHUNKS>
__device__ void layer_norm_rows(const T* __restrict__ x, T* __restrict__ y,
                                const T* __restrict__ weight, const T* __restrict__ bias,
                                long rows, int cols, float eps) {
  const long row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32, vecs = cols / VEC;
  const T* xr = x + row * cols;
  float v[CHUNKS][VEC];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < CHUNKS; k++) {
    const int j = lane + 32 * k;
    if (j < vecs) {
      load_vec<T, VEC>(xr + j * VEC, v[k]);
#pragma unroll
      for (int i = 0; i < VEC; i++) sum += v[k][i];
    }
  }
  const float mean = warp_all_sum(sum) / cols;
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < CHUNKS; k++) {
    if (lane + 32 * k < vecs) {
#pragma unroll
      for (int i = 0; i < VEC; i++) squares += (v[k][i] - mean) * (v[k][i] - mean);
    }
  }
  const float rstd = rsqrtf(warp_all_sum(squares) / cols + eps);
#pragma unroll
  for (int k = 0; k < CHUNKS; k++) {
    const int j = lane + 32 * k;
    if (j < vecs) {
      float w[VEC], b[VEC];
      load_vec<T, VEC>(weight + j * VEC, w);
      load_vec<T, VEC>(bias + j * VEC, b);
#pragma unroll
      for (int i = 0; i < VEC; i++) v[k][i] = (v[k][i] - mean) * rstd * w[i] + b[i];
      store_vec<T, VEC>(y + row * cols + j * VEC, v[k]);
    }
  }
}

// `chunks` at run time (1, 2, 4 or 8: the fewest that hold a row) picks the instance.
#define LN_CALL(C) layer_norm_rows<Elem, 16 / sizeof(Elem), C>(x, y, weight, bias, rows, cols, eps)
#define LAYER_NORM(T, NAME)                                                                   \
  extern "C" __global__ void __launch_bounds__(128) layer_norm_##NAME(                        \
      const T* x, T* y, const T* weight, const T* bias, long rows, int cols, int chunks,     \
      float eps) {                                                                            \
    using Elem = T;                                                                           \
    switch (chunks) {                                                                         \
      case 1: LN_CALL(1); break;                                                              \
      case 2: LN_CALL(2); break;                                                              \
      case 4: LN_CALL(4); break;                                                              \
      default: LN_CALL(8);                                                                    \
    }                                                                                         \
  }

LAYER_NORM(half, f16)
LAYER_NORM(float, f32)
