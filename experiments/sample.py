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
(dalle_jax/rerank.py), and the --keep best are written, best first.
"""

import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dalle_jax import dvae, dvae_training, image_grid, rerank, sampling, sharding
from dalle_jax import checkpointing, fit_check, transformer_training
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import preprocess
from dalle_jax.sampling import SampleSettings
from dalle_jax.transformer import TransformerConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A train_transformer.py workdir.",
                                  required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RAW_PARAMS = flags.DEFINE_bool("raw_params", False, "Use the raw parameters, not the EMA.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A caption (repeat for several).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file of captions, one per line.")
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
_PRIME_IMAGE = flags.DEFINE_string("prime_image", None, "An image file whose top --prime_rows "
                                   "rows of codes every sample keeps.")
_PRIME_ROWS = flags.DEFINE_integer("prime_rows", 0, "Code rows taken from --prime_image.",
                                   lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Samples per compiled call (the last batch "
                                   "is padded to it).", lower_bound=1)
_DVAE_WORKDIR = flags.DEFINE_string("dvae_workdir", None, "The train_dvae.py run that decodes "
                                    "the codes (default: the run config's data.dvae_workdir).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Split the transformer's parameters over this many "
                             "devices as training does (its model dimension; the batch too).",
                             lower_bound=1)
_TENSOR = flags.DEFINE_integer("tensor", 1, "... and its heads and MLP over this many.",
                               lower_bound=1)
_FIT_CHECK = fit_check.define_flags()
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "The tokenizer (default: the run "
                                     "config's data.tokenizer_dir).")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  """The --prompt captions, then the non-blank lines of --prompts_file."""
  prompts = list(prompts)
  if prompts_file:
    with open(prompts_file, encoding="utf-8") as f:
      prompts += [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompt='a caption' (repeatable) or --prompts_file")
  return prompts


def check_settings() -> None:
  """Refuses flag values the sampler would silently misuse, before anything loads."""
  if _TEMPERATURE.value <= 0:
    raise ValueError(f"--temperature must be > 0, got {_TEMPERATURE.value}")
  if not 0 < _TOP_P.value <= 1:
    raise ValueError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
  if _PRIME_ROWS.value and not _PRIME_IMAGE.value:
    raise ValueError("--prime_rows needs --prime_image (the image whose codes are kept)")
  if _PRIME_IMAGE.value and not _PRIME_ROWS.value:
    raise ValueError("--prime_image needs --prime_rows (how many rows of its codes to keep)")
  if _RERANK.value:
    if not _RERANKER.value:
      raise ValueError("--rerank needs --reranker (the reranker's workdir)")
    if (_KEEP.value or _NUM_SAMPLES.value) > _RERANK.value:
      raise ValueError(f"--keep {_KEEP.value or _NUM_SAMPLES.value} is more than the "
                       f"--rerank {_RERANK.value} candidates")
  elif _KEEP.value or _RERANKER.value:
    raise ValueError("--keep and --reranker only apply with --rerank=N")


def load_transformer(workdir: str, mesh=None) -> tuple[TransformerConfig, Any, dict]:
  """The run's model config, parameters (EMA unless --raw_params; split over `mesh` as training
  splits them) and whole config dict."""
  try:
    return transformer_training.load_trained(workdir, _STEP.value, ema=not _RAW_PARAMS.value,
                                             mesh=mesh)
  except ValueError as error:
    raise ValueError(f"{error}\nThe arrays in {workdir}/checkpoints were written by another "
                     "model config: pass the workdir of the run that wrote them as --checkpoint, "
                     "or put back that run's config.json.") from error


def load_dvae(workdir: str, config: TransformerConfig) -> tuple[dvae.DVAEConfig, Any]:
  """The dVAE that decodes the codes, refused when its codebook or grid is not the model's."""
  if not workdir:
    raise ValueError("the run's config names no data.dvae_workdir: pass --dvae_workdir (the "
                     "train_dvae.py run whose codes trained this transformer)")
  dvae_config, params = dvae_training.load_trained(workdir)
  grid = dvae_config.code_resolution
  if (dvae_config.vocab_size, grid) != (config.image_vocab_size, config.image_size):
    raise ValueError(
        f"the dVAE in {workdir} has vocab_size {dvae_config.vocab_size} and {grid}x{grid} codes, "
        f"the transformer {config.image_vocab_size} and {config.image_size}x{config.image_size}: "
        "pass --dvae_workdir=<the train_dvae.py run whose codes (encode_dataset.py) trained "
        "this transformer>")
  return dvae_config, params


