//! One worker thread per device: loads the selected model, takes jobs from the board
//! (batching compatible txt2img jobs into one device batch), runs them off the async
//! runtime, and reports progress, previews and results through each job.

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device};
use image::DynamicImage;
use sdkube_pipeline::embeddings::{EmbeddingSet, TextWidths};
use sdkube_pipeline::image_io::encode_png;
use sdkube_pipeline::sampler::{Flow, SamplerError};
use sdkube_pipeline::{Engine, Generated, HiresError, Infotext, Request, VramMode};
use sdkube_preprocess::Annotators;

use crate::a1111::loras;
use crate::job::{Failure, Job, JobImage, JobState};
use crate::model::{ModelSlot, Outcome, Wanted};
use crate::post::PostCache;
use crate::queue::BatchRule;
use crate::requests::controlnet;
use crate::state::{device_label, AppState};
use crate::work::{ExtrasWork, GenerateWork, UpscaleTarget, Work};

mod scripts;

/// How often a running job's preview is refreshed at most.
const PREVIEW_INTERVAL: Duration = Duration::from_millis(300);

pub struct Worker {
    pub device: Device,
    pub dtype: DType,
    pub vram: VramMode,
    /// `host/pid/device`: recorded in the jobs it runs.
    name: String,
    state: AppState,
    engine: Option<Engine>,
    generation: u64,
    post: PostCache,
    /// Networks of the ControlNet preprocessors, loaded when a unit first needs them.
    annotators: Annotators,
}

impl Worker {
    pub fn new(state: AppState, device: Device, dtype: DType, vram: VramMode) -> Self {
        Self {
            name: format!("{}/{}", state.process_id, device_label(&device)),
            post: PostCache::new(device.clone()),
            device,
            dtype,
            vram,
            state,
            engine: None,
            generation: 0,
            annotators: Annotators::default(),
        }
    }

