"""The paper's 12B transformer (Appendix B): 64 layers, 62 heads of 64, text 256 over 16,384,
32x32 codes over 8,192, batch 1024, bf16 compute, rematerialised blocks, sharded over a pod.

  python experiments/train_transformer.py --config=experiments/configs/transformer_paper.py \
      --workdir=runs/transformer --config.data.codes_dir=gs://bucket/codes \
      --config.data.tokenizer_dir=runs/tok --coordinator_address=auto --fit_check=v5p:4x4x8

Expected (the fit check, compiled on a CPU host): on 128 v5p chips as fsdp 64 x tensor 2, 18.0 of
95 GiB per chip, at most 599,000 tokens/s (FLOPs at the chips' peak). Not trained here.
"""

import ml_collections

from dalle_jax import sharding
from dalle_jax.train import launch
from dalle_jax.transformer import training as transformer_training


def get_config():
  config = ml_collections.ConfigDict()
  # scan_layers: the 15 repeats of (row, column, row, row) compile once, not 60 times.
  config.model = dict(text_vocab_size=16_384, text_len=256, image_vocab_size=8_192,
                      image_size=32, width=3_968, depth=64, heads=62, head_dim=64,
                      conv_kernel=11, dtype="bfloat16", remat=True, dropout=0.0,
                      attention="block_sparse", scan_layers=True)
  config.train = launch.config_section(
      transformer_training.TransformerTrainConfig, batch_size=1024, num_steps=430_000,
      learning_rate=4.5e-4, warmup_steps=5_000,
      decay="plateau", plateau_patience=5_000,  # the paper halves the rate when the loss stalls
      ema_decay=0.99, caption_dropout=0.0)  # the paper reranks with CLIP, without guidance
  config.data = dict(codes_dir="", eval_codes_dir="", tokenizer_dir="", dvae_workdir="",
                     eval_batches=16)
  # 62 heads split only 2 or 31 ways: FSDP carries most of the split.
  config.mesh = dict(data=-1, fsdp=64, tensor=2)
  config.sharding_rules = sharding.TRANSFORMER_RULES  # FSDP over embed, Megatron over heads
  config.log_every = 100
  config.eval_every = 5_000
  config.sample_every = 5_000  # needs data.dvae_workdir
  config.sample_captions = ()  # default: the first 8 evaluation captions
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
