// Input gradients of the transformer blocks' GEGLU gate and layer norm, for textual-inversion
// training through a frozen network. Included at the end of kernels.cu (its to_f / from_f).
// candle's compositions of them take a dozen kernels and fp32 temporaries each.

// GEGLU: out = value * gelu(gate) over h = [value | gate] (rows of 2f). Given grad [rows, f]:
// d value = grad * gelu(gate), d gate = grad * value * gelu'(gate), gelu'(x) = Phi(x) + x phi(x).
// One thread per (row, column of f) writes both halves of dh [rows, 2f]; n = rows * f.
template <typename T>
__device__ void geglu_grad(const T* __restrict__ h, const T* __restrict__ grad,
                           T* __restrict__ dh, unsigned n, unsigned f) {
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const size_t r = i / f, c = i % f;
    const float value = to_f(h[2 * r * f + c]), gate = to_f(h[2 * r * f + f + c]);
    const float g = to_f(grad[i]);
    const float cdf = 0.5f * (1.f + erff(gate * 0.70710678118654752f));
    const float pdf = __expf(-0.5f * gate * gate) * 0.39894228040143268f;
    dh[2 * r * f + c] = from_f<T>(g * gate * cdf);
    dh[2 * r * f + f + c] = from_f<T>(g * value * (cdf + gate * pdf));
  }
}

// Layer norm over rows of d (weight w, eps; the bias does not enter the input gradient):
// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = grad * w, xhat = (x - mean) * rstd.
// A warp per row; the row is read from global memory (L1/L2) in four passes.
template <typename T>
__device__ void layer_norm_grad(const T* __restrict__ x, const T* __restrict__ grad,
                                const T* __restrict__ w, T* __restrict__ dx, unsigned rows,
                                unsigned d, float eps) {
  const unsigned warps = blockDim.x / 32, lane = threadIdx.x % 32;
  for (unsigned r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
    const T* xr = x + (size_t)r * d;
    const T* gr = grad + (size_t)r * d;
    float sum = 0.f;
    for (unsigned c = lane; c < d; c += 32) sum += to_f(xr[c]);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffff, sum, off);
    const float mean = sum / d;
    float sq = 0.f;
    for (unsigned c = lane; c < d; c += 32) {
      const float v = to_f(xr[c]) - mean;
      sq += v * v;
    }
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(0xffffffff, sq, off);
    const float rstd = rsqrtf(sq / d + eps);
    float sg = 0.f, sgx = 0.f;
    for (unsigned c = lane; c < d; c += 32) {
      const float gw = to_f(gr[c]) * to_f(w[c]);
      sg += gw;
      sgx += gw * (to_f(xr[c]) - mean) * rstd;
    }
    for (int off = 16; off > 0; off /= 2) {
      sg += __shfl_xor_sync(0xffffffff, sg, off);
      sgx += __shfl_xor_sync(0xffffffff, sgx, off);
    }
    const float mg = sg / d, mgx = sgx / d;
    for (unsigned c = lane; c < d; c += 32) {
      const float xhat = (to_f(xr[c]) - mean) * rstd;
      const float gw = to_f(gr[c]) * to_f(w[c]);
      dx[(size_t)r * d + c] = from_f<T>(rstd * (gw - mg - xhat * mgx));
    }
  }
}

#define BACKWARD_KERNELS(T, NAME)                                                              \
  extern "C" __global__ void geglu_grad_##NAME(const T* h, const T* grad, T* dh, unsigned n,   \
                                               unsigned f) {                                   \
    geglu_grad<T>(h, grad, dh, n, f);                                                          \
  }                                                                                            \
  extern "C" __global__ void layer_norm_grad_##NAME(const T* x, const T* grad, const T* w,     \
                                                    T* dx, unsigned rows, unsigned d,          \
                                                    float eps) {                               \
    layer_norm_grad<T>(x, grad, w, dx, rows, d, eps);                                          \
  }

BACKWARD_KERNELS(half, f16)
BACKWARD_KERNELS(float, f32)
