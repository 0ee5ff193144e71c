"""Draw images for captions from a trained transformer: a captioned grid, single PNGs, a manifest.

  python experiments/sample.py --checkpoint=runs/transformer --prompt='a red circle' \
      --prompt='two blue squares' --num_samples=8 --temperature=0.9 --top_k=64 --out=samples
  python experiments/sample.py --checkpoint=runs/transformer --prompts_file=captions.txt \
      --guidance=3 --rerank=64 --keep=4 --reranker=runs/reranker --out=samples
  python experiments/sample.py --checkpoint=runs/transformer --prompt='a cat' \
      --prime_image=cat.jpg --prime_rows=8 --out=samples   # complete the image's bottom rows

--out receives grid.png (one row per prompt), prompt{i}_sample{j}.png, codes.npz (int32[prompts,
samples, H, W]) and samples.json (settings, prompts, files, scores). Sample g (counted over all
prompts' candidates) draws from `fold_in(key(seed), g)`, so a seed gives the same images whatever
--batch_size. With --rerank=N each prompt gets N candidates, scored by the --reranker run
(dalle_jax/rerank/model.py) or by the transformer against each caption's --near_misses
(dalle_jax/transformer/caption_contrast.py), and the --keep best are written, best first. The
drawing is `dalle_jax/generate.py`'s `Generator`; this script reads flags and writes files.
"""

import json
import os
import sys

from absl import app, flags, logging
import jax
import numpy as np
from PIL import Image

from dalle_jax import generate, image_grid, sharding
from dalle_jax.transformer import caption_contrast
from dalle_jax.scaling import fit_check
from dalle_jax.train.checkpointing import read_run_config
from dalle_jax.transformer import training as transformer_training
from dalle_jax.transformer.model import TransformerConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train_transformer.py workdir.",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RAW_PARAMS = flags.DEFINE_bool("raw_params", False, "Use the raw parameters, not the EMA.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A caption (repeat for several; '' with "
                                    "--prime_image draws variations of the image).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A UTF-8 file of captions, one per "
                                    "line.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Images per prompt.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k likeliest codes; 0: all.", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: keep codes up to this mass; 1: all.")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale; 1: off.")
_RERANK = flags.DEFINE_integer("rerank", 0, "Draw this many candidates per prompt and keep the "
                               "--keep best by the --reranker's score; 0: no reranking.",
                               lower_bound=0)
_KEEP = flags.DEFINE_integer("keep", None, "With --rerank: images kept per prompt (default "
                             "--num_samples).", lower_bound=1)
_RERANKER = flags.DEFINE_string("reranker", None, "With --rerank: the reranker's workdir.")
_NEAR_MISSES = flags.DEFINE_enum("near_misses", None, sorted(caption_contrast.NEAR_MISSES),
                                 "With --rerank, instead of --reranker: the transformer reranks, "
                                 "against each caption's near misses.")
_PRIME_IMAGE = flags.DEFINE_string("prime_image", None, "An image file whose top --prime_rows "
                                   "rows of codes every sample keeps (its centre square, resized "
                                   "to the dVAE's resolution).")
_PRIME_ROWS = flags.DEFINE_integer("prime_rows", 0, "Code rows taken from --prime_image.",
                                   lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Samples per compiled call (the last batch "
                                   "is padded to it).", lower_bound=1)
_DVAE_WORKDIR = flags.DEFINE_string("dvae_workdir", None, "The dVAE that decodes the codes: a "
                                    "train_dvae.py run, or a directory holding OpenAI's "
                                    "encoder.pkl and decoder.pkl (default: the run config's "
                                    "data.dvae_workdir).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Split the transformer's parameters over this many "
                             "devices as training does (its model dimension; the batch too).",
                             lower_bound=1)
_TENSOR = flags.DEFINE_integer("tensor", 1, "... and its heads and MLP over this many.",
                               lower_bound=1)
_FIT_CHECK = fit_check.define_flags()
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "The tokenizer (default: the run "
                                     "config's data.tokenizer_dir).")


def read_prompts() -> list[str]:
  """The --prompt captions, then the non-blank lines of --prompts_file."""
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    prompts += generate.read_prompts(_PROMPTS_FILE.value)
  if not prompts:
    raise generate.GenerationError("no prompts: pass --prompt='a caption' (repeatable) or "
                                   "--prompts_file")
  return prompts


def check_flags() -> None:
  """Refuses flag combinations the library cannot name, before anything loads."""
  if _PRIME_IMAGE.value and not _PRIME_ROWS.value:
    raise generate.GenerationError("--prime_image needs --prime_rows (how many rows of its "
                                   "codes to keep)")
  if _PRIME_ROWS.value and not _PRIME_IMAGE.value:
    raise generate.GenerationError("--prime_rows needs --prime_image (the image whose codes are "
                                   "kept)")
  if _RERANK.value:
    if not (_RERANKER.value or _NEAR_MISSES.value):
      raise generate.GenerationError("--rerank needs --reranker (the reranker's workdir) or "
                                     "--near_misses")
    if (_KEEP.value or _NUM_SAMPLES.value) > _RERANK.value:
      raise generate.GenerationError(f"--keep {_KEEP.value or _NUM_SAMPLES.value} is more than "
                                     f"the --rerank {_RERANK.value} candidates")
  elif _KEEP.value or _RERANKER.value or _NEAR_MISSES.value:
    raise generate.GenerationError("--keep, --reranker and --near_misses only apply with "
                                   "--rerank=N")


