"""The emoji demo's transformer: transformer_small.py's network on emoji names (BPE over 768, at
most 19 pieces) and 8x8 codes over 512 from dvae_emoji32.py.

  python experiments/train_transformer.py --config=experiments/configs/transformer_emoji32.py \
      --workdir=runs/transformer_emoji --config.data.codes_dir=runs/emoji_codes \
      --config.data.eval_codes_dir=runs/emoji_codes_heldout \
      --config.data.tokenizer_dir=runs/emoji_tokenizer

Expected (the emoji demo's transformer stage, 2 CPU cores, one busy with another job): 2,000
steps in about 17 minutes, image-token loss 1.27 train and 1.98 held-out.
"""

from experiments.configs import transformer_small


def get_config():
  config = transformer_small.get_config()
  # 3,172 training pairs are 100 batches: dropout slows the memorising of so few.
  config.model.update(text_vocab_size=768, image_vocab_size=512, dropout=0.1)
  config.train.update(num_steps=2_000)  # each caption seen about 20 times
  return config
