//! [`GraphCache`](crate::GraphCache)'s CUDA side: warm up, capture, check, replay (see
//! `graph.rs`).

use std::collections::HashMap;
use std::thread::ThreadId;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Result, Shape, Tensor};

/// What a graph is captured for: each input's shape and dtype, and whether convolutions pad
/// circularly (seamless tiling changes the kernels a pass runs).
type Key = (Vec<(Vec<usize>, DType)>, bool);

enum Entry {
    /// Ran eagerly on this thread, giving this output: the next call on the thread captures.
    Warm(ThreadId, Shape, DType),
    Captured(Box<Captured>),
    /// The capture failed: this shape runs eagerly from now on.
    Eager,
}

/// A captured pass: it reads `inputs` and writes `output`, buffers of its own.
struct Captured {
    inputs: Vec<Tensor>,
    output: Tensor,
    graph: Graph,
    last_use: u64,
    /// Whether a replay on new inputs has matched the eager pass.
    checked: bool,
}

/// A graph is not `Send` (raw handles), and CUDA asks that calls on one graph be serialized:
/// every use is under [`GraphCache`](crate::GraphCache)'s mutex.
struct Graph(CudaGraph);
// SAFETY: see above; the handles stay valid on any thread of the process.
unsafe impl Send for Graph {}

#[derive(Default)]
pub(crate) struct Graphs {
    entries: HashMap<Key, Entry>,
    clock: u64,
    device: Option<CudaDevice>,
}

impl Graphs {
    pub(crate) fn run(
        &mut self,
        inputs: &[&Tensor],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Device::Cuda(dev) = inputs[0].device().clone() else {
            candle_core::bail!("graphs run on CUDA only")
        };
        let owned = || inputs.iter().map(|&x| x.clone()).collect::<Vec<_>>();
        let key: Key = (
            inputs
                .iter()
                .map(|x| (x.dims().to_vec(), x.dtype()))
                .collect(),
            crate::circular_padding(),
        );
        self.clock += 1;
        let me = std::thread::current().id();
        match self.entries.get_mut(&key) {
            Some(Entry::Captured(c)) if c.checked => {
                c.last_use = self.clock;
                c.replay(inputs)
            }
            Some(Entry::Captured(c)) => {
                // The first replay on new inputs is checked against the eager pass: a capture
                // that baked in something of its own call would show here, not in images.
                let replayed = c.replay(inputs)?;
                let eager = f(&owned())?;
                let scale = eager
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                let diff = (&replayed - &eager)?
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                // Loose enough for kernels that sum in a different order per run; a baked-in
                // input is off by the order of the output itself.
                if diff <= 1e-2 * scale.max(1.0) {
                    tracing::info!(diff, scale, shapes = ?key.0, "CUDA graph captured and checked");
                    c.checked = true;
                    c.last_use = self.clock;
                } else {
                    tracing::warn!(diff, scale, shapes = ?key.0, "a CUDA graph's replay differs from the eager pass: these shapes run eagerly");
                    self.entries.insert(key, Entry::Eager);
                }
                Ok(eager)
            }
            Some(Entry::Eager) => f(&owned()),
            Some(Entry::Warm(thread, shape, dtype)) if *thread == me => {
                let (shape, dtype) = (shape.clone(), *dtype);
                self.make_room();
                match capture(&dev, inputs, &shape, dtype, f) {
                    Ok(mut captured) => {
                        captured.last_use = self.clock;
                        let out = captured.replay(inputs);
                        self.device = Some(dev);
                        self.entries
                            .insert(key, Entry::Captured(Box::new(captured)));
                        out
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, shapes = ?key.0, "no CUDA graph for these shapes: they run eagerly");
                        self.entries.insert(key, Entry::Eager);
                        f(&owned())
                    }
                }
            }
            _ => {
                // Constants that candle uploads (kernel parameters, small tensors) are kept on
                // the device from now on, so the capture finds them there.
                let _constants = dev.enable_cuda_graph_htod_cache();
                let out = f(&owned())?;
                let entry = Entry::Warm(me, out.shape().clone(), out.dtype());
                self.entries.insert(key, entry);
                Ok(out)
            }
        }
    }

    /// Drops least recently used graphs until fewer than `KEPT_GRAPHS` are held.
    fn make_room(&mut self) {
        loop {
            let captured = self.entries.iter().filter_map(|(k, e)| match e {
                Entry::Captured(c) => Some((k, c.last_use)),
                _ => None,
            });
            if captured.clone().count() < crate::graph::KEPT_GRAPHS {
                return;
            }
            let oldest = captured
                .min_by_key(|(_, used)| *used)
                .map(|(k, _)| k.clone());
            if let Some(key) = oldest {
                sync(self.device.as_ref());
                self.entries.remove(&key);
            }
            trim(self.device.as_ref());
        }
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        sync(self.device.as_ref());
        self.entries.clear();
        trim(self.device.as_ref());
    }
}

/// Waits for the graphs' last launches before they are destroyed.
fn sync(device: Option<&CudaDevice>) {
    if let Some(dev) = device {
        if let Err(e) = dev.cuda_stream().synchronize() {
            tracing::debug!(error = %e, "waiting for the last graph launch");
        }
    }
}

/// Gives the device memory that dropped graphs held back to the driver (graphs allocate from
/// a pool of their own, which keeps what it had until trimmed).
fn trim(device: Option<&CudaDevice>) {
    let Some(dev) = device else { return };
    let ctx = dev.cuda_stream().context().clone();
    if ctx.bind_to_thread().is_ok() {
        // SAFETY: a plain driver call on a valid device; memory in use by a graph stays.
        let r = unsafe { sys::cuDeviceGraphMemTrim(ctx.cu_device()) };
        if let Err(e) = r.result() {
            tracing::debug!(error = %e, "trimming graph memory");
        }
    }
}

/// Captures `f` on static copies of `inputs`, writing into a static output of `shape`.
fn capture(
    dev: &CudaDevice,
    inputs: &[&Tensor],
    shape: &Shape,
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Captured> {
    // Candle tracks every buffer's uses with events when a context has streams of its own; a
    // capture may not wait on events recorded outside it. sdkube runs one stream per device,
    // so the events order nothing.
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
    // Everything `f` allocates is freed inside the capture (its result once copied out), so
    // the graph owns no memory between launches but its own pool's.
    let body =
        f(&statics).and_then(|out| output.flatten_all()?.slice_set(&out.flatten_all()?, 0, 0));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    body?;
    let graph = graph
        .w()?
        .ok_or_else(|| candle_core::Error::Msg("an empty capture".into()))?;
    graph.upload().w()?;
    Ok(Captured {
        inputs: statics,
        output,
        graph: Graph(graph),
        last_use: 0,
        checked: false,
    })
}

impl Captured {
    /// Copies `inputs` in, launches the graph, and returns a copy of its output (the next
    /// launch overwrites it).
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        for (s, x) in self.inputs.iter().zip(inputs) {
            s.flatten_all()?.slice_set(&x.flatten_all()?, 0, 0)?;
        }
        self.graph.0.launch().w()?;
        self.output.copy()
    }
}
