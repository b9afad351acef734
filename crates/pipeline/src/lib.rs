//! Prompts, samplers and the txt2img/img2img/inpainting pipeline.

pub mod prompt;
pub mod sampler;
pub mod tokenizer;
