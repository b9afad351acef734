//! Layers inside a gradient graph (textual-inversion training) without candle's autograd
//! keeping what it does not need.
//!
//! Differentiated op by op, a layer leaves every intermediate alive until the backward pass,
//! and candle also computes a gradient for each operand it meets, the frozen weights included,
//! and keeps those to the end. For SD1.5 at 512² that was 19.4 GB at batch 1 on the GPU: the
//! attention scores and softmax steps (hundreds of MiB per layer at 4096 tokens), then full-size
//! gradients for every weight and for every bias and norm scale broadcast over its activation.
//! So a tracked layer runs here as one op: its forward is the inference path on the untracked
//! input (our CUDA kernels included), the graph keeps only its input and output, and its
//! backward computes the input's gradient alone:
//! - [`with_input_grad`] with the layer's closed form (in the layer modules of this crate:
//!   linear, convolution through cuDNN's backward-data on CUDA, upsampling, group and layer
//!   norm on [`Normalized`] rows, GEGLU);
//! - [`tracked_attention`]: the probabilities recomputed a block of query rows at a time, as
//!   FlashAttention's backward does:
//!
//! ```text
//! P = softmax(s·Q Kᵀ)      dV = Pᵀ dO      dP = dO Vᵀ
//! dS = P ⊙ (dP − rowsum(dO ⊙ O))      dQ = s·dS K      dK = s·dSᵀ Q
//! ```
//!
//! Callers use these only when the layer's own weights are not tracked: the weights get no
//! gradient here.

use std::sync::Mutex;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

/// Scores recomputed at once in the backward pass, at most (64 MiB in f32): query rows go in
/// blocks beyond it.
const BACKWARD_SCORES: usize = 1 << 24;

/// The untracked forward's result, handed to candle once as the op's output.
struct Output(Mutex<Option<Tensor>>);

impl Output {
    fn new(out: Tensor) -> Result<Output> {
        // The storage below is handed over as the output, read contiguously from its start:
        // make it exactly the output's elements, in order (a channels-last map, a view at an
        // offset are copied; `copy` would keep their layout).
        let out = if out.is_contiguous() && out.layout().start_offset() == 0 {
            out
        } else {
            out.force_contiguous()?
        };
        Ok(Output(Mutex::new(Some(out))))
    }

    fn take(&self) -> Result<(Storage, Shape)> {
        let out = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("tracked op: poisoned output".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("tracked op: output taken twice".into()))?;
        let (storage, layout) = out.storage_and_layout();
        let storage = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                use candle_core::backend::BackendStorage;
                Storage::Cuda(s.try_clone(layout)?)
            }
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("tracked op: unsupported device"),
        };
        Ok((storage, layout.shape().clone()))
    }

    fn take_cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("tracked op: output and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn take_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("tracked op: output and input on different devices"),
        }
    }
}

/// Rows of `[R, M]` normalised to mean 0 and variance 1 (`eps` inside the root), as layer
/// and group norms do before their affine step: what their gradients need.
pub(crate) struct Normalized {
    /// The normalised rows.
    pub(crate) xhat: Tensor,
    /// `1 / sqrt(var + eps)`, `[R, 1]`.
    rstd: Tensor,
}