def main(argv):
  del argv
  try:
    draw_and_write()
  except generate.GenerationError as error:  # the user's to fix: one line, no traceback
    sys.exit(f"sample.py: {error}")


def draw_and_write() -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  prompts = read_prompts()
  check_flags()
  candidates = _RERANK.value or _NUM_SAMPLES.value
  split = dict(data=-1, fsdp=_FSDP.value, tensor=_TENSOR.value)

  def fit(target):  # the run's model, placed by its own sharding rules
    run = read_run_config(_CHECKPOINT.value, "train_transformer.py")
    return fit_check.transformer_sampling(
        TransformerConfig(**run["model"]), split, target,
        min(_BATCH_SIZE.value, len(prompts) * candidates), _GUIDANCE.value != 1.0,
        transformer_training.run_rules(run))

  fit_check.at_launch(_FIT_CHECK, fit)
  prime, prime_name = None, f"--prime_image {_PRIME_IMAGE.value}"
  if _PRIME_IMAGE.value:  # read before the models load: a bad file fails at once
    prime = generate.load_image(_PRIME_IMAGE.value, "--prime_image")
  mesh = None
  if _FSDP.value * _TENSOR.value > 1:
    mesh = sharding.make_mesh(**split, devices=jax.local_devices())
  gen = generate.Generator.load(_CHECKPOINT.value, reranker=_RERANKER.value,
                                near_misses=_NEAR_MISSES.value,
                                dvae=_DVAE_WORKDIR.value, tokenizer=_TOKENIZER_DIR.value,
                                step=_STEP.value, ema=not _RAW_PARAMS.value, mesh=mesh)
  if prime is not None:
    gen.check_prime_size(prime, prime_name)
  keep = (_KEEP.value or _NUM_SAMPLES.value) if _RERANK.value else candidates
  result = gen.generate(prompts, num_candidates=candidates, keep=keep,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                        guidance=_GUIDANCE.value, prime_image=prime, prime_rows=_PRIME_ROWS.value,
                        seed=_SEED.value, batch_size=_BATCH_SIZE.value)
  timing, total = result.timing, len(prompts) * candidates
  batch = gen.batch_size(_BATCH_SIZE.value, total)
  print(f"compiled the sampler for batch {batch} in {timing['compile_s']:.1f}s; drew {total} "
        f"images ({total * gen.config.image_len} image tokens) in {timing['sampling_s']:.2f}s: "
        f"{timing['image_tokens_per_s']:.1f} image tokens/s")
  if gen.has_reranker:
    print(f"scored them in {timing['scoring_s']:.2f}s (compiling included)")

  # ---------------------------------------------------------------- write
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  entries, captions = [], []
  for i, prompt in enumerate(prompts):
    samples = []
    for j, image in enumerate(result.images[i]):
      name = f"prompt{i}_sample{j}.png"
      Image.fromarray(image).save(os.path.join(out, name))
      score = {} if result.scores is None else {"score": float(result.scores[i, j])}
      samples.append({"file": name, "sample_index": i * candidates + int(result.candidates[i, j]),
                      **score})
      captions.append(generate.shorten(prompt) + (f" ({score['score']:.3f})" if score else ""))
    entries.append({"prompt": generate.shorten(prompt), "length": len(prompt),
                    "truncated": result.truncated[i],
                    "text": result.texts[i],
                    "samples": samples})
  grid = image_grid.captioned_grid(result.images.reshape(-1, *result.images.shape[2:]), captions,
                                   columns=keep)
  grid.save(os.path.join(out, "grid.png"))
  np.savez(os.path.join(out, "codes.npz"), codes=result.codes)
  manifest = {
      "checkpoint": _CHECKPOINT.value, "step": _STEP.value, "ema": not _RAW_PARAMS.value,
      "dvae_workdir": _DVAE_WORKDIR.value or gen.run_config.get("data", {}).get("dvae_workdir"),
      "seed": _SEED.value, "batch_size": batch,
      "settings": {"temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
                   "top_p": _TOP_P.value, "guidance": _GUIDANCE.value,
                   "prime_image": _PRIME_IMAGE.value, "prime_rows": _PRIME_ROWS.value},
      "num_samples": keep, "rerank": _RERANK.value, "reranker": _RERANKER.value,
      "near_misses": _NEAR_MISSES.value,
      "grid": "grid.png", "codes": "codes.npz", "prompts": entries, "notes": result.notes,
      "timing": timing,
  }
  with open(os.path.join(out, "samples.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
  print(f"wrote {len(prompts)} x {keep} samples, grid.png and samples.json to {out}")


if __name__ == "__main__":
  app.run(main)
