//! Checkpoint key names shared by the networks' loaders.

use std::collections::HashMap;

use candle_core::Tensor;

/// Drops a checkpoint wrapper prefix (`params_ema.`), preferring the first that is present.
pub(crate) fn strip_prefix(
    tensors: HashMap<String, Tensor>,
    prefixes: &[&str],
) -> HashMap<String, Tensor> {
    for prefix in prefixes {
        if tensors.keys().any(|k| k.starts_with(prefix)) {
            return tensors
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v)))
                .collect();
        }
    }
    tensors
}
