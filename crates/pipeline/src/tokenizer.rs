//! CLIP BPE tokenizer (vocabulary shipped by a registry package, no hub download).
