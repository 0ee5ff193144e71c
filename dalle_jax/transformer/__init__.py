"""Stage 2: the sparse-attention transformer (masks, attention paths, model, training, sampling)."""
