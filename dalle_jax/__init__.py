"""dalle_jax: OpenAI's DALL-E in JAX/Flax.

Files in the order a caption flows through them: `data/` and `tokenizer.py` (captions and images in),
then the dVAE, the masks, the transformer, the train step, the sampler and evaluation.
"""

__version__ = "0.1.0"