impl Normalized {
    pub(crate) fn new(x: &Tensor, eps: f64) -> Result<Normalized> {
        let centered = x.broadcast_sub(&x.mean_keepdim(1)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
        Ok(Normalized {
            xhat: centered.broadcast_mul(&rstd)?,
            rstd,
        })
    }

    /// The gradient of the input rows from `dxhat`, that of the normalised rows:
    /// `rstd · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))`.
    pub(crate) fn input_grad(&self, dxhat: &Tensor) -> Result<Tensor> {
        let mean = dxhat.mean_keepdim(1)?;
        let along = (dxhat * &self.xhat)?.mean_keepdim(1)?;
        let dx = (dxhat.broadcast_sub(&mean)? - self.xhat.broadcast_mul(&along)?)?;
        dx.broadcast_mul(&self.rstd)
    }
}

/// The dtype gradients are computed in: f32, or f64 for f64 (the tests).
pub(crate) fn precise(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

type InputGradFn = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// `forward(x)` for a tracked `x` whose gradient is `input_grad(x, grad_of_output)` (both
/// untracked); `kind` names that backward pass in `bench --profile`.
pub(crate) fn with_input_grad(
    x: &Tensor,
    kind: &'static str,
    forward: impl FnOnce(&Tensor) -> Result<Tensor>,
    input_grad: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let out = Output::new(forward(&x.detach())?)?;
    x.apply_op1(InputGrad {
        out,
        kind,
        input_grad: Box::new(input_grad),
    })
}

struct InputGrad {
    out: Output,
    kind: &'static str,
    input_grad: Box<InputGradFn>,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "tracked-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.take_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.take_cuda()
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::timed(self.kind, x.device(), || {
            (self.input_grad)(&x.detach(), &grad_out.detach()).map(Some)
        })
    }
}

/// `[B, N, H·D]` attention whose gradients flow to whichever of `q`, `k`, `v` are tracked.
/// `forward` computes the output untracked (the inference path). On CUDA, cuDNN's fused SDPA
/// takes both passes where, for the shape, it matches this path and is faster.
pub(crate) fn tracked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    forward: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    #[cfg(feature = "cuda")]
    {
        let scale = ((qd.dim(2)? / heads) as f64).powf(-0.5);
        // The path it would replace, for the check: this forward, the recomputed gradients.
        let current = |d_out: &Tensor| -> Result<Vec<Tensor>> {
            let out = forward(&qd, &kd, &vd)?;
            let grads = recomputed_gradients(&qd, &kd, &vd, &out, d_out, heads, BACKWARD_SCORES)?;
            Ok([vec![out], grads.to_vec()].concat())
        };
        if let Some((out, saved)) =
            crate::cuda::sdpa_forward_for_grad(&qd, &kd, &vd, heads, scale, &current)?
        {
            let op = AttentionBackward {
                out: Output::new(out)?,
                heads,
                max_scores: BACKWARD_SCORES,
                saved: Some(saved),
            };
            return q.apply_op3(k, v, op);
        }
    }
    let op = AttentionBackward {
        out: Output::new(forward(&qd, &kd, &vd)?)?,
        heads,
        max_scores: BACKWARD_SCORES,
        #[cfg(feature = "cuda")]
        saved: None,
    };
    q.apply_op3(k, v, op)
}

struct AttentionBackward {
    out: Output,
    heads: usize,
    max_scores: usize,
    /// The fused backward's statistics, where cuDNN took the forward.
    #[cfg(feature = "cuda")]
    saved: Option<crate::cuda::SavedSdpa>,
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-with-recomputed-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.take_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.take_cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed("attention backward", q.device(), || {
            let [qd, kd, vd] = [q, k, v].map(Tensor::detach);
            let (out, grad_out) = (&out.detach(), &grad_out.detach());
            #[cfg(feature = "cuda")]
            if let Some(saved) = &self.saved {
                let grads = crate::cuda::sdpa_backward(saved, &qd, &kd, &vd, out, grad_out)?;
                return grads_for(grads, [q, k, v]);
            }
            let grads =
                recomputed_gradients(&qd, &kd, &vd, out, grad_out, self.heads, self.max_scores)?;
            grads_for(grads, [q, k, v])
        })
    }
}

