//! Step caching, as DeepCache does it in its uniform mode (Ma et al. 2023,
//! <https://arxiv.org/abs/2312.00858>): from one sampler step to the next the UNet's deep
//! features change little, so every `interval`-th call runs the whole UNet and keeps what enters
//! the up layer that joins skip connection `branch`; the calls between run only the shallow
//! branch above it (`conv_in`, the down layers that make skip connections `0..=branch`, the up
//! layers that join them) on the kept features. Off by default: it trades image fidelity for
//! speed.
//!
//! Branches are numbered by skip connection, `conv_in`'s output being 0; where a down block
//! makes three (two layers and a downsampler: SD 1.x, 2.x and SDXL) that is DeepCache's
//! `cache_branch_id`. Parity with DeepCache's own helper: `tests/step_cache.rs`.

use candle_core::{Result, Tensor};

use super::{added_of, AddedConditioning, ControlResiduals, Inputs, UNet2DConditionModel};

/// How a sampling run caches the UNet's deep features between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepCaching {
    /// Every this many UNet calls one runs whole; 1 = every call (off).
    pub interval: usize,
    /// The skip connection the shallow branch ends at (0 = `conv_in`'s: the least computed).
    pub branch: usize,
}

impl StepCaching {
    /// No caching: every call runs the whole UNet.
    pub const OFF: Self = Self {
        interval: 1,
        branch: 0,
    };

    /// Whether some calls reuse kept features.
    pub fn is_on(&self) -> bool {
        self.interval > 1
    }
}

impl Default for StepCaching {
    fn default() -> Self {
        Self::OFF
    }
}

/// What one sampling run keeps between its UNet calls (a new one per run: the features belong
/// to its latents). A call of another UNet (a refiner taking over) runs whole and keeps its own.
#[derive(Debug)]
pub struct StepCache {
    caching: StepCaching,
    calls: usize,
    shallow_calls: usize,
    kept: Option<Kept>,
}

/// Features a whole call kept: the UNet's id, the latents' dims, the up layer's input.
#[derive(Debug)]
struct Kept {
    unet: u64,
    dims: Vec<usize>,
    features: Tensor,
}

/// A new UNet's [`id`](UNet2DConditionModel::id).
pub(super) fn new_unet_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl StepCache {
    /// An empty cache: its first call runs the whole UNet.
    pub fn new(caching: StepCaching) -> Self {
        Self {
            caching,
            calls: 0,
            shallow_calls: 0,
            kept: None,
        }
    }

    /// How many calls ran the shallow branch only.
    pub fn shallow_calls(&self) -> usize {
        self.shallow_calls
    }
}

/// The graph pass numbers of [`GraphCache::run_pass`](sdkube_nn::GraphCache::run_pass): 0 is
/// the plain pass; a whole pass that keeps the features of `branch`, and a shallow one.
fn whole_pass(branch: usize) -> u32 {
    1 + 2 * branch as u32
}

fn shallow_pass(branch: usize) -> u32 {
    2 + 2 * branch as u32
}

impl UNet2DConditionModel {
    /// [`forward_with_control`](Self::forward_with_control) under `cache`'s step caching: a
    /// whole pass on every `interval`-th call (and whenever the cache holds nothing this UNet
    /// kept for latents of these dims), else the shallow branch on the features the last whole
    /// pass kept.
    pub fn forward_cached(
        &self,
        xs: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        added: Option<&AddedConditioning>,
        control: Option<&ControlResiduals>,
        cache: &mut StepCache,
    ) -> Result<Tensor> {
        let caching = cache.caching;
        if !caching.is_on() {
            return self.forward_with_control(xs, t, ctx, added, control);
        }
        let deepest = self.cfg.skip_connections() - 1;
        if caching.branch > deepest {
            candle_core::bail!(
                "step caching: branch {} is past this UNet's deepest skip connection ({deepest})",
                caching.branch
            );
        }
        let call = cache.calls;
        cache.calls += 1;
        let inputs = Inputs {
            xs,
            t,
            ctx,
            added,
            control,
        };
        if !call.is_multiple_of(caching.interval) {
            if let Some(kept) = &cache.kept {
                if kept.unet == self.id && kept.dims == xs.dims() {
                    cache.shallow_calls += 1;
                    return self.shallow(&inputs, caching.branch, &kept.features);
                }
            }
        }
        let (out, features) = self.whole_keeping(&inputs, caching.branch)?;
        cache.kept = Some(Kept {
            unet: self.id,
            dims: xs.dims().to_vec(),
            features,
        });
        Ok(out)
    }

    /// The up layer that joins skip connection `branch` (up layers joining the deepest first).
    fn joining_layer(&self, branch: usize) -> usize {
        self.cfg.skip_connections() - 1 - branch
    }

