"""The demo's dVAE on the shapes set: 32x32 images -> 8x8 codes over 512, minutes on 2 cores."""

import ml_collections

from dalle_jax.dvae import training as dvae_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=32, group_count=3, n_hid=64, n_blk_per_group=1, n_init=64,
                      vocab_size=512, dtype="float32")
  # Not the paper's optimisation: ~88% of these pixels are flat background, where the
  # logit-Laplace scale b shrinks without bound (1/b ~300 there against ~3 on objects), so the
  # loss and its gradient become nearly all background and the decoder paints average colours.
  # A floor on ln b (min_log_scale) bounds that weight; beta 2.5 from the first step and a held
  # learning rate (after a 100-step warm-up, without which short runs collapse onto one code)
  # then keep the objects' colours. Tau anneals 1 -> 1/4 over the run: down to the paper's 1/16
  # the codes used collapse in the last few hundred steps (perplexity 31 -> 9).
  # Shape is what a short run loses (small stars stay blobs), and a floor lower than -2 merges
  # objects. The decoder, trained on Gumbel samples only, draws small stars as blobs even from
  # codes that differ from a small diamond's: the last 30% of the steps fit it to the argmax
  # codes alone (encoder frozen), as it decodes them at sampling time. Measured effects of each
  # choice: BENCHMARKS.md and git history.
  config.train = launch.config_section(
      dvae_training.DVAETrainConfig, batch_size=32, num_steps=1_500, learning_rate=2e-3,
      final_learning_rate=2e-3, lr_decay_steps=150_000, schedule_scale=0.01, beta=2.5,
      beta_warmup_steps=0, min_log_scale=-2.0, tau_end=0.25, ema_decay=0.98, lr_warmup_steps=100,
      decoder_finetune_fraction=0.3)
  config.data = dict(dataset="shapes", path="", split="train", crop="center",
                     num_examples=20_000, num_workers=0, eval_split="heldout", eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 25
  config.image_every = 500
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
