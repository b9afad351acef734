// Kernels for the restore networks (GFPGAN's StyleGAN2 decoder, its U-Net), included at the
// end of kernels.cu (they use its to_f / from_f). candle runs these steps as several
// broadcast kernels and temporaries each, at a fraction of memory speed.

// Bilinear x2 upsampling over NCHW as torch's F.interpolate(scale_factor=2, mode="bilinear",
// align_corners=False): output pixel o samples input o / 2 - 1/4, clamped at 0, between
// floor(s) and its successor (clamped at the edge). One thread per output element.
// x: [planes, h, w] -> out: [planes, 2h, 2w]; n = planes * 4hw.
template <typename T>
__device__ void upsample_bilinear_2x(const T* __restrict__ x, T* __restrict__ out, unsigned n,
                                     unsigned h, unsigned w) {
  const unsigned ow = 2 * w, oh = 2 * h;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned ox = i % ow, oy = (i / ow) % oh, plane = i / (ow * oh);
    const float sy = fmaxf(0.5f * oy - 0.25f, 0.f), sx = fmaxf(0.5f * ox - 0.25f, 0.f);
    const unsigned y0 = (unsigned)sy, x0 = (unsigned)sx;
    const unsigned y1 = min(y0 + 1, h - 1), x1 = min(x0 + 1, w - 1);
    const float ly = sy - y0, lx = sx - x0;
    const T* p = x + (size_t)plane * h * w;
    const float top = (1.f - lx) * to_f(p[y0 * w + x0]) + lx * to_f(p[y0 * w + x1]);
    const float bottom = (1.f - lx) * to_f(p[y1 * w + x0]) + lx * to_f(p[y1 * w + x1]);
    out[i] = from_f<T>((1.f - ly) * top + ly * bottom);
  }
}

// StyleGAN2's activation after a modulated convolution (GFPGAN's StyleConv), one pass over
// NCHW x [B, C, H, W]: v = leaky(x + strength * noise), noise [Bn, 1, H, W] (noise_stride 0
// when one map serves every sample, hw when each has its own), strength one element. With
// SFT, GFPGAN's spatial feature transform of the channels from `sft_from` on follows:
// v * scale + shift, scale and shift [B, C - sft_from, H, W].
template <typename T, bool SFT>
__device__ void noise_leaky(const T* __restrict__ x, T* __restrict__ out,
                            const T* __restrict__ noise, unsigned noise_stride,
                            const T* __restrict__ strength, const T* __restrict__ scale,
                            const T* __restrict__ shift, unsigned n, unsigned c, unsigned hw,
                            unsigned sft_from, float slope) {
  const float s = to_f(strength[0]);
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned p = i % hw, ch = (i / hw) % c, b = i / (hw * c);
    float v = to_f(x[i]) + s * to_f(noise[b * noise_stride + p]);
    v = v >= 0.f ? v : slope * v;
    if (SFT && ch >= sft_from) {
      const size_t j = ((size_t)b * (c - sft_from) + (ch - sft_from)) * hw + p;
      v = v * to_f(scale[j]) + to_f(shift[j]);
    }
    out[i] = from_f<T>(v);
  }
}

#define RESTORE_KERNELS(T, NAME)                                                               \
  extern "C" __global__ void upsample_bilinear_2x_##NAME(const T* x, T* out, unsigned n,       \
                                                         unsigned h, unsigned w) {             \
    upsample_bilinear_2x<T>(x, out, n, h, w);                                                  \
  }                                                                                            \
  extern "C" __global__ void noise_leaky_##NAME(const T* x, T* out, const T* noise,            \
                                                unsigned noise_stride, const T* strength,      \
                                                unsigned n, unsigned c, unsigned hw,           \
                                                float slope) {                                 \
    noise_leaky<T, false>(x, out, noise, noise_stride, strength, nullptr, nullptr, n, c, hw,   \
                          c, slope);                                                           \
  }                                                                                            \
  extern "C" __global__ void noise_leaky_sft_##NAME(                                           \
      const T* x, T* out, const T* noise, unsigned noise_stride, const T* strength,            \
      const T* scale, const T* shift, unsigned n, unsigned c, unsigned hw, unsigned sft_from,  \
      float slope) {                                                                           \
    noise_leaky<T, true>(x, out, noise, noise_stride, strength, scale, shift, n, c, hw, sft_from,  \
                         slope);                                                               \
  }

RESTORE_KERNELS(half, f16)
RESTORE_KERNELS(float, f32)