    /// A whole pass, and the input of the up layer that joins skip connection `branch`. On
    /// GPUs one graph gives both, packed end to end in one flat tensor.
    fn whole_keeping(&self, inputs: &Inputs<'_>, branch: usize) -> Result<(Tensor, Tensor)> {
        let keep = self.joining_layer(branch);
        if inputs.control.is_some() {
            return self.whole_eager(inputs, keep);
        }
        let packed = self
            .graphs
            .run_pass(whole_pass(branch), &inputs.tensors(None), &|x| {
                let added = added_of(x);
                let (out, kept) = self.whole_eager(&Inputs::of_graph(x, added.as_ref()), keep)?;
                let channels_last = sdkube_nn::channels_last_on(&out);
                Tensor::cat(
                    &[memory(&out, channels_last)?, memory(&kept, channels_last)?],
                    0,
                )
            })?;
        let (b, _, h, w) = inputs.xs.dims4()?;
        let out_dims = (b, self.cfg.out_channels, h, w);
        let kept_dims = self.up_input_dims(inputs.xs, keep)?;
        let out_len = b * self.cfg.out_channels * h * w;
        let kept_len = kept_dims.0 * kept_dims.1 * kept_dims.2 * kept_dims.3;
        if packed.elem_count() != out_len + kept_len {
            candle_core::bail!(
                "step caching: the whole pass gave {} values, {out_len} + {kept_len} expected",
                packed.elem_count()
            );
        }
        let channels_last = sdkube_nn::channels_last_on(&packed);
        Ok((
            unpack(&packed.narrow(0, 0, out_len)?, out_dims, channels_last)?,
            unpack(
                &packed.narrow(0, out_len, kept_len)?,
                kept_dims,
                channels_last,
            )?,
        ))
    }

    /// [`whole_keeping`](Self::whole_keeping), run eagerly: the prediction and up layer
    /// `keep`'s input.
    fn whole_eager(&self, i: &Inputs<'_>, keep: usize) -> Result<(Tensor, Tensor)> {
        let (out, kept) = self.pass(i, Some(keep))?;
        let missing = || candle_core::Error::Msg(format!("step caching: no up layer {keep}"));
        Ok((out, kept.ok_or_else(missing)?))
    }

    /// The shallow branch ending at skip connection `branch`, on `kept`.
    fn shallow(&self, inputs: &Inputs<'_>, branch: usize, kept: &Tensor) -> Result<Tensor> {
        if inputs.control.is_some() {
            return self.shallow_eager(inputs, branch, kept);
        }
        let tensors = inputs.tensors(Some(kept));
        self.graphs.run_pass(shallow_pass(branch), &tensors, &|x| {
            let (kept, x) = x.split_last().expect("the kept features are an input");
            let added = added_of(x);
            self.shallow_eager(&Inputs::of_graph(x, added.as_ref()), branch, kept)
        })
    }

    /// [`shallow`](Self::shallow), run eagerly.
    fn shallow_eager(&self, i: &Inputs<'_>, branch: usize, kept: &Tensor) -> Result<Tensor> {
        let (emb, ctx) = self.conditioning(i)?;
        let h = self.encoder.conv_in(i.xs)?;
        let (_, mut skips) = self.encoder.down_to(h, &emb, &ctx, branch + 1)?;
        if let Some(control) = i.control {
            self.add_control(&mut skips, control)?;
        }
        let first = self.joining_layer(branch);
        Ok(self.up(kept.clone(), skips, &emb, &ctx, first, None)?.0)
    }

    /// The dims of up layer `layer`'s input for latents `xs`: the size of the skip connection
    /// it joins, the channels of the block (or mid block) before it.
    fn up_input_dims(&self, xs: &Tensor, layer: usize) -> Result<(usize, usize, usize, usize)> {
        let (b, _, mut h, mut w) = xs.dims4()?;
        let mut sizes = vec![(h, w)]; // conv_in's output
        for block in &self.encoder.down_blocks {
            sizes.extend(std::iter::repeat_n((h, w), block.level.resnets.len()));
            if block.downsampler.is_some() {
                (h, w) = (h.div_ceil(2), w.div_ceil(2)); // 3×3, stride 2, padding 1
                sizes.push((h, w));
            }
        }
        let boc = &self.cfg.block_out_channels;
        let mut channels = boc[boc.len() - 1]; // the mid block's
        let mut at = 0;
        for (i, block) in self.up_blocks.iter().enumerate() {
            for _ in &block.level.resnets {
                if at == layer {
                    let (h, w) = sizes[sizes.len() - 1 - layer];
                    return Ok((b, channels, h, w));
                }
                channels = boc[boc.len() - 1 - i];
                at += 1;
            }
        }
        candle_core::bail!("step caching: the UNet has no up layer {layer}")
    }
}

/// `t`'s values, flat, in memory order: channels-last where convolutions write it (as they do
/// where [`sdkube_nn::channels_last_on`] says so), so that packing costs no transposition.
fn memory(t: &Tensor, channels_last: bool) -> Result<Tensor> {
    if channels_last {
        sdkube_nn::to_channels_last(t)?
            .permute((0, 2, 3, 1))?
            .flatten_all()
    } else {
        t.flatten_all()
    }
}

/// The `[N, C, H, W]` map of dims `dims` whose [`memory`] is `flat`.
fn unpack(
    flat: &Tensor,
    (n, c, h, w): (usize, usize, usize, usize),
    channels_last: bool,
) -> Result<Tensor> {
    if channels_last {
        flat.reshape((n, h, w, c))?.permute((0, 3, 1, 2))
    } else {
        flat.reshape((n, c, h, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A map packed in either layout comes back with its values and its layout (the GPU packs
    /// channels-last).
    #[test]
    fn packed_maps_come_back_in_either_layout() -> Result<()> {
        let map = Tensor::randn(0f32, 1., (2, 3, 4, 5), &Device::Cpu)?;
        for channels_last in [false, true] {
            let stored = match channels_last {
                true => sdkube_nn::to_channels_last(&map)?,
                false => map.clone(),
            };
            let flat = memory(&stored, channels_last)?;
            assert_eq!(flat.dims(), [120]);
            let back = unpack(&flat, (2, 3, 4, 5), channels_last)?;
            assert_eq!(sdkube_nn::is_channels_last(&back), channels_last);
            let diff = (back - &map)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "channels-last {channels_last}");
        }
        Ok(())
    }
}
