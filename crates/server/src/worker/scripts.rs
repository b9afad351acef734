//! A job that runs an A1111 script (X/Y/Z plot, prompt matrix, SD upscale): its cells one
//! after another on this worker's engine (switching checkpoints for a checkpoint axis),
//! progress over all of them, then the script's grids and images kept in A1111's order.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use image::DynamicImage;
use sdkube_pipeline::image_io::encode_png;
use sdkube_pipeline::sampler::{Flow, SamplerError};
use sdkube_pipeline::scripts::{Cell, CellImage, CellRunner, Script, ScriptError};

use super::{JobError, Worker};
use crate::job::{Failure, Job};
use crate::work::GenerateWork;

impl From<ScriptError> for JobError {
    fn from(e: ScriptError) -> Self {
        Self {
            kind: Failure::BadRequest,
            message: e.0,
        }
    }
}

/// Runs cells for one job on the worker.
struct JobCells<'a> {
    worker: &'a mut Worker,
    job: &'a Arc<Job>,
    work: &'a GenerateWork,
    /// Steps of the cells done so far (progress counts on from here).
    done_steps: usize,
}

impl CellRunner for JobCells<'_> {
    type Error = JobError;

    fn run_cell(&mut self, cell: &Cell) -> Result<Option<CellImage>, JobError> {
        // After an interrupt, A1111 leaves the remaining cells empty.
        if self.job.should_stop() {
            return Ok(None);
        }
        if let Some(name) = &cell.checkpoint {
            self.worker.ensure_model(Some(name))?;
            let name = self.worker.state.model.status().name;
            self.job.update(|s| s.model = Some(name));
        }
        let Some(mut engine) = self.worker.engine.take() else {
            return Err(JobError {
                kind: Failure::Unavailable,
                message: "the model is not ready".into(),
            });
        };
        if cell.checkpoint.is_some() {
            self.worker.pick_up_files(&mut engine);
        }
        // A checkpoint cell may have brought another model: the refiner is loaded beside it.
        let request = match self
            .worker
            .with_refiner(&mut engine, vec![cell.request.clone()])
        {
            Ok(mut r) => r.remove(0),
            Err(e) => {
                self.worker.engine = Some(engine);
                return Err(e);
            }
        };
        let (job, offset) = (self.job, self.done_steps);
        let mut on_step = |p: &sdkube_pipeline::Progress| {
            job.update(|s| {
                s.step = offset + p.step + 1;
                s.total_steps = s.total_steps.max(s.step);
            });
            match job.should_stop() || job.skip.load(Ordering::SeqCst) {
                true => Flow::Stop,
                false => Flow::Continue,
            }
        };
        let result = match engine.generate(&request, &mut on_step) {
            Ok(mut images) if !images.is_empty() => {
                let g = images.remove(0);
                self.worker
                    .post_process(
                        &mut engine,
                        job,
                        cell.hires.as_ref(),
                        self.work.restore_faces,
                        &request,
                        g,
                    )
                    .map(|(image, parameters, seed)| {
                        Some(CellImage {
                            image: image.to_rgb8(),
                            seed,
                            parameters,
                        })
                    })
            }
            Ok(_) => Ok(None),
            // A1111's skip ends the current cell only; an interrupt leaves it empty too.
            Err(sdkube_pipeline::Error::Sampler(SamplerError::Interrupted { .. })) => {
                job.skip.store(false, Ordering::SeqCst);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        };
        self.worker.engine = Some(engine);
        self.done_steps += cell.steps();
        result
    }

    fn upscale(
        &mut self,
        name: &str,
        image: &DynamicImage,
        factor: f32,
    ) -> Result<DynamicImage, JobError> {
        let models = self.worker.state.config.post.clone();
        Ok(self.worker.post.upscale(&models, name, image, factor)?)
    }
}

impl Worker {
    /// Runs a script job: the cells, then its images and A1111's lists in the job's info.
    pub(super) fn run_script(
        &mut self,
        job: &Arc<Job>,
        work: &GenerateWork,
    ) -> Result<(), JobError> {
        let Some(script) = &work.script else {
            return Err("not a script job".into());
        };
        let request = self.with_control(work)?;
        if let Some(mut engine) = self.engine.take() {
            self.pick_up_files(&mut engine);
            self.engine = Some(engine);
        }
        let base = Cell {
            request,
            hires: work.hires.clone(),
            checkpoint: None,
        };
        let before = self.state.model.status().selection;
        let output = script.run(
            &base,
            work.n_iter,
            &mut JobCells {
                worker: self,
                job,
                work,
                done_steps: 0,
            },
            &mut sdkube_pipeline::random_seed,
        );
        // A checkpoint axis leaves the model served before it, as A1111 restores its
        // override_settings afterwards.
        if self.state.model.status().selection != before {
            let served = (before != self.state.config.model).then_some(before.as_str());
            if let Err(e) = self.ensure_model(served) {
                tracing::warn!(error = %e.message, "the model before the script could not be restored");
            }
        }
        let output = output?;
        for w in &work.warnings {
            tracing::warn!(job = %job.id, warning = %w, "job runs differently than asked");
        }
        if job.should_stop() && !matches!(script, Script::Xyz(_) | Script::PromptMatrix(_)) {
            return Ok(());
        }
        for image in &output.images {
            let infotext = image.infotext.to_string();
            let png = encode_png(&image.image, Some(&infotext)).map_err(|e| e.to_string())?;
            self.keep(job, png, Some(image.seed), infotext, work.save, image.grid)?;
        }
        job.update(|s| {
            s.info = serde_json::json!({
                "warnings": work.warnings,
                "script": {
                    "all_prompts": output.all_prompts,
                    "all_negative_prompts": output.all_negative_prompts,
                    "all_seeds": output.all_seeds,
                    "index_of_first_image": output.index_of_first_image,
                },
            })
        });
        Ok(())
    }
}
