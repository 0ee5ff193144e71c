"""The emoji demo's reranker: reranker_small.py's network on 32x32 emoji (the samples' own size)
against their names.

  python experiments/train_reranker.py --config=experiments/configs/reranker_emoji32.py \
      --workdir=runs/reranker_emoji --config.data.tokenizer_dir=runs/emoji_tokenizer

Use the emoji demo's tokenizer (768 pieces, text_len 24, as transformer_emoji32.py). eval/top1 is
caption -> image retrieval within held-out batches of 64 (chance 1/64); the held-out batches are
mostly skin-tone variants of a few families, so it is a hard test. Expected: in the emoji demo
(600 steps), on 96 held-out captions, the 2 of 8 samples it keeps have the caption's skin tone
0.665 of the time, all 8 candidates 0.669: on emoji it barely helps.
"""

from experiments.configs import reranker_small


def get_config():
  config = reranker_small.get_config()
  # 8-pixel patches: 4x4 tokens per image, as reranker_small.py's 16-pixel ones at 64x64.
  config.model.update(resolution=32, patch_size=8, text_vocab_size=768)
  config.data.update(dataset="emoji", num_examples=0)  # num_examples: shapes only
  return config
