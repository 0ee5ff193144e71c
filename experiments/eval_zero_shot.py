"""Zero-shot evaluation: do samples for held-out captions show what the captions say?

  python experiments/eval_zero_shot.py --transformer_workdir=runs/transformer --dataset=shapes \
      --num_captions=64 --samples_per_caption=4 --top_k=64 --out=zero_shot.json --grid=zs.png
  python experiments/eval_zero_shot.py --transformer_workdir=runs/emoji --dataset=emoji \
      --samples_per_caption=2 --candidates=8 --reranker=runs/reranker
  python experiments/eval_zero_shot.py --transformer_workdir=runs/transformer --dataset=shapes \
      --samples_per_caption=2 --candidates=8 --near_misses=shapes   # the transformer reranks

Shapes: the share of samples with every captioned attribute, beside chance and the judge on
ground truth (as drawn and through the dVAE); emoji: the share nearest their own variant among
the family's renders. `dalle_jax/evaluation/zero_shot.py` holds the evaluation; this script reads flags
and writes the JSON (--out) and the grid (--grid, held-out captions framed red).
"""

import json
import os
import sys

from absl import app, flags, logging

from dalle_jax import generate
from dalle_jax.evaluation import zero_shot
from dalle_jax.transformer import caption_contrast

_TRANSFORMER = flags.DEFINE_string("transformer_workdir", None, "A train_transformer.py workdir.",
                                   required=True)
_DATASET = flags.DEFINE_enum("dataset", "shapes", zero_shot.DATASETS,
                             "Which captions and which judge.")
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 32, "Captions per split (held-out and "
                                     "training).", lower_bound=1)
_SAMPLES = flags.DEFINE_integer("samples_per_caption", 4, "Images judged per caption.",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k likeliest codes; 0: all.", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: keep codes up to this mass; 1: all.")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale; 1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Picks the captions and the samples' keys.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Samples per compiled call.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RAW_PARAMS = flags.DEFINE_bool("raw_params", False, "Use the raw parameters, not the EMA.")
_DVAE_WORKDIR = flags.DEFINE_string("dvae_workdir", None, "Default: the run config's "
                                    "data.dvae_workdir (or a directory of OpenAI's pickles).")
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Default: the run config's "
                                     "data.tokenizer_dir.")
_CANDIDATES = flags.DEFINE_integer("candidates", 0, "Rerank: draw this many per caption and "
                                   "judge the --samples_per_caption best by the --reranker; 0: "
                                   "no reranking.", lower_bound=0)
_RERANKER = flags.DEFINE_string("reranker", None, "With --candidates: a train_reranker.py "
                                "workdir.")
_NEAR_MISSES = flags.DEFINE_enum("near_misses", None, sorted(caption_contrast.NEAR_MISSES),
                                 "With --candidates, instead of --reranker: the transformer "
                                 "reranks, against each caption's near misses.")
_CHANCE_DRAWS = flags.DEFINE_integer("chance_draws", 4, "shapes: random training images judged "
                                     "per caption for the chance level.", lower_bound=1)
_OUT = flags.DEFINE_string("out", "zero_shot.json", "Where the results JSON goes.")
_GRID = flags.DEFINE_string("grid", None, "Optional PNG of every sample, held-out captions "
                            "framed red.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  if _CANDIDATES.value and not (_RERANKER.value or _NEAR_MISSES.value):
    sys.exit("eval_zero_shot.py: --candidates needs --reranker (a train_reranker.py workdir) "
             "or --near_misses")
  try:
    gen = generate.Generator.load(
        _TRANSFORMER.value, reranker=_RERANKER.value if _CANDIDATES.value else None,
        near_misses=_NEAR_MISSES.value if _CANDIDATES.value else None,
        dvae=_DVAE_WORKDIR.value, tokenizer=_TOKENIZER_DIR.value, step=_STEP.value,
        ema=not _RAW_PARAMS.value)
    results = zero_shot.evaluate(
        gen, _DATASET.value, num_captions=_NUM_CAPTIONS.value,
        samples_per_caption=_SAMPLES.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, guidance=_GUIDANCE.value, seed=_SEED.value,
        batch_size=_BATCH_SIZE.value, chance_draws=_CHANCE_DRAWS.value,
        candidates=_CANDIDATES.value, grid_path=_GRID.value)
  except generate.GenerationError as error:  # the user's to fix: one line, no traceback
    sys.exit(f"eval_zero_shot.py: {error}")
  results.update(transformer_workdir=_TRANSFORMER.value, step=_STEP.value,
                 ema=not _RAW_PARAMS.value, reranker_workdir=_RERANKER.value,
                 near_misses=_NEAR_MISSES.value,
                 dvae_workdir=_DVAE_WORKDIR.value or
                 gen.run_config.get("data", {}).get("dvae_workdir"))
  if os.path.dirname(_OUT.value):
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as out:
    json.dump(results, out, indent=2)
    out.write("\n")
  print(zero_shot.report(results))
  print(f"wrote {_OUT.value}" + (f" and {_GRID.value}" if _GRID.value else ""))


if __name__ == "__main__":
  app.run(main)
