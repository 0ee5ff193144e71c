"""Stage 1: the discrete VAE (model, objective, training, evaluation, OpenAI's weights)."""
