"""A CPU-sized transformer for shapes captions (BPE over 400, 24 positions) and 8x8 codes over 512
from dvae_shapes.py; the base of the demos' transformers (transformer_shapes.py, _emoji32.py).

  python experiments/train_transformer.py --config=experiments/configs/transformer_small.py \
      --workdir=runs/transformer --config.data.codes_dir=runs/codes \
      --config.data.eval_codes_dir=runs/codes_heldout --config.data.tokenizer_dir=runs/tokenizer

Expected (2 CPU cores, malloc on huge pages, on the codes of a 1,500-step dvae_shapes.py run):
1,500 steps in about 6 minutes, image-token loss 0.714 train and 0.700 held-out (the codes'
unigram entropy: 3.12 nats).
"""

import ml_collections

from dalle_jax import sharding
from dalle_jax.train import launch
from dalle_jax.transformer import training as transformer_training


def get_config():
  config = ml_collections.ConfigDict()
  # conv_kernel 5 on an 8x8 grid: the paper's 11 would span more than the image.
  config.model = dict(text_vocab_size=400, text_len=24, image_vocab_size=512, image_size=8,
                      width=256, depth=4, heads=4, head_dim=64, conv_kernel=5,
                      dtype="float32", remat=False, dropout=0.0, attention="dense",
                      layer_kinds=None, text_loss_weight=1 / 8)  # None: the paper's masks
  config.train = launch.config_section(
      transformer_training.TransformerTrainConfig, batch_size=32, num_steps=1_500,
      learning_rate=1e-3, warmup_steps=200, final_learning_rate=1e-5, ema_decay=0.99,
      caption_dropout=0.1)  # empty captions, for classifier-free guidance
  # codes_dir: encode_dataset.py's shards; tokenizer_dir: train_tokenizer.py's; dvae_workdir:
  # the train_dvae.py run that encoded them (to decode sample grids).
  config.data = dict(codes_dir="", eval_codes_dir="", tokenizer_dir="", dvae_workdir="",
                     eval_batches=8)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = sharding.TRANSFORMER_RULES  # FSDP over embed, Megatron over heads
  config.log_every = 25
  config.eval_every = 500
  config.sample_every = 500  # needs data.dvae_workdir
  config.sample_captions = ()  # default: the first 8 evaluation captions
  config.checkpoint_every = 250
  config.keep_checkpoints = 3
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
