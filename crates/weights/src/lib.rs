//! Reading weight files: safetensors and tensor-only pickle checkpoints.