/// Each gradient where its operand is tracked, in the operand's dtype.
fn grads_for(
    grads: [Tensor; 3],
    operands: [&Tensor; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let [dq, dk, dv] = grads;
    let [q, k, v] = operands;
    let keep = |grad: Tensor, like: &Tensor| -> Result<Option<Tensor>> {
        like.track_op()
            .then(|| grad.to_dtype(like.dtype()))
            .transpose()
    };
    Ok((keep(dq, q)?, keep(dk, k)?, keep(dv, v)?))
}

/// The gradients `[dq, dk, dv]` of attention (`[B, N, H·D]`, `heads` heads) with the
/// probabilities recomputed at most `max_scores` at a time, given its output `out` and that
/// output's gradient; in `q`'s dtype.
fn recomputed_gradients(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad_out: &Tensor,
    heads: usize,
    max_scores: usize,
) -> Result<[Tensor; 3]> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let scale = (d as f64).powf(-0.5);
    // The score-sized products and the softmax stay in the model's precision (fp16 on the
    // GPU: tensor cores, cuBLAS accumulating in fp32, half the traffic of fp32 blocks);
    // the row sums and the gradients accumulated over blocks are kept in f32.
    let (work, precise) = (q.dtype(), precise(q.dtype()));
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.detach()
            .reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .to_dtype(work)
    };
    // s·Q once: then S = (s·Q)Kᵀ and dK = dSᵀ(s·Q).
    let qh = (split(q, n)? * scale)?;
    let (kh, vh, doh) = (split(k, m)?, split(v, m)?, split(grad_out, n)?);
    let row_dot = (doh.to_dtype(precise)? * split(out, n)?.to_dtype(precise)?)?
        .sum_keepdim(3)?
        .to_dtype(work)?;
    let k_t = kh.t()?.contiguous()?;
    let v_t = vh.t()?.contiguous()?;
    let rows_at_once = (max_scores / (b * heads * m)).max(1);
    let mut dq = Vec::with_capacity(n.div_ceil(rows_at_once));
    let mut dk = Tensor::zeros((b, heads, m, d), precise, q.device())?;
    let mut dv = dk.clone();
    for first in (0..n).step_by(rows_at_once) {
        let rows = rows_at_once.min(n - first);
        let q_r = qh.narrow(2, first, rows)?;
        let do_r = doh.narrow(2, first, rows)?;
        let p = candle_nn::ops::softmax_last_dim(&q_r.matmul(&k_t)?)?;
        dv = (dv + p.t()?.matmul(&do_r)?.to_dtype(precise)?)?;
        let dp = do_r.matmul(&v_t)?;
        let ds = softmax_input_grad(&p, &dp, &row_dot.narrow(2, first, rows)?)?;
        dq.push(ds.matmul(&kh)?);
        dk = (dk + ds.t()?.matmul(&q_r)?.to_dtype(precise)?)?;
    }
    let merge = |t: Tensor, len: usize| -> Result<Tensor> {
        t.transpose(1, 2)?
            .reshape((b, len, inner))?
            .to_dtype(q.dtype())
    };
    let dq = if dq.len() == 1 {
        dq.pop().unwrap()
    } else {
        Tensor::cat(&dq, 2)?
    };
    let dq = (dq.to_dtype(precise)? * scale)?;
    Ok([merge(dq, n)?, merge(dk, m)?, merge(dv, m)?])
}

