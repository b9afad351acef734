//! A network's forward pass replayed as a CUDA graph ([`GraphCache`]): the UNet runs the same
//! few hundred kernels every sampler step, and launching them one by one from the host costs
//! more than the GPU needs to run them at SD 1.5's sizes. A graph launches them all at once.
//!
//! Per set of input shapes (and dtypes, and the circular-padding switch), the first call runs
//! eagerly on its thread: cuDNN and cuBLASLt plans, kernel modules, workspaces and candle's
//! small host-to-device constants are made then, as a capture may not make them. The next call
//! on that thread captures the pass, with static copies of the inputs, and replays it. The
//! first replay on new inputs is checked against the eager pass (once per shape); every later
//! call copies its inputs into the static buffers, replays, and takes a copy of the output. A
//! capture that fails (an op that cannot be captured) or a replay that differs leaves that
//! shape eager, with a warning.
//!
//! Nothing here runs off CUDA, while gradients are tracked, while [`profile`](crate::profile)
//! records, or with `SDKUBE_CUDA_GRAPHS=off` (see [`GRAPHS_BY_DEFAULT`]): then `f` just runs.
//! The bookkeeping ([`Graphs`]) is backend-neutral; the capture itself is `cuda/graph.rs`.

use std::collections::HashMap;
use std::thread::ThreadId;

use candle_core::{DType, Result, Shape, Tensor};

use crate::switch::Switch;

/// How many captured shapes a [`GraphCache`] keeps: each holds the device memory of one pass
/// (its activations), so a base pass, a hires pass and a batch size or two fit, not every size
/// a server has seen. The least recently used goes first.
const KEPT_GRAPHS: usize = 4;

/// Whether graphs are used when `SDKUBE_CUDA_GRAPHS` does not say. On: on an H100 every capture
/// of the benchmarks and of the graphs stage replayed exactly as its eager pass (difference 0),
/// and the SD1.5 UNet step took 12.9 ms instead of 15.0 (issue 19).
const GRAPHS_BY_DEFAULT: bool = true;

/// Whether graphs are used at all: `SDKUBE_CUDA_GRAPHS=on|off` ([`GRAPHS_BY_DEFAULT`] else).
static GRAPHS: Switch = Switch::new("SDKUBE_CUDA_GRAPHS", "on", "off", GRAPHS_BY_DEFAULT);

fn graphs_enabled() -> bool {
    GRAPHS.is_on()
}

/// The CUDA graphs of one network, one per set of input shapes (see the module docs). Owned by
/// the network, so graphs go when its weights do (a new LoRA set builds a new UNet).
#[derive(Default)]
pub struct GraphCache {
    #[cfg(feature = "cuda")]
    graphs: std::sync::Mutex<Graphs<crate::cuda::graph::CudaPass>>,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphCache")
    }
}

impl GraphCache {
    /// `f(inputs)`, replayed from a CUDA graph where it applies. `f` must be a pure function
    /// of its inputs and of weights that do not change while this cache lives.
    pub fn run(&self, inputs: &[&Tensor], f: Pass) -> Result<Tensor> {
        self.run_pass(0, inputs, f)
    }

    /// [`run`](Self::run) for a network with several passes over the same inputs (a UNet's
    /// whole and shallow steps under step caching): each `pass` number has graphs of its own.
    pub fn run_pass(&self, pass: u32, inputs: &[&Tensor], f: Pass) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if graphs_enabled()
            && !crate::profile::is_on()
            && inputs.first().is_some_and(|x| x.device().is_cuda())
            && inputs.iter().all(|x| !x.track_op())
        {
            let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            return graphs.run(pass, inputs, f);
        }
        let _ = pass;
        f(&owned(inputs))
    }
}

/// A network's pass over its inputs.
pub type Pass<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

fn owned(inputs: &[&Tensor]) -> Vec<Tensor> {
    inputs.iter().map(|&x| x.clone()).collect()
}