    /// Runs until the queue shuts down in this process.
    pub fn run(mut self) {
        loop {
            self.follow_model();
            let taken = {
                let state = self.state.clone();
                let ctx = state.build_context();
                let engine = self.engine.as_ref();
                let batchable = |a: &Job, b: &Job| {
                    a.meta.model == b.meta.model
                        && match (a.work(&ctx), b.work(&ctx), engine) {
                            (Ok(wa @ Work::Generate(x)), Ok(wb @ Work::Generate(y)), Some(e)) => {
                                wa.batchable(wb) && e.can_batch(&x.request, &y.request)
                            }
                            _ => false,
                        }
                };
                let images_of = |j: &Job| j.work(&ctx).map_or(1, |w| w.batch_images());
                let rule = BatchRule {
                    batchable: &batchable,
                    images_of: &images_of,
                    max_images: state.config.limits.max_batch,
                };
                state.runtime.block_on(state.queue.take(
                    &self.name,
                    &rule,
                    Duration::from_millis(500),
                ))
            };
            match taken {
                Ok(jobs) if !jobs.is_empty() => self.run_jobs(&jobs),
                Ok(_) if self.state.queue.is_shutting_down() => return,
                Ok(_) => {}
                Err(e) => {
                    if self.state.queue.is_shutting_down() {
                        return;
                    }
                    tracing::warn!(error = %e, "cannot take jobs; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Loads the model the slot wants when it is not the one loaded here: a new selection,
    /// or, after a switch failed, the served model again.
    fn follow_model(&mut self) {
        let Some(want) = self.state.model.wanted() else {
            return;
        };
        if want.generation == self.generation {
            return;
        }
        let started = Instant::now();
        // The weights are read first, while the loaded model still serves: a file that cannot
        // be read leaves it in place. With none loaded (a start), the networks kept on the GPU
        // are read straight onto it.
        let opts = sdkube_models::LoadOptions {
            device: self
                .vram
                .read_onto(&self.device)
                .filter(|_| self.engine.is_none()),
            config_dir: self.state.config.config_dir_for(&want.path),
            ..Default::default()
        };
        let weights = match sdkube_models::load(&want.path, &opts) {
            Ok(w) => w,
            Err(e) => return self.load_failed(&want, &without_backtrace(&e.to_string())),
        };
        // The old networks leave the device before the new ones are built.
        self.engine = None;
        self.generation = 0;
        let built = Engine::new(
            weights,
            &want.name,
            self.device.clone(),
            self.dtype,
            self.vram,
        );
        match built {
            Ok(mut engine) => {
                engine.limits = self.state.config.limits;
                let widths = TextWidths::of(engine.weights());
                match EmbeddingSet::load_dir(&self.state.config.embeddings, widths) {
                    Ok(set) => engine.set_embeddings(set),
                    Err(e) => tracing::warn!(error = %e, "embeddings folder unreadable"),
                }
                engine.set_loras(loras::library(
                    &self.state.config.lora_dirs,
                    &self.state.config.sources,
                ));
                *crate::lock(&self.state.text_widths) = Some(widths);
                tracing::info!(
                    model = %want.name,
                    family = engine.family().name(),
                    device = ?self.device,
                    seconds = started.elapsed().as_secs_f64(),
                    "model loaded"
                );
                let warm_up = self.warm_up(&mut engine, &want);
                self.generation = want.generation;
                self.state
                    .model
                    .loaded(want.generation, engine.family().name(), warm_up);
                self.engine = Some(engine);
            }
            // The next call loads the served model again.
            Err(e) => self.load_failed(&want, &without_backtrace(&e.to_string())),
        }
    }

    /// The engine's warm-up generation, when configured: seconds it took. A failed warm-up
    /// leaves the model serving (the first request then meets the same problem and reports
    /// it).
    fn warm_up(&self, engine: &mut Engine, want: &Wanted) -> Option<f64> {
        if !self.state.config.warm_up {
            return None;
        }
        let device = device_label(&self.device);
        self.state
            .model
            .doing(want.generation, format!("warming up on {device}"));
        let started = Instant::now();
        let result = engine.warm_up();
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => tracing::info!(model = %want.name, %device, seconds, "warmed up"),
            Err(e) => tracing::warn!(model = %want.name, %device, error = %e, "warm-up failed"),
        }
        Some(seconds)
    }

    fn load_failed(&self, want: &Wanted, error: &str) {
        tracing::error!(model = %want.name, error = %error, "model failed to load");
        self.state.metrics.error("model_load");
        self.state.model.failed(
            want.generation,
            format!("loading {} failed: {error}", want.name),
        );
    }

    /// Makes the checkpoint a job asks for the loaded one: a client's selection (by title
    /// or name), else this server's `--model`. Waits for a fetch and the load; when the
    /// switch fails, the job fails and the served model stays.
    fn ensure_model(&mut self, wanted: Option<&str>) -> Result<(), JobError> {
        let default = self.state.config.model.clone();
        let (selection, allow_path) = match wanted {
            Some(name) => (name, false),
            None => (default.as_str(), true),
        };
        let select = |slot: &Arc<ModelSlot>| {
            slot.select(selection, allow_path)
                .map_err(|message| JobError {
                    kind: Failure::BadRequest,
                    message,
                })
        };
        let mut generation = select(&self.state.model)?;
        loop {
            self.follow_model();
            match self.state.model.outcome(generation) {
                Outcome::Serving if self.generation == generation => return Ok(()),
                Outcome::Failed(message) => {
                    return Err(JobError {
                        kind: Failure::Unavailable,
                        message,
                    })
                }
                // Loaded here, waiting for this process's other devices.
                Outcome::Pending if self.generation == generation => return Ok(()),
                // Another job's checkpoint came first: ask for this one again.
                Outcome::Replaced => generation = select(&self.state.model)?,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn run_jobs(&mut self, jobs: &[Arc<Job>]) {
        let model = self.ensure_model(jobs[0].meta.model.as_deref());
        let state = self.state.clone();
        let ctx = state.build_context();
        let mut generate: Vec<(&Arc<Job>, &GenerateWork)> = Vec::new();
        let mut other = Vec::new();
        for j in jobs {
            if let Err(e) = &model {
                self.finish(j, Err(e.clone()));
                continue;
            }
            match j.work(&ctx) {
                Ok(work) => {
                    let name = self.state.model.status().name;
                    j.update(|s| {
                        s.total_steps = work.total_steps();
                        s.model = Some(name);
                    });
                    match work {
                        Work::Generate(g) if g.script.is_none() => generate.push((j, g)),
                        w => other.push((j, w)),
                    }
                }
                Err(e) => self.finish(
                    j,
                    Err(JobError {
                        kind: Failure::BadRequest,
                        message: e.message.clone(),
                    }),
                ),
            }
        }
        if !generate.is_empty() {
            self.run_generate(&generate);
        }
        for (j, work) in other {
            let result = match work {
                Work::Generate(g) => self.run_script(j, g),
                Work::Extras(e) => self.run_extras(j, e),
                Work::CreateEmbedding(c) => self.create_embedding(j, c),
                Work::TrainEmbedding(t) => self.train_embedding(j, t),
            };
            self.finish(j, result);
        }
    }

    fn finish(&self, job: &Arc<Job>, result: Result<(), JobError>) {
        let cancelled = job.cancel.load(Ordering::SeqCst);
        let queue = &self.state.queue;
        if job.release.load(Ordering::SeqCst) && !cancelled {
            // The process is stopping: another worker runs the job from the start.
            tracing::info!(job = %job.id, "handing the job back to the queue");
            job.update(|s| {
                s.images.clear();
                s.step = 0;
            });
            if let Err(e) = self
                .state
                .runtime
                .block_on(queue.release(std::slice::from_ref(job)))
            {
                tracing::warn!(job = %job.id, error = %e, "could not hand the job back");
            }
            return;
        }
        if let Err(e) = &result {
            if !cancelled {
                self.state.metrics.error("job");
                tracing::warn!(job = %job.id, error = %e.message, "job failed");
            }
        }
        // Metrics first: whoever sees the job finished also sees it counted.
        let outcome = match (&result, cancelled) {
            (_, true) => JobState::Cancelled,
            (Ok(()), false) => JobState::Succeeded,
            (Err(_), false) => JobState::Failed,
        };
        let m = &self.state.metrics;
        m.job_finished(&job.meta.kind, outcome.label());
        if let Some(elapsed) = job.status().started.and_then(|t| t.elapsed().ok()) {
            m.job_seconds.observe(elapsed.as_secs_f64());
        }
        job.complete(|s| match result {
            Ok(()) if cancelled => {
                s.state = JobState::Cancelled;
                s.interrupted = true;
            }
            Ok(()) => {
                s.state = JobState::Succeeded;
                s.step = s.total_steps.max(s.step);
            }
            Err(_) if cancelled => {
                s.state = JobState::Cancelled;
                s.interrupted = true;
                s.error = Some("cancelled".into());
            }
            Err(e) => {
                s.state = JobState::Failed;
                s.failure = e.kind;
                s.error = Some(e.message);
            }
        });
        if let Err(e) = self.state.runtime.block_on(queue.finish(job)) {
            tracing::warn!(job = %job.id, error = %e, "could not record the job's end");
        }
    }

    /// The job's request with its ControlNet units preprocessed.
    fn with_control(&mut self, work: &GenerateWork) -> Result<Request, JobError> {
        let modules = work.control.iter().map(|c| c.module.as_str());
        controlnet::load_annotators(
            &self.state.config.post.store,
            modules,
            &self.device,
            &mut self.annotators,
        )?;
        let control = work
            .control
            .iter()
            .map(|c| c.detect(&self.annotators))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Request {
            control,
            ..work.request.clone()
        })
    }

    /// Embeddings, LoRAs and ControlNets added or changed since the last job (in the folders
    /// or fetched into the store) are picked up before each job; LoRA and ControlNet tensors
    /// are read when a job first names them.
    pub(super) fn pick_up_files(&self, engine: &mut Engine) {
        if let Err(e) = engine.reload_embeddings() {
            tracing::warn!(error = %e, "embeddings folder unreadable");
        }
        engine.set_loras(loras::library(
            &self.state.config.lora_dirs,
            &self.state.config.sources,
        ));
        engine.set_controlnets(controlnet::library(
            &self.state.config.controlnet_dirs,
            &self.state.config.sources,
        ));
    }

    /// The requests with their refiner (they share one: jobs naming different refiners are not
    /// batched) loaded beside `engine` and named as loaded. The refiner stays loaded for the
    /// next jobs that name it, and leaves with the model. A refiner that is the model itself
    /// has nothing to do (A1111 skips it too).
    pub(super) fn with_refiner(
        &self,
        engine: &mut Engine,
        mut requests: Vec<Request>,
    ) -> Result<Vec<Request>, JobError> {
        let Some(wanted) = requests.first().and_then(|r| r.refiner.clone()) else {
            return Ok(requests);
        };
        let bad = |message: String| JobError {
            kind: Failure::BadRequest,
            message,
        };
        let info = self.state.model.find(&wanted.checkpoint).ok_or_else(|| {
            bad(format!(
                "refiner_checkpoint {:?} is not a checkpoint this server knows \
                 (see /sdapi/v1/sd-models)",
                wanted.checkpoint
            ))
        })?;
        let Some(path) = info.path.filter(|_| info.present) else {
            return Err(bad(format!(
                "refiner_checkpoint {:?} is not in the model store yet: select it once as the \
                 model, or `sdkube fetch {}`",
                wanted.checkpoint, info.name
            )));
        };
        let same_as_model = info.name == engine.model_name();
        let loaded = engine.refiner().map(|r| r.model_name().to_string());
        if !same_as_model && loaded.as_deref() != Some(info.name.as_str()) {
            let started = Instant::now();
            // The old refiner leaves the device before the new one is built.
            engine.set_refiner(None)?;
            let opts = sdkube_models::LoadOptions {
                device: self.vram.read_onto(&self.device),
                ..Default::default()
            };
            let weights = sdkube_models::load(&path, &opts).map_err(|e| {
                bad(format!(
                    "loading the refiner: {}",
                    without_backtrace(&e.to_string())
                ))
            })?;
            let mut refiner = Engine::new(
                weights,
                &info.name,
                self.device.clone(),
                self.dtype,
                self.vram,
            )?;
            refiner.limits = engine.limits;
            engine
                .set_refiner(Some(refiner))
                .map_err(|e| bad(e.to_string()))?;
            tracing::info!(
                refiner = %info.name,
                seconds = started.elapsed().as_secs_f64(),
                "refiner loaded"
            );
        }
        for r in &mut requests {
            r.refiner = match same_as_model {
                true => None,
                false => r.refiner.take().map(|w| sdkube_pipeline::Refiner {
                    checkpoint: info.name.clone(),
                    ..w
                }),
            };
        }
        Ok(requests)
    }

    /// Generation jobs taken together: one device batch per iteration.
    fn run_generate(&mut self, jobs: &[(&Arc<Job>, &GenerateWork)]) {
        let requests = match jobs
            .iter()
            .map(|(_, g)| self.with_control(g))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(r) => r,
            Err(e) => {
                for (j, _) in jobs {
                    self.finish(j, Err(e.clone()));
                }
                return;
            }
        };
        let Some(mut engine) = self.engine.take() else {
            let why = self
                .state
                .model
                .status()
                .message
                .unwrap_or_else(|| "no model is loaded".into());
            for (j, _) in jobs {
                self.finish(
                    j,
                    Err(JobError {
                        kind: Failure::Unavailable,
                        message: format!("the model is not ready: {why}"),
                    }),
                );
            }
            return;
        };
        let requests = match self.with_refiner(&mut engine, requests) {
            Ok(r) => r,
            Err(e) => {
                self.engine = Some(engine);
                for (j, _) in jobs {
                    self.finish(j, Err(e.clone()));
                }
                return;
            }
        };
        self.pick_up_files(&mut engine);
        let n_iter = jobs.iter().map(|(_, g)| g.n_iter).max().unwrap_or(1);
        let mut failed: Option<JobError> = None;
        for iter in 0..n_iter {
            if jobs.iter().all(|(j, _)| j.should_stop()) {
                break;
            }
            let reqs: Vec<Request> = requests.iter().map(|r| r.iteration(iter)).collect();
            let mut last_step = Instant::now();
            let mut last_preview: Option<Instant> = None;
            let metrics = &self.state.metrics;
            let mut on_step = |p: &sdkube_pipeline::Progress| {
                let now = Instant::now();
                if p.step > 0 {
                    metrics
                        .step_seconds
                        .observe(now.duration_since(last_step).as_secs_f64());
                }
                last_step = now;
                let fresh = match last_preview {
                    Some(t) if now.duration_since(t) < PREVIEW_INTERVAL => false,
                    _ => {
                        last_preview = Some(now);
                        true
                    }
                };
                let mut all_stopped = true;
                let mut first_image = 0;
                for (j, g) in jobs {
                    // Each job previews its own first image of the shared batch.
                    let preview = fresh
                        .then(|| p.preview_of(first_image).ok())
                        .flatten()
                        .and_then(|img| png_data_url(&img));
                    first_image += g.request.batch_size;
                    let per_iter = j.status().total_steps / g.n_iter.max(1);
                    j.update(|s| {
                        s.step = iter * per_iter + p.step + 1;
                        s.total_steps = s.total_steps.max(s.step);
                        if preview.is_some() {
                            s.preview = preview.clone();
                        }
                    });
                    let stop = j.should_stop() || j.skip.load(Ordering::SeqCst);
                    all_stopped &= stop;
                }
                if all_stopped {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            };
            let result = engine.generate_batch(&reqs, &mut on_step);
            match result {
                Ok(per_job) => {
                    for (((j, g), request), images) in jobs.iter().zip(&requests).zip(per_job) {
                        if j.should_stop() {
                            continue;
                        }
                        if let Err(e) = self.keep_images(&mut engine, j, g, request, images) {
                            failed = Some(e);
                        }
                    }
                }
                Err(sdkube_pipeline::Error::Sampler(SamplerError::Interrupted { .. })) => {
                    // A1111's skip ends this iteration only.
                    for (j, _) in jobs {
                        j.skip.store(false, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    failed = Some(e.into());
                    break;
                }
            }
            if failed.is_some() {
                break;
            }
        }
        self.engine = Some(engine);
        for ((j, g), request) in jobs.iter().zip(&requests) {
            if failed.is_none() && !j.should_stop() {
                self.keep_detected_maps(j, g, request);
            }
            if !g.warnings.is_empty() {
                for w in &g.warnings {
                    tracing::warn!(job = %j.id, warning = %w, "job runs differently than asked");
                }
                j.update(|s| s.info = serde_json::json!({"warnings": g.warnings}));
            }
            self.finish(j, failed.clone().map_or(Ok(()), Err));
        }
    }

    /// Hires fix and face restoration on a job's new images, then PNG (and the outputs
    /// folder when asked).
    fn keep_images(
        &mut self,
        engine: &mut Engine,
        job: &Arc<Job>,
        work: &GenerateWork,
        request: &Request,
        images: Vec<Generated>,
    ) -> Result<(), JobError> {
        for g in images {
            let (image, parameters, seed) = self.post_process(
                engine,
                job,
                work.hires.as_ref(),
                work.restore_faces,
                request,
                g,
            )?;
            let infotext = parameters.to_string();
            let png = encode_png(&image.to_rgb8(), Some(&infotext)).map_err(|e| e.to_string())?;
            self.keep(job, png, Some(seed), infotext, work.save, false)?;
        }
        Ok(())
    }

    /// One new image's hires fix and face restoration (the job's, or a script cell's).
    fn post_process(
        &mut self,
        engine: &mut Engine,
        job: &Arc<Job>,
        hires: Option<&sdkube_pipeline::HiresFix>,
        restore_faces: bool,
        request: &Request,
        g: Generated,
    ) -> Result<(DynamicImage, Infotext, u64), JobError> {
        let g = match hires {
            Some(h) => {
                let (post, models) = (&mut self.post, &self.state.config.post);
                let mut upscale = |name: &str, image: &DynamicImage, factor: f32| {
                    post.upscale(models, name, image, factor)
                };
                let mut on_step = |_: &sdkube_pipeline::Progress| match job.should_stop() {
                    true => Flow::Stop,
                    false => Flow::Continue,
                };
                engine
                    .hires_fix(request, &g, h, &mut upscale, &mut on_step)
                    .map_err(|e| match e {
                        HiresError::Upscale(e) => JobError::from(e),
                        HiresError::Generate(e) => format!("hires fix: {e}").into(),
                    })?
            }
            None => g,
        };
        let mut image = DynamicImage::ImageRgb8(g.image);
        let mut parameters = g.parameters;
        if restore_faces {
            image = self
                .post
                .restore_faces(&self.state.config.post, &image, 1.0)?;
            parameters.insert_after("Seed", "Face restoration", "GFPGAN");
        }
        Ok((image, parameters, g.seed))
    }

    /// The units' detected maps after a job's images, at the size the last pass used, as the
    /// extension appends them (not saved into the gallery, no seed or infotext).
    fn keep_detected_maps(&self, job: &Arc<Job>, work: &GenerateWork, request: &Request) {
        let (w, h) = match &work.hires {
            Some(h) => (h.width, h.height),
            None => (request.width, request.height),
        };
        for (c, unit) in work.control.iter().zip(&request.control) {
            if !c.keep_map {
                continue;
            }
            let map = unit.fitted(w as u32, h as u32);
            match encode_png(&map, None) {
                Ok(png) => job.update(|s| {
                    s.images.push(JobImage {
                        name: None,
                        url: None,
                        seed: None,
                        infotext: String::new(),
                        grid: false,
                        png,
                    })
                }),
                Err(e) => tracing::warn!(job = %job.id, error = %e, "detected map not kept"),
            }
        }
    }

    /// Keeps one finished image with the job (and in the gallery when `save`); `grid`: it is
    /// a script's grid.
    fn keep(
        &self,
        job: &Arc<Job>,
        png: Vec<u8>,
        seed: Option<u64>,
        infotext: String,
        save: bool,
        grid: bool,
    ) -> Result<(), JobError> {
        let gallery = &self.state.gallery;
        let name = if save {
            let saved = self.state.runtime.block_on(gallery.save(png.clone(), seed));
            Some(saved.map_err(|e| format!("saving into {}: {e}", gallery.location()))?)
        } else {
            None
        };
        self.state
            .metrics
            .images_generated
            .fetch_add(1, Ordering::Relaxed);
        job.update(|s| {
            s.images.push(JobImage {
                url: name.as_ref().map(|n| format!("/outputs/{n}")),
                name,
                seed,
                infotext,
                grid,
                png,
            })
        });
        Ok(())
    }

    fn run_extras(&mut self, job: &Arc<Job>, work: &ExtrasWork) -> Result<(), JobError> {
        let post = self.state.config.post.clone();
        for (i, (name, image)) in work.images.iter().enumerate() {
            if job.should_stop() {
                return Ok(());
            }
            let mut img = image.clone();
            let mut info = Infotext::default();
            let restore = |cache: &mut PostCache, img: &DynamicImage| {
                cache.restore_faces(&post, img, work.gfpgan_visibility)
            };
            if work.gfpgan_visibility > 0.0 && !work.upscale_first {
                img = restore(&mut self.post, &img)?;
            }
            let spec = &work.upscale;
            let (factor, exact) = match spec.target {
                UpscaleTarget::Factor(f) => (f, None),
                UpscaleTarget::Size {
                    width,
                    height,
                    crop,
                } => {
                    let fw = width as f32 / img.width() as f32;
                    let fh = height as f32 / img.height() as f32;
                    (
                        if crop { fw.max(fh) } else { fw.min(fh) },
                        Some((width, height, crop)),
                    )
                }
            };
            if !spec.upscaler_1.eq_ignore_ascii_case("None") && factor != 1.0 {
                let mut up = self.post.upscale(&post, &spec.upscaler_1, &img, factor)?;
                if !spec.upscaler_2.eq_ignore_ascii_case("None") && spec.upscaler_2_visibility > 0.0
                {
                    let up2 = self.post.upscale(&post, &spec.upscaler_2, &img, factor)?;
                    up = blend(&up, &up2, spec.upscaler_2_visibility);
                }
                img = up;
                info.push("Postprocess upscale by", factor);
                info.push("Postprocess upscaler", &spec.upscaler_1);
                if let Some((w, h, crop)) = exact {
                    img = if crop {
                        img.resize_to_fill(w, h, image::imageops::FilterType::Lanczos3)
                    } else {
                        img
                    };
                }
            }
            if work.gfpgan_visibility > 0.0 && work.upscale_first {
                img = restore(&mut self.post, &img)?;
            }
            if work.gfpgan_visibility > 0.0 {
                info.push("GFPGAN visibility", work.gfpgan_visibility);
            }
            let infotext = info.fields_line();
            let png = encode_png(&img.to_rgb8(), (!infotext.is_empty()).then_some(&infotext))
                .map_err(|e| format!("{name}: {e}"))?;
            self.keep(job, png, None, infotext, work.save, false)?;
            job.update(|s| s.step = i + 1);
        }
        Ok(())
    }
}

impl Worker {
    fn create_embedding(
        &mut self,
        job: &Arc<Job>,
        c: &crate::work::CreateEmbeddingWork,
    ) -> Result<(), JobError> {
        let engine = self.engine.as_ref().ok_or("no model is loaded")?;
        sdkube_pipeline::train::create_embedding(
            engine.weights(),
            &c.name,
            &c.init_text,
            c.vectors,
            &c.out,
            c.overwrite,
        )?;
        job.update(|s| s.info = serde_json::json!({"path": c.out.display().to_string()}));
        Ok(())
    }

    fn train_embedding(
        &mut self,
        job: &Arc<Job>,
        opts: &sdkube_pipeline::train::TrainOptions,
    ) -> Result<(), JobError> {
        let engine = self.engine.as_ref().ok_or("no model is loaded")?;
        let started = Instant::now();
        let outcome = sdkube_pipeline::train::train_embedding(
            engine.weights(),
            &self.device,
            engine.dtype(),
            opts,
            &mut |p| {
                job.update(|s| {
                    s.step = p.step;
                    s.total_steps = p.total;
                    s.info = serde_json::json!({"loss": p.loss, "average_loss": p.average_loss});
                });
                if job.should_stop() {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            },
        )?;
        tracing::info!(
            embedding = %opts.name,
            steps = outcome.step,
            seconds = started.elapsed().as_secs_f64(),
            "trained"
        );
        job.update(|s| {
            s.info = serde_json::json!({
                "path": outcome.path.display().to_string(),
                "step": outcome.step,
                "first_step": outcome.first_step,
                "final_loss": outcome.losses.last(),
                "steps_per_second": outcome.steps_per_second,
                "cancelled": outcome.cancelled,
            })
        });
        Ok(())
    }
}

/// Why a job failed, and whose the failure is.
#[derive(Debug, Clone)]
pub struct JobError {
    kind: Failure,
    message: String,
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        Self {
            kind: Failure::Internal,
            message,
        }
    }
}

impl From<crate::error::ApiError> for JobError {
    fn from(e: crate::error::ApiError) -> Self {
        let kind = match e.status.as_u16() {
            400..=499 => Failure::BadRequest,
            503 => Failure::Unavailable,
            _ => Failure::Internal,
        };
        Self {
            kind,
            message: e.message,
        }
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl From<crate::post::PostError> for JobError {
    fn from(e: crate::post::PostError) -> Self {
        Self {
            kind: match e.is_request_error() {
                true => Failure::BadRequest,
                false => Failure::Internal,
            },
            message: e.to_string(),
        }
    }
}

impl From<sdkube_pipeline::Error> for JobError {
    fn from(e: sdkube_pipeline::Error) -> Self {
        use sdkube_pipeline::Error as E;
        let kind = match &e {
            E::Invalid(_) | E::Image(_) | E::Sampler(_) => Failure::BadRequest,
            E::Load(_) | E::Tensor(_) => Failure::Internal,
        };
        Self {
            kind,
            message: without_backtrace(&e.to_string()),
        }
    }
}

impl From<sdkube_pipeline::train::TrainError> for JobError {
    fn from(e: sdkube_pipeline::train::TrainError) -> Self {
        use sdkube_pipeline::train::TrainError as T;
        let kind = match &e {
            T::Invalid(_) | T::Exists(_) => Failure::BadRequest,
            _ => Failure::Internal,
        };
        Self {
            kind,
            message: without_backtrace(&e.to_string()),
        }
    }
}

/// candle appends a backtrace to some errors (when RUST_BACKTRACE is set); users get the
/// message only.
pub fn without_backtrace(message: &str) -> String {
    match message.find("\n   0: ") {
        Some(i) => message[..i].trim_end().to_string(),
        None => message.to_string(),
    }
}

/// `a·(1−t) + b·t`, per pixel (A1111's "Upscaler 2 visibility").
fn blend(a: &DynamicImage, b: &DynamicImage, t: f32) -> DynamicImage {
    let a = a.to_rgb8();
    let b = image::imageops::resize(
        &b.to_rgb8(),
        a.width(),
        a.height(),
        image::imageops::FilterType::Lanczos3,
    );
    let mut out = a.clone();
    for (o, q) in out.pixels_mut().zip(b.pixels()) {
        for c in 0..3 {
            o.0[c] = (o.0[c] as f32 * (1.0 - t) + q.0[c] as f32 * t).round() as u8;
        }
    }
    DynamicImage::ImageRgb8(out)
}

/// A PNG data URL for previews.
pub fn png_data_url(img: &image::RgbImage) -> Option<String> {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .ok()?;
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}