/// `p · (dp − row_dot)`: the softmax's input gradient, `p` its output, `dp` the gradient of
/// that, `row_dot` `[..., 1]` each row's `Σ p·dp`. One pass on CUDA.
fn softmax_input_grad(p: &Tensor, dp: &Tensor, row_dot: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(ds) = crate::cuda::softmax_grad(p, dp, row_dot)? {
        return Ok(ds);
    }
    p * dp.broadcast_sub(row_dot)?
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed attention, differentiated by candle's autograd: the reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let d = inner / heads;
        let split =
            |t: &Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
        let scores = (split(q, n)?.matmul(&split(k, m)?.t()?)? * (d as f64).powf(-0.5))?;
        let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
        p.matmul(&split(v, m)?)?
            .transpose(1, 2)?
            .reshape((b, n, inner))
    }

    /// The largest absolute difference between two f64 tensors.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar::<f64>());
        diff.unwrap()
    }

    /// A layer whose forward returns a view (a permutation, as channels-last maps are; a part
    /// at an offset) gives that view's values, in order.
    #[test]
    fn views_come_out_as_their_values() {
        let x = Var::new(&[[1f64, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let x = x.as_tensor();
        let transposed = with_input_grad(x, "test", |x| x.t(), |_, g| g.t()).unwrap();
        assert_eq!(
            transposed.to_vec2::<f64>().unwrap(),
            [[1., 4.], [2., 5.], [3., 6.]]
        );
        let part = with_input_grad(x, "test", |x| x.narrow(1, 1, 2), |_, g| Ok(g.clone()));
        assert_eq!(
            part.unwrap().to_vec2::<f64>().unwrap(),
            [[2., 3.], [5., 6.]]
        );
    }

    /// Self- and cross-attention shapes, query rows in several backward blocks, and only some
    /// inputs tracked (cross-attention in training: the context's K and V, not yet Q): output
    /// and every gradient equal candle's autograd of the composed form.
    #[test]
    fn gradients_equal_autograd_of_the_composed_attention() {
        let dev = Device::Cpu;
        for (n, m, track_q) in [(37, 37, true), (37, 11, false), (5, 64, true)] {
            let (b, heads, d) = (2, 3, 4);
            let rand = |len: usize| Tensor::randn(0f64, 1., (b, len, heads * d), &dev).unwrap();
            let (q0, k0, v0) = (rand(n), rand(m), rand(m));
            let weights = rand(n);
            // The output of `attention` on fresh tracked inputs, and the gradients of
            // sum(output · weights) for q (if tracked), k and v.
            let run = |attention: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
                let (q, k, v) = (q0.clone(), Var::from_tensor(&k0)?, Var::from_tensor(&v0)?);
                let q = if track_q {
                    Var::from_tensor(&q)?.as_tensor().clone()
                } else {
                    q
                };
                let out = attention(&q, k.as_tensor(), v.as_tensor())?;
                let grads = (&out * &weights)?.sum_all()?.backward()?;
                let grad = |t: &Tensor| grads.get(t).cloned();
                Result::Ok((out, [grad(&q), grad(k.as_tensor()), grad(v.as_tensor())]))
            };
            let (got, got_grads) = run(&|q, k, v| {
                let out = composed(&q.detach(), &k.detach(), &v.detach(), heads)?;
                let op = AttentionBackward {
                    out: Output::new(out)?,
                    heads,
                    max_scores: 2 * heads * m * 3, // 6 query rows per block
                    #[cfg(feature = "cuda")]
                    saved: None,
                };
                q.apply_op3(k, v, op)
            })
            .unwrap();
            let (want, want_grads) = run(&|q, k, v| composed(q, k, v, heads)).unwrap();
            assert!(max_diff(&got, &want) < 1e-12, "output {n}x{m}");
            for (name, g, w) in zip3(["q", "k", "v"], got_grads, want_grads) {
                match (g, w) {
                    (None, None) => assert!(name == "q" && !track_q, "d{name} missing"),
                    (Some(g), Some(w)) => {
                        assert!(
                            max_diff(&g, &w) < 1e-10,
                            "d{name} {n}x{m}: {}",
                            max_diff(&g, &w)
                        );
                        assert!(
                            max_diff(&w, &w.zeros_like().unwrap()) > 1e-3,
                            "d{name} is zero"
                        );
                    }
                    _ => panic!("d{name}: one side has a gradient, the other not"),
                }
            }
        }
    }

    fn zip3<A, B, C>(a: [A; 3], b: [B; 3], c: [C; 3]) -> impl Iterator<Item = (A, B, C)> {
        a.into_iter().zip(b).zip(c).map(|((a, b), c)| (a, b, c))
    }
}