/// A captured pass, as a backend records and replays it.
pub(crate) trait Recording: Sized {
    /// Held while the first eager pass of a shape runs: what a capture needs made beforehand.
    fn warm_up(inputs: &[&Tensor]) -> Result<Box<dyn std::any::Any>>;
    /// `f` captured on static copies of `inputs`, writing an output of `shape` and `dtype`.
    fn capture(inputs: &[&Tensor], shape: &Shape, dtype: DType, f: Pass) -> Result<Self>;
    /// The captured pass on `inputs`.
    fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor>;
}

/// What a graph is captured for: the pass, each input's shape and dtype, and whether
/// convolutions pad circularly (seamless tiling changes the kernels a pass runs).
type Key = (u32, Vec<(Vec<usize>, DType)>, bool);

enum Entry<R> {
    /// Ran eagerly on this thread, giving this output: the next call on the thread captures.
    Warm(ThreadId, Shape, DType),
    Captured {
        recording: R,
        last_use: u64,
        /// Whether a replay on new inputs has matched the eager pass.
        checked: bool,
    },
    /// The capture failed or its replay differed: this shape runs eagerly from now on.
    Eager,
}

/// The graphs of one network by [`Key`], and when each was last used.
pub(crate) struct Graphs<R> {
    entries: HashMap<Key, Entry<R>>,
    clock: u64,
}

impl<R> Default for Graphs<R> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
        }
    }
}

impl<R: Recording> Graphs<R> {
    pub(crate) fn run(&mut self, pass: u32, inputs: &[&Tensor], f: Pass) -> Result<Tensor> {
        let key: Key = (
            pass,
            inputs
                .iter()
                .map(|x| (x.dims().to_vec(), x.dtype()))
                .collect(),
            crate::circular_padding(),
        );
        self.clock += 1;
        let now = self.clock;
        let me = std::thread::current().id();
        match self.entries.get_mut(&key) {
            Some(Entry::Captured {
                recording,
                last_use,
                checked: true,
            }) => {
                *last_use = now;
                recording.replay(inputs)
            }
            Some(Entry::Captured {
                recording,
                last_use,
                checked,
            }) => {
                // The first replay on new inputs is checked against the eager pass: a capture
                // that baked in something of its own call would show here, not in images.
                let replayed = recording.replay(inputs)?;
                let eager = f(&owned(inputs))?;
                let (diff, scale) = difference(&replayed, &eager)?;
                // Loose enough for kernels that sum in a different order per run; a baked-in
                // input is off by the order of the output itself.
                if diff <= 1e-2 * scale.max(1.0) {
                    tracing::info!(diff, scale, shapes = ?key.1, "CUDA graph captured and checked");
                    *checked = true;
                    *last_use = now;
                } else {
                    let why = "a CUDA graph's replay differs from the eager pass";
                    tracing::warn!(diff, scale, shapes = ?key.1, "{why}: these shapes run eagerly");
                    self.entries.insert(key, Entry::Eager);
                }
                Ok(eager)
            }
            Some(Entry::Eager) => f(&owned(inputs)),
            Some(Entry::Warm(thread, shape, dtype)) if *thread == me => {
                let (shape, dtype) = (shape.clone(), *dtype);
                self.make_room();
                match R::capture(inputs, &shape, dtype, f) {
                    Ok(recording) => {
                        let out = recording.replay(inputs);
                        let entry = Entry::Captured {
                            recording,
                            last_use: now,
                            checked: false,
                        };
                        self.entries.insert(key, entry);
                        out
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, shapes = ?key.1,
                            "no CUDA graph for these shapes: they run eagerly");
                        self.entries.insert(key, Entry::Eager);
                        f(&owned(inputs))
                    }
                }
            }
            // New, or warm on another thread (plans and constants are per thread).
            _ => {
                let _made_now = R::warm_up(inputs)?;
                let out = f(&owned(inputs))?;
                let entry = Entry::Warm(me, out.shape().clone(), out.dtype());
                self.entries.insert(key, entry);
                Ok(out)
            }
        }
    }

    /// Drops least recently used graphs until fewer than [`KEPT_GRAPHS`] are held.
    fn make_room(&mut self) {
        while self.captured() >= KEPT_GRAPHS {
            let oldest = self
                .entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Captured { last_use, .. } => Some((k, *last_use)),
                    _ => None,
                })
                .min_by_key(|(_, used)| *used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(key) => self.entries.remove(&key),
                None => return,
            };
        }
    }

    /// How many graphs are held.
    fn captured(&self) -> usize {
        let captured = |e: &&Entry<R>| matches!(e, Entry::Captured { .. });
        self.entries.values().filter(captured).count()
    }
}

