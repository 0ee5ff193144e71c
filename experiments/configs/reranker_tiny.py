"""The smallest reranker that exercises every code path: for tests and smoke runs (16x16 shapes).

  python experiments/train_reranker.py --config=experiments/configs/reranker_tiny.py \
      --workdir=/tmp/reranker_tiny --config.data.tokenizer_dir=...

The tokenizer (train_tokenizer.py's output) must have 400 pieces and text_len 16. Expected: 8
steps in seconds after compiling; the figures mean nothing. The tests run it to check training,
resuming and loading (tests/rerank/test_rerank.py).
"""

import ml_collections

from dalle_jax.rerank import training as rerank_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=16, patch_size=4, image_width=32, image_depth=2, image_heads=2,
                      text_vocab_size=400, text_len=16, text_width=32, text_depth=2, text_heads=2,
                      embed_dim=32)
  config.train = launch.config_section(
      rerank_training.RerankerTrainConfig, batch_size=16, num_steps=8, learning_rate=2e-3,
      warmup_steps=2, final_learning_rate=1e-4, ema_decay=0.9)
  # tokenizer_dir: train_tokenizer.py's output; bpe_dropout: the tokenizer's, on training captions.
  config.data = dict(dataset="shapes", path="", split="train", crop="center", num_examples=256,
                     num_workers=0, tokenizer_dir="", bpe_dropout=True, eval_split="heldout",
                     eval_batches=2)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 1
  config.eval_every = 4
  config.checkpoint_every = 2
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
