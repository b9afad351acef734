//! Stable Diffusion networks on candle: CLIP text encoders, UNet, VAE.