/// The largest difference between `a` and `b`, and the largest magnitude in `b`.
fn difference(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let max = |t: Tensor| t.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>();
    Ok((max((a - b)?)?, max(b.clone())?))
}

#[cfg(test)]
mod tests {
    //! The bookkeeping, on the CPU, with a recording that replays by calling the pass again
    //! ([`Fake`]); what a CUDA capture records is checked on the GPU (`benches/gpu_run.sh`,
    //! stage `graphs`: the same images with graphs on and off).
    use super::*;
    use candle_core::Device;
    use std::cell::Cell;

    thread_local! {
        static EAGER: Cell<usize> = const { Cell::new(0) };
        static CAPTURES: Cell<usize> = const { Cell::new(0) };
        static REPLAYS: Cell<usize> = const { Cell::new(0) };
        /// The capture fails.
        static REFUSE: Cell<bool> = const { Cell::new(false) };
        /// Replays give the capture call's output whatever the inputs (a baked-in input).
        static BAKED: Cell<bool> = const { Cell::new(false) };
    }

    fn pass(x: &[Tensor]) -> Result<Tensor> {
        (&x[0] * 2.0)?.broadcast_add(&x[1])
    }

    fn eager(x: &[Tensor]) -> Result<Tensor> {
        EAGER.with(|c| c.set(c.get() + 1));
        pass(x)
    }

    struct Fake {
        captured_output: Tensor,
    }

    impl Recording for Fake {
        fn warm_up(_: &[&Tensor]) -> Result<Box<dyn std::any::Any>> {
            Ok(Box::new(()))
        }

        fn capture(inputs: &[&Tensor], shape: &Shape, dtype: DType, f: Pass) -> Result<Self> {
            if REFUSE.with(Cell::get) {
                candle_core::bail!("this op cannot be captured");
            }
            CAPTURES.with(|c| c.set(c.get() + 1));
            let out = f(&owned(inputs))?;
            assert_eq!((out.shape(), out.dtype()), (shape, dtype));
            Ok(Self {
                captured_output: out,
            })
        }

        fn replay(&self, inputs: &[&Tensor]) -> Result<Tensor> {
            REPLAYS.with(|c| c.set(c.get() + 1));
            match BAKED.with(Cell::get) {
                true => Ok(self.captured_output.clone()),
                false => pass(&owned(inputs)),
            }
        }
    }

    fn inputs(side: usize, t: f32) -> [Tensor; 2] {
        let x = Tensor::arange(0f32, (side * side) as f32, &Device::Cpu).unwrap();
        [
            x.reshape((side, side)).unwrap(),
            Tensor::new(&[t], &Device::Cpu).unwrap(),
        ]
    }

    /// Runs `graphs` on inputs of `side` at timestep `t` and checks the result is the pass's.
    fn step(graphs: &mut Graphs<Fake>, side: usize, t: f32) {
        let [x, t] = inputs(side, t);
        let out = graphs.run(0, &[&x, &t], &eager).unwrap();
        let want = pass(&[x, t]).unwrap();
        assert_eq!(difference(&out, &want).unwrap().0, 0.0);
    }

    fn counts() -> (usize, usize, usize) {
        (
            EAGER.with(Cell::get),
            CAPTURES.with(Cell::get),
            REPLAYS.with(Cell::get),
        )
    }

