"""The smallest transformer that exercises every code path: for tests and smoke runs.

  python experiments/train_transformer.py --config=experiments/configs/transformer_tiny.py \
      --workdir=/tmp/transformer_tiny --config.data.codes_dir=... --config.data.tokenizer_dir=...

Expected: 8 steps in seconds after compiling; the figures mean nothing. The tests run it on
shapes captions with 4x4 codes over 32 (tests/conftest.py's make_stage2_data) to check logging,
checkpoints, resuming, sharding and multi-host runs (tests/experiments/test_train_transformer.py).
"""

import ml_collections

from dalle_jax import sharding
from dalle_jax.train import launch
from dalle_jax.transformer import training as transformer_training


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(text_vocab_size=320, text_len=16, image_vocab_size=32, image_size=4,
                      width=32, depth=4, heads=4, head_dim=8, conv_kernel=3, dtype="float32",
                      remat=False, dropout=0.0, attention="dense")
  config.train = launch.config_section(
      transformer_training.TransformerTrainConfig, batch_size=8, num_steps=8, learning_rate=1e-3,
      warmup_steps=2, final_learning_rate=1e-4, ema_decay=0.9, caption_dropout=0.1)
  # codes_dir: encode_dataset.py's shards; tokenizer_dir: train_tokenizer.py's; dvae_workdir:
  # the train_dvae.py run that encoded them (to decode sample grids).
  config.data = dict(codes_dir="", eval_codes_dir="", tokenizer_dir="", dvae_workdir="",
                     eval_batches=1)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = sharding.TRANSFORMER_RULES  # FSDP over embed, Megatron over heads
  config.log_every = 1
  config.eval_every = 4
  config.sample_every = 4  # needs data.dvae_workdir
  config.sample_captions = ()  # default: the first 8 evaluation captions
  config.checkpoint_every = 2
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
