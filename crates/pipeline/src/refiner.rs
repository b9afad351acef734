//! A1111's refiner: a second checkpoint that takes over the sampler run once a share of the
//! schedule is done (`refiner_checkpoint`, `refiner_switch_at`), with its own conditioning and
//! UNet, continuing the same latents.

use candle_core::Tensor;
use sdkube_models::unet::{AddedConditioning, UNet2DConditionModel};

use crate::generate::Engine;
use crate::sampler::ModelScalings;
use crate::Error;

/// A1111's `refiner_checkpoint` and `refiner_switch_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Refiner {
    /// The refiner's model name, as [`Engine::model_name`] of the engine given to
    /// [`Engine::set_refiner`].
    pub checkpoint: String,
    /// Once this share of the schedule is done (0..1, read off the timestep as A1111 does),
    /// the refiner denoises the rest in the same sampler run.
    pub switch_at: f64,
}

/// What the refiner denoises with once it takes over.
pub(crate) struct RefinerStage {
    pub switch_at: f64,
    pub context: Tensor,
    pub added: Option<AddedConditioning>,
    pub scalings: ModelScalings,
}

pub(crate) enum UNetRef<'a> {
    Borrowed(&'a UNet2DConditionModel),
    Owned(Box<UNet2DConditionModel>),
}

/// The UNet of the stage the sampler is at (the model's, then the refiner's). With
/// `--vram low` only one of them is on the device: the first leaves before the second is built.
pub(crate) struct StageUNets<'a> {
    pub base: &'a Engine,
    pub refiner: Option<&'a Engine>,
    pub current: std::cell::RefCell<Option<(bool, UNetRef<'a>)>>,
}

impl StageUNets<'_> {
    pub fn with<R>(
        &self,
        refining: bool,
        f: impl FnOnce(&UNet2DConditionModel) -> R,
    ) -> Result<R, Error> {
        let mut current = self.current.borrow_mut();
        if !matches!(&*current, Some((r, _)) if *r == refining) {
            *current = None;
            let engine = match (refining, self.refiner) {
                (true, Some(r)) => r,
                _ => self.base,
            };
            *current = Some((refining, engine.unet()?));
        }
        let Some((_, unet)) = &*current else {
            unreachable!("set above")
        };
        Ok(f(match unet {
            UNetRef::Borrowed(u) => u,
            UNetRef::Owned(u) => u,
        }))
    }
}
