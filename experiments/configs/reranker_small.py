"""A shapes reranker: a CLIP-style pair of small ViT and text encoders on 64x64 shapes.

  python experiments/train_reranker.py --config=experiments/configs/reranker_small.py \
      --workdir=runs/reranker --config.data.tokenizer_dir=runs/tokenizer

Use the shapes demo's tokenizer (400 pieces, text_len 24, as transformer_small.py). Expected (2
CPU cores, malloc on huge pages): 600 steps in about a minute, held-out top-1 0.55; at 2,400 steps
0.80 (caption -> image retrieval within held-out batches of 64, chance 1/64). The shapes demo does
not train it: caption contrast (--near_misses=shapes) picks the right shape among one caption's
candidates more often (docs/evaluation.md).
"""

import ml_collections

from dalle_jax.rerank import training as rerank_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  # 16-pixel patches (4x4 tokens) train several times faster than 8-pixel ones and learn colour,
  # size, shape and position as well in a short run.
  config.model = dict(resolution=64, patch_size=16, image_width=96, image_depth=2, image_heads=4,
                      text_vocab_size=400, text_len=24, text_width=96, text_depth=2, text_heads=4,
                      embed_dim=96)
  config.train = launch.config_section(
      rerank_training.RerankerTrainConfig, batch_size=64, num_steps=600, learning_rate=2e-3,
      warmup_steps=100, final_learning_rate=1e-5, ema_decay=0.98)
  # bpe_dropout: the tokenizer's, on training captions.
  config.data = dict(dataset="shapes", path="", split="train", crop="center",
                     num_examples=200_000, num_workers=0, tokenizer_dir="", bpe_dropout=True,
                     eval_split="heldout", eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 25
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
