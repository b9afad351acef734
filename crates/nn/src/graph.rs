//! A network's forward pass replayed as a CUDA graph ([`GraphCache`]): the UNet runs the same
//! few thousand kernels every sampler step, and launching them one by one from the host costs
//! more than the GPU needs to run them at SD 1.5's sizes. A graph launches them all at once.
//!
//! Per set of input shapes (and dtypes, and the circular-padding switch), the first call runs
//! eagerly on its thread: cuDNN and cuBLASLt plans, kernel modules, workspaces and candle's
//! small host-to-device constants are made then, as a capture may not make them. The next call
//! on that thread captures the pass on candle's stream, with static copies of the inputs, and
//! replays it. The first replay on new inputs is checked against the eager pass (once per
//! shape); every later call copies its inputs into the static buffers, replays, and takes a
//! copy of the output. A capture that fails (an op that cannot be captured) or a replay that
//! differs leaves that shape eager, with a warning.
//!
//! Nothing here runs off CUDA, while gradients are tracked, while [`profile`](crate::profile)
//! records, or with `SDKUBE_CUDA_GRAPHS=off` (A/B runs): then `f` just runs.

use candle_core::{Result, Tensor};

/// How many captured shapes a [`GraphCache`] keeps: each holds the device memory of one pass
/// (its activations), so a base pass, a hires pass and a batch size or two fit, not every size
/// a server has seen. The least recently used goes first.
#[cfg(feature = "cuda")]
pub(crate) const KEPT_GRAPHS: usize = 4;

/// Whether graphs are used at all: `SDKUBE_CUDA_GRAPHS=off` turns them off (A/B runs).
pub fn graphs_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDKUBE_CUDA_GRAPHS").as_deref() != Ok("off"))
}

/// The CUDA graphs of one network, one per set of input shapes (see the module docs). Owned by
/// the network, so graphs go when its weights do (a new LoRA set builds a new UNet).
#[derive(Default)]
pub struct GraphCache {
    #[cfg(feature = "cuda")]
    graphs: std::sync::Mutex<crate::cuda::graph::Graphs>,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphCache")
    }
}

impl GraphCache {
    /// `f(inputs)`, replayed from a CUDA graph where it applies. `f` must be a pure function
    /// of its inputs and of weights that do not change while this cache lives.
    pub fn run(
        &self,
        inputs: &[&Tensor],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if graphs_enabled()
            && !crate::profile::is_on()
            && inputs.first().is_some_and(|x| x.device().is_cuda())
            && inputs.iter().all(|x| !x.track_op())
        {
            let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            return graphs.run(inputs, f);
        }
        let owned: Vec<Tensor> = inputs.iter().map(|&x| x.clone()).collect();
        f(&owned)
    }
}
