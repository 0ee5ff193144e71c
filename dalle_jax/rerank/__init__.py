"""The contrastive reranker that picks the best samples (model, training)."""
