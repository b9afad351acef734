//! Prompts, samplers and the txt2img/img2img/inpainting pipeline.
