"""The benchmark geometry: text 64 over 4,096, 16x16 codes over 1,024, width 256, depth 4.

  python experiments/bench_train.py --config=experiments/configs/transformer_bench_small.py \
      --hugepages                                  # the train step at batch 8
  python experiments/bench_sample.py               # the cached sampler at batch 8 (this config)

Expected (2-core AMD EPYC with AVX-512, quiet; BENCHMARKS.md): the train step 10,247 tokens/s on
huge pages (52.8% of the float32 matmul peak), 7,609 plain; sampling 2,813 image tokens/s through
the dense decode step, 4,432 through the block-sparse one.
"""

import ml_collections

from dalle_jax import sharding
from dalle_jax.train import launch
from dalle_jax.transformer import training as transformer_training


def get_config():
  config = ml_collections.ConfigDict()
  # 4,096 ids in all: the 64 text positions' pad ids follow the BPE pieces.
  config.model = dict(text_vocab_size=4096 - 64, text_len=64, image_vocab_size=1024,
                      image_size=16, width=256, depth=4, heads=4, head_dim=64, conv_kernel=11,
                      dtype="float32", remat=False, dropout=0.0, attention="dense")
  config.train = launch.config_section(
      transformer_training.TransformerTrainConfig, batch_size=8, num_steps=1_000,
      learning_rate=4.5e-4, warmup_steps=100, final_learning_rate=4.5e-6, ema_decay=0.99)
  config.data = dict(codes_dir="", eval_codes_dir="", tokenizer_dir="", dvae_workdir="",
                     eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = sharding.TRANSFORMER_RULES  # FSDP over embed, Megatron over heads
  config.log_every = 25
  config.eval_every = 500
  config.sample_every = 500  # needs data.dvae_workdir
  config.sample_captions = ()  # default: the first 8 evaluation captions
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
