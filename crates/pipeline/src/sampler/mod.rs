//! Samplers with AUTOMATIC1111 names, in the k-diffusion (sigma) formulation.