def encode_prompts(tokenizer: tokenizer_lib.Tokenizer, prompts: list[str],
                   reader: str) -> tuple[np.ndarray, list[bool]]:
  """int32[prompts, text_len] ids; a prompt longer than text_len is truncated with a warning."""
  ids, truncated = zip(*(tokenizer.encode(prompt) for prompt in prompts))
  for prompt, row, cut in zip(prompts, ids, truncated):
    if cut:
      logging.warning("prompt %r is longer than the %d text tokens %s reads: truncated to %r",
                      prompt, tokenizer.text_len, reader, tokenizer.decode(row))
  return np.stack(ids), [bool(t) for t in truncated]


def prime_codes(path: str, dvae_config: dvae.DVAEConfig, dvae_params: Any) -> np.ndarray:
  """The dVAE codes of the centre crop of an image file: int32[H, W]."""
  with open(path, "rb") as f:
    image = preprocess.decode_image(f.read(), min_size=dvae_config.resolution)
  pixels = preprocess.preprocess(image, dvae_config.resolution, "center")
  return np.asarray(dvae.encode(dvae_config, dvae_params, pixels[None]))[0]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
  check_settings()
  reranker = rerank.TrainedReranker(_RERANKER.value) if _RERANK.value else None
  split = dict(data=-1, fsdp=_FSDP.value, tensor=_TENSOR.value)
  fit_check.at_launch(_FIT_CHECK, lambda target: fit_check.transformer_sampling(
      TransformerConfig(**checkpointing.read_run_config(
          _CHECKPOINT.value, "train_transformer.py")["model"]), split, target,
      min(_BATCH_SIZE.value, len(prompts) * (_RERANK.value or _NUM_SAMPLES.value)),
      _GUIDANCE.value != 1.0))
  model_mesh = None
  if _FSDP.value * _TENSOR.value > 1:
    model_mesh = sharding.make_mesh(**split, devices=jax.local_devices())
  config, params, run_config = load_transformer(_CHECKPOINT.value, model_mesh)
  if _PRIME_ROWS.value > config.image_size:
    raise ValueError(f"--prime_rows {_PRIME_ROWS.value} is more than the {config.image_size} "
                     "rows of the code grid")
  data = run_config.get("data", {})
  tokenizer_dir = _TOKENIZER_DIR.value or data.get("tokenizer_dir")
  if not tokenizer_dir:
    raise ValueError("the run's config names no data.tokenizer_dir: pass --tokenizer_dir")
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_dir)
  if (tokenizer.vocab_size, tokenizer.text_len) != (config.text_vocab_size, config.text_len):
    raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} pieces and "
                     f"text_len {tokenizer.text_len}, the transformer {config.text_vocab_size} "
                     f"and {config.text_len}: pass the run's tokenizer as --tokenizer_dir")
  text_ids, truncated = encode_prompts(tokenizer, prompts, "the transformer")
  if reranker is not None:
    rerank_ids, _ = encode_prompts(reranker.tokenizer, prompts, "the reranker")
  dvae_workdir = _DVAE_WORKDIR.value or data.get("dvae_workdir", "")
  dvae_config, dvae_params = load_dvae(dvae_workdir, config)

  # ---------------------------------------------------------------- what to draw
  per_prompt = _RERANK.value or _NUM_SAMPLES.value
  keep = (_KEEP.value or _NUM_SAMPLES.value) if _RERANK.value else per_prompt
  total = len(prompts) * per_prompt
  batch = min(_BATCH_SIZE.value, total)
  prime = np.zeros((config.image_size, config.image_size), np.int32)
  if _PRIME_IMAGE.value:
    prime = prime_codes(_PRIME_IMAGE.value, dvae_config, dvae_params)
  settings = SampleSettings(temperature=jnp.float32(_TEMPERATURE.value),
                            top_k=jnp.int32(_TOP_K.value), top_p=jnp.float32(_TOP_P.value),
                            guidance=jnp.float32(_GUIDANCE.value),
                            prime_rows=jnp.int32(_PRIME_ROWS.value))
  root = jax.random.key(_SEED.value)

  # ---------------------------------------------------------------- compile once for the batch
  devices = jax.local_devices()
  mesh = sharding.make_mesh(devices=devices) if batch % len(devices) == 0 else None
  place = (lambda x: x) if mesh is None else (
      lambda x: jax.device_put(x, sharding.replicated(mesh)))
  param_shardings = None
  if model_mesh is not None:
    mesh, place = model_mesh, (lambda x: jax.device_put(x, sharding.replicated(model_mesh)))
    param_shardings = transformer_training.param_shardings(config, mesh)
    if batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
      raise ValueError(f"--batch_size {batch} must divide over the data x fsdp = "
                       f"{mesh.shape['data'] * mesh.shape['fsdp']} devices")
  else:
    params = place(params)
  dvae_params = place(dvae_params)
  sample = sampling.make_sampler(config, dvae_config, mesh, guided=_GUIDANCE.value != 1.0,
                                 param_shardings=param_shardings)

  def batch_index(start: int) -> np.ndarray:
    """Samples start, ..., start + batch - 1; past the end, the last again (padding: one shape)."""
    return np.minimum(np.arange(start, start + batch), total - 1)

  def inputs(index: np.ndarray) -> tuple:
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index))
    return (params, dvae_params, jnp.asarray(text_ids[index // per_prompt]), keys, settings,
            jnp.asarray(np.broadcast_to(prime, (batch, *prime.shape))))

  began = time.perf_counter()
  compiled = sample.lower(*inputs(batch_index(0))).compile()
  compile_s = time.perf_counter() - began

  # ---------------------------------------------------------------- draw, score, keep the best
  # Per prompt: (score, candidate, image, codes), pruned to the `keep` best as batches arrive.
  kept: list[list[tuple[float, int, np.ndarray, np.ndarray]]] = [[] for _ in prompts]
  sampling_s = scoring_s = 0.0
  for start in range(0, total, batch):
    index = batch_index(start)
    began = time.perf_counter()
    images, codes = jax.block_until_ready(compiled(*inputs(index)))
    sampling_s += time.perf_counter() - began
    images, codes = np.asarray(images), np.asarray(codes)
    scores = np.zeros(batch, np.float32)
    if reranker is not None:  # the whole padded batch: one compiled shape
      began = time.perf_counter()
      scores = reranker.score(images, rerank_ids[index // per_prompt])
      scoring_s += time.perf_counter() - began
    for row in range(min(batch, total - start)):
      prompt, candidate = divmod(start + row, per_prompt)
      kept[prompt].append((float(scores[row]), candidate, images[row], codes[row]))
      if reranker is not None:
        kept[prompt] = sorted(kept[prompt], key=lambda c: (-c[0], c[1]))[:keep]
  tokens_per_s = total * config.image_len / sampling_s
  print(f"compiled the sampler for batch {batch} in {compile_s:.1f}s; drew {total} images "
        f"({total * config.image_len} image tokens) in {sampling_s:.2f}s: "
        f"{tokens_per_s:.1f} image tokens/s")
  if reranker is not None:
    print(f"scored them in {scoring_s:.2f}s (compiling included)")

  # ---------------------------------------------------------------- write
  os.makedirs(_OUT.value, exist_ok=True)
  entries = []
  for i, (prompt, candidates) in enumerate(zip(prompts, kept)):
    samples = []
    for j, (score, candidate, image, _) in enumerate(candidates):
      name = f"prompt{i}_sample{j}.png"
      Image.fromarray(image).save(os.path.join(_OUT.value, name))
      samples.append({"file": name, "sample_index": i * per_prompt + candidate,
                      **({"score": score} if reranker is not None else {})})
    entries.append({"prompt": prompt, "truncated": truncated[i],
                    "text": tokenizer.decode(text_ids[i]), "samples": samples})
  captions = [prompt if reranker is None else f"{prompt} ({score:.3f})"
              for prompt, candidates in zip(prompts, kept) for score, *_ in candidates]
  grid = image_grid.captioned_grid([c[2] for cs in kept for c in cs], captions, columns=keep)
  grid.save(os.path.join(_OUT.value, "grid.png"))
  np.savez(os.path.join(_OUT.value, "codes.npz"),
           codes=np.stack([np.stack([c[3] for c in cs]) for cs in kept]))
  manifest = {
      "checkpoint": _CHECKPOINT.value, "step": _STEP.value, "ema": not _RAW_PARAMS.value,
      "dvae_workdir": dvae_workdir, "seed": _SEED.value, "batch_size": batch,
      "settings": {"temperature": _TEMPERATURE.value, "top_k": _TOP_K.value,
                   "top_p": _TOP_P.value, "guidance": _GUIDANCE.value,
                   "prime_image": _PRIME_IMAGE.value, "prime_rows": _PRIME_ROWS.value},
      "num_samples": keep, "rerank": _RERANK.value, "reranker": _RERANKER.value,
      "grid": "grid.png", "codes": "codes.npz", "prompts": entries,
      "timing": {"compile_s": compile_s, "sampling_s": sampling_s,
                 "image_tokens_per_s": tokens_per_s,
                 **({"scoring_s": scoring_s} if reranker is not None else {})},
  }
  with open(os.path.join(_OUT.value, "samples.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
  print(f"wrote {len(prompts)} x {keep} samples, grid.png and samples.json to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