    #[test]
    fn warm_up_capture_check_then_replay_alone() {
        let mut graphs = Graphs::<Fake>::default();
        step(&mut graphs, 4, 1.0); // eager, on this thread
        assert_eq!(counts(), (1, 0, 0));
        step(&mut graphs, 4, 2.0); // captured (the capture runs the pass) and replayed
        assert_eq!(counts(), (2, 1, 1));
        step(&mut graphs, 4, 3.0); // replayed and checked against the eager pass
        assert_eq!(counts(), (3, 1, 2));
        for t in 4..8 {
            step(&mut graphs, 4, t as f32); // replayed alone
        }
        assert_eq!(counts(), (3, 1, 6));
        step(&mut graphs, 5, 1.0); // another shape starts over
        assert_eq!(counts(), (4, 1, 6));
    }

    #[test]
    fn a_replay_that_differs_leaves_the_shape_eager() {
        BAKED.with(|b| b.set(true));
        let mut graphs = Graphs::<Fake>::default();
        for t in 0..5 {
            step(&mut graphs, 4, t as f32);
        }
        // eager passes: the warm-up, the capture's, the failed check's, then two alone; the
        // capture call and the check replay
        assert_eq!(counts(), (5, 1, 2));
    }

    #[test]
    fn a_failed_capture_leaves_the_shape_eager() {
        REFUSE.with(|r| r.set(true));
        let mut graphs = Graphs::<Fake>::default();
        for t in 0..4 {
            step(&mut graphs, 4, t as f32);
        }
        assert_eq!(counts(), (4, 0, 0));
        assert_eq!(graphs.captured(), 0);
    }

    #[test]
    fn another_thread_warms_up_before_capturing() {
        let mut graphs = Graphs::<Fake>::default();
        step(&mut graphs, 4, 1.0);
        let graphs = std::thread::scope(|s| {
            s.spawn(move || {
                step(&mut graphs, 4, 2.0); // this thread's plans are not made yet: eager
                let first = counts();
                step(&mut graphs, 4, 3.0);
                (first, counts(), graphs)
            })
            .join()
            .unwrap()
        });
        assert_eq!((graphs.0, graphs.1), ((1, 0, 0), (2, 1, 1)));
    }

    #[test]
    fn keeps_the_most_recently_used_shapes() {
        let mut graphs = Graphs::<Fake>::default();
        for side in 1..=KEPT_GRAPHS + 1 {
            for t in 0..3 {
                step(&mut graphs, side, t as f32);
            }
        }
        assert_eq!(graphs.captured(), KEPT_GRAPHS);
        // The first shape went: it warms up again; the last ones replay.
        let before = counts();
        step(&mut graphs, KEPT_GRAPHS + 1, 9.0);
        step(&mut graphs, 1, 9.0);
        let after = counts();
        assert_eq!((after.0 - before.0, after.2 - before.2), (1, 1));
    }

    #[test]
    fn each_pass_has_graphs_of_its_own() {
        let mut graphs = Graphs::<Fake>::default();
        for t in 0..3 {
            step(&mut graphs, 4, t as f32);
        }
        let before = counts();
        let [x, t] = inputs(4, 7.0);
        graphs.run(1, &[&x, &t], &eager).unwrap();
        let after = counts();
        // The same shapes as pass 0's graph, but another pass: a warm-up, no replay.
        assert_eq!((after.0 - before.0, after.2 - before.2), (1, 0));
        assert_eq!(graphs.captured(), 1);
    }

    #[test]
    fn circular_padding_is_a_shape_of_its_own() {
        let mut graphs = Graphs::<Fake>::default();
        for t in 0..3 {
            step(&mut graphs, 4, t as f32);
        }
        let before = counts();
        crate::with_circular_padding(true, || step(&mut graphs, 4, 5.0));
        let after = counts();
        assert_eq!((after.0 - before.0, after.2 - before.2), (1, 0)); // warm-up, no replay
    }
}
