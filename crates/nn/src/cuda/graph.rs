//! A pass captured as a CUDA graph on candle's stream ([`CudaPass`], the CUDA side of
//! [`GraphCache`](crate::GraphCache); the bookkeeping is in `graph.rs`).

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Result, Shape, Tensor};

use crate::graph::{Pass, Recording};

/// A captured pass: it reads `inputs` and writes `output`, buffers of its own.
pub(crate) struct CudaPass {
    inputs: Vec<Tensor>,
    output: Tensor,
    graph: Option<Graph>,
    dev: CudaDevice,
}

/// A graph is not `Send` (raw handles), and CUDA asks that calls on one graph be serialized:
/// every use is under [`GraphCache`](crate::GraphCache)'s mutex.
struct Graph(CudaGraph);
// SAFETY: see above; the handles stay valid on any thread of the process.
unsafe impl Send for Graph {}

fn cuda(x: &Tensor) -> Result<CudaDevice> {
    match x.device() {
        Device::Cuda(dev) => Ok(dev.clone()),
        _ => candle_core::bail!("CUDA graphs run on CUDA tensors only"),
    }
}

impl Recording for CudaPass {
    fn warm_up(inputs: &[&Tensor]) -> Result<Box<dyn std::any::Any>> {
        // Constants that candle uploads (kernel parameters, small tensors) are kept on the
        // device from now on, so the capture finds them there.
        Ok(Box::new(cuda(inputs[0])?.enable_cuda_graph_htod_cache()))
    }

    fn capture(inputs: &[&Tensor], shape: &Shape, dtype: DType, f: Pass) -> Result<Self> {
        let dev = cuda(inputs[0])?;
        // Candle tracks every buffer's uses with events when a context has streams of its own;
        // a capture may not wait on events recorded outside it. sdkube runs one stream per
        // device, so the events order nothing.
        // SAFETY: every tensor of this device is used on candle's one stream.
        unsafe { dev.disable_event_tracking() };
        let device = Device::Cuda(dev.clone());
        let statics = inputs
            .iter()
            .map(|x| {
                let s = Tensor::zeros(x.shape(), x.dtype(), &device)?;
                s.flatten_all()?.slice_set(&x.flatten_all()?, 0, 0)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        let output = Tensor::zeros(shape, dtype, &device)?;
        let _constants = dev.enable_cuda_graph_htod_cache();
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        // Everything `f` allocates is freed inside the capture (its result once copied out),
        // so the graph holds no memory between launches but its own pool's.
        let body =
            f(&statics).and_then(|out| output.flatten_all()?.slice_set(&out.flatten_all()?, 0, 0));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        body?;
        let graph = graph
            .w()?
            .ok_or_else(|| candle_core::Error::Msg("an empty capture".into()))?;
        graph.upload().w()?;
        Ok(Self {
            inputs: statics,
            output,
            graph: Some(Graph(graph)),
            dev,
        })
    }

    /// Copies `inputs` in, launches the graph, and returns a copy of its output (the next
    /// launch overwrites it).
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        for (s, x) in self.inputs.iter().zip(inputs) {
            s.flatten_all()?.slice_set(&x.flatten_all()?, 0, 0)?;
        }
        if let Some(graph) = &self.graph {
            graph.0.launch().w()?;
        }
        self.output.copy()
    }
}

impl Drop for CudaPass {
    fn drop(&mut self) {
        // The last launch finishes before the graph goes; then the memory the graph's pool
        // kept goes back to the driver (it is not trimmed otherwise).
        let stream = self.dev.cuda_stream();
        if let Err(e) = stream.synchronize() {
            tracing::debug!(error = %e, "waiting for the last graph launch");
        }
        self.graph.take();
        let ctx = stream.context();
        if ctx.bind_to_thread().is_ok() {
            // SAFETY: a plain driver call on a valid device; memory in use by a graph stays.
            let r = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
            if let Err(e) = r.result() {
                tracing::debug!(error = %e, "trimming graph memory");
            }
        }
    }
}
