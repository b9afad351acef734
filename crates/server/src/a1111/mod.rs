//! AUTOMATIC1111's web UI API (`/sdapi/v1`): same paths, field names, defaults and
//! response shapes, so that existing clients (Open WebUI, webuiapi, bots) work unchanged.
//! Fields sdkube does not act on are accepted and listed in the response's `info`
//! (`sdkube_ignored_fields`), never an error.

pub mod controlnet;
pub mod embeddings;
pub mod generation;
pub mod listings;
pub mod loras;
pub mod options;
pub mod png_info;
pub mod progress;
pub mod settings;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(generation::txt2img))
        .routes(routes!(generation::img2img))
        .routes(routes!(generation::extra_single_image))
        .routes(routes!(generation::extra_batch_images))
        .routes(routes!(png_info::png_info))
        .routes(routes!(progress::progress))
        .routes(routes!(progress::interrupt))
        .routes(routes!(progress::skip))
        .routes(routes!(options::get_options, options::set_options))
        .routes(routes!(options::memory))
        .routes(routes!(options::cmd_flags))
        .routes(routes!(listings::sd_models))
        .routes(routes!(listings::sd_vae))
        .routes(routes!(listings::samplers))
        .routes(routes!(listings::schedulers))
        .routes(routes!(listings::upscalers))
        .routes(routes!(listings::latent_upscale_modes))
        .routes(routes!(listings::face_restorers))
        .routes(routes!(listings::refresh_checkpoints))
        .routes(routes!(listings::prompt_styles))
        .routes(routes!(listings::hypernetworks))
        .routes(routes!(loras::loras))
        .routes(routes!(loras::refresh_loras))
        .routes(routes!(listings::extensions))
        .routes(routes!(listings::scripts))
        .routes(routes!(listings::script_info))
        .routes(routes!(listings::realesrgan_models))
        .routes(routes!(embeddings::embeddings))
        .routes(routes!(embeddings::refresh_embeddings))
        .routes(routes!(embeddings::create_embedding))
        .routes(routes!(embeddings::train_embedding))
        .routes(routes!(controlnet::version))
        .routes(routes!(controlnet::settings))
        .routes(routes!(controlnet::model_list))
        .routes(routes!(controlnet::module_list))
        .routes(routes!(controlnet::detect))
}
