"""Generation as a library: captions in; images, codes and reranker scores out.

    from dalle_jax import generate
    gen = generate.Generator.load("demo_out/work/transformer", reranker="demo_out/work/reranker")
    result = gen.generate(["a red circle", "two blue squares"], num_candidates=8, keep=2)
    result.pil()[0][0]   # the best of 8 for "a red circle", a PIL image

Candidates are reranked by a `train_reranker.py` run (`reranker=`, the paper's CLIP-style
reranker) or by the transformer itself against each caption's near misses (`near_misses="shapes"`,
`dalle_jax.transformer.caption_contrast`).

`Generator.load` reads a `train_transformer.py` run (its EMA parameters), its tokenizer and the dVAE
that decodes its codes: a `train_dvae.py` run, a directory holding OpenAI's released `encoder.pkl`
and `decoder.pkl`, or those two paths. Sample g of a call (counted over every caption's
candidates) draws from `fold_in(key(seed), g)`, so a seed gives the same images at any batch size;
the sampler is compiled once per batch shape and reused. Bad input raises `GenerationError`, whose
message is one line meant for the user.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from dalle_jax import sharding
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import code_shards, preprocess
from dalle_jax.dvae import model as dvae, openai_weights, training as dvae_training
from dalle_jax.rerank import training as rerank_training
from dalle_jax.transformer import caption_contrast, sampling
from dalle_jax.transformer import training as transformer_training
# What users hand in (captions, prompts files, images), and the error they get: part of this API.
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.user_input import GenerationError, load_image, read_prompts, shorten  # noqa: F401

OPENAI_FILES = ("encoder.pkl", "decoder.pkl")


def load_dvae(source: str | Sequence[str], config: TransformerConfig
              ) -> tuple[dvae.DVAEConfig, Any]:
  """The dVAE that decodes `config`'s codes, refused when its codebook or grid is not the model's.

  Args:
    source: a `train_dvae.py` workdir, a directory holding OpenAI's `encoder.pkl` and
      `decoder.pkl`, or the paths of those two files.
  """
  if not source:
    raise GenerationError("the run's config names no data.dvae_workdir: pass dvae= "
                          "(--dvae_workdir), the train_dvae.py run whose codes trained it")
  if isinstance(source, (str, os.PathLike)) and all(
      os.path.isfile(os.path.join(source, name)) for name in OPENAI_FILES):
    source = tuple(os.path.join(source, name) for name in OPENAI_FILES)
  if isinstance(source, (str, os.PathLike)):
    dvae_config, params = dvae_training.load_trained(os.fspath(source))
  else:
    dvae_config, params = openai_weights.load_openai_dvae(*source)
    # The released files fix the grid's downsampling, not the resolution: the model's grid does.
    dvae_config = dataclasses.replace(
        dvae_config, resolution=config.image_size * dvae_config.downsampling)
    params = jax.tree.map(jnp.asarray, params)
  grid = dvae_config.code_resolution
  if (dvae_config.vocab_size, grid) != (config.image_vocab_size, config.image_size):
    raise GenerationError(
        f"the dVAE {source} has vocab_size {dvae_config.vocab_size} and {grid}x{grid} codes, the "
        f"transformer {config.image_vocab_size} and {config.image_size}x{config.image_size}: "
        "pass dvae= (--dvae_workdir) the dVAE whose codes (encode_dataset.py) trained it")
  return dvae_config, params


def _place(tree: Any, where: jax.sharding.Sharding) -> Any:
  """Every array of `tree` on `where`: a no-op for arrays already there; on several hosts each
  passes the same values."""
  def place(x):
    if isinstance(x, jax.Array) and x.sharding == where:
      return x
    if where.is_fully_addressable:
      return jax.device_put(x, where)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, where, lambda i: x[i])
  return jax.tree.map(place, tree)


@dataclasses.dataclass
class Result:
  """What `Generator.generate` drew, best first per caption when reranked.

  Attributes:
    images: uint8[captions, keep, H, W, 3].
    codes: int32[captions, keep, h, w].
    scores: float32[captions, keep] reranker scores, or None without a reranker.
    truncated: per caption, whether it was longer than the text length (and cut).
    texts: per caption, the text the model read (normalised, and cut when truncated).
    candidates: int[captions, keep], which candidate each kept image is (sample g of caption c's
      candidate j is c * num_candidates + j).
    notes: what was changed about the input (truncations, a resized prime image), one line each.
    timing: compile_s, sampling_s, image_tokens_per_s (and scoring_s when reranked).
  """
  images: np.ndarray
  codes: np.ndarray
  scores: np.ndarray | None
  truncated: list[bool]
  texts: list[str]
  candidates: np.ndarray
  notes: list[str]
  timing: dict[str, float]

  def pil(self) -> list[list[Image.Image]]:
    """Per caption, its kept images as PIL images."""
    return [[Image.fromarray(image) for image in images] for images in self.images]


class Generator:
  """A trained transformer, its tokenizer and dVAE, and optionally a reranker, ready to draw.

  `params` may be replaced between calls (a training loop draws with its EMA parameters); with a
  `mesh` the batch is split over its batch axes and the parameters stay where `param_shardings`
  puts them, on one host or several (every host passes the same captions and gets every image).
  """

  def __init__(self, config: TransformerConfig, params: Any, tokenizer: tokenizer_lib.Tokenizer,
               dvae_config: dvae.DVAEConfig, dvae_params: Any,
               reranker: rerank_training.TrainedReranker | None = None, *, mesh=None,
               param_shardings: Any = None, run_config: dict | None = None,
               near_misses: Callable[[str], Sequence[str]] | None = None):
    if (tokenizer.vocab_size, tokenizer.text_len) != (config.text_vocab_size, config.text_len):
      raise GenerationError(
          f"the tokenizer has {tokenizer.vocab_size} pieces and text_len {tokenizer.text_len}, the "
          f"transformer {config.text_vocab_size} and {config.text_len}: pass the run's tokenizer "
          "(tokenizer=, --tokenizer_dir)")
    if reranker is not None and near_misses is not None:
      raise GenerationError("rerank by a reranker run or by near misses, not both: pass one of "
                            "reranker= (--reranker) and near_misses= (--near_misses)")
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.near_misses = near_misses
    self._contrast = (caption_contrast.CaptionContrast(config)
                      if near_misses is not None else None)
    self.dvae_config, self.dvae_params, self.reranker = dvae_config, dvae_params, reranker
    self.mesh, self.param_shardings = mesh, param_shardings
    self.run_config = run_config or {}
    self._compiled: dict[tuple[int, bool], Any] = {}
    self._encode = jax.jit(lambda p, x: dvae.encode(dvae_config, p, x))

  @classmethod
  def load(cls, workdir: str, reranker: str | None = None, dvae: Any = None, *,
           tokenizer: str | None = None, step: int | None = None, ema: bool = True,
           mesh=None, near_misses: str | Callable[[str], Sequence[str]] | None = None
           ) -> Generator:
    """A `train_transformer.py` run (EMA parameters unless `ema=False`), its tokenizer and dVAE
    (defaults: those its config names; `dvae` as `load_dvae` takes it) and either a
    `train_reranker.py` run or `near_misses` (a name in `caption_contrast.NEAR_MISSES`, or
    caption -> its near-miss captions) to rerank by caption contrast. With a `mesh` (axes data,
    fsdp, tensor) the parameters are read straight into the shards training gives them (the run's
    `sharding_rules`), so a model too large for one device draws across several."""
    try:
      config, params, run_config = transformer_training.load_trained(workdir, step, ema=ema,
                                                                     mesh=mesh)
    except ValueError as error:
      raise ValueError(f"{error}\nThe arrays in {workdir}/checkpoints were written by another "
                       "model config: pass the workdir of the run that wrote them, or put back "
                       "that run's config.json.") from error
    if isinstance(near_misses, str):
      if near_misses not in caption_contrast.NEAR_MISSES:
        raise GenerationError(f"near_misses {near_misses!r} is not one of "
                              f"{sorted(caption_contrast.NEAR_MISSES)}")
      near_misses = caption_contrast.NEAR_MISSES[near_misses]
    data = run_config.get("data", {})
    tokenizer_dir = tokenizer or data.get("tokenizer_dir")
    if not tokenizer_dir:
      raise GenerationError("the run's config names no data.tokenizer_dir: pass tokenizer= "
                            "(--tokenizer_dir)")
    dvae_config, dvae_params = load_dvae(dvae or data.get("dvae_workdir", ""), config)
    return cls(config, params, tokenizer_lib.Tokenizer.load(tokenizer_dir), dvae_config,
               dvae_params, rerank_training.TrainedReranker(reranker) if reranker else None,
               mesh=mesh, run_config=run_config, near_misses=near_misses,
               param_shardings=None if mesh is None else transformer_training.param_shardings(
                   config, mesh, transformer_training.run_rules(run_config)))

  @property
  def text_len(self) -> int:
    return self.config.text_len

  @property
  def image_size(self) -> int:
    """The side of the images, in pixels."""
    return self.dvae_config.resolution

  @property
  def has_reranker(self) -> bool:
    """Whether candidates are reranked: by a reranker run or by near misses."""
    return self.reranker is not None or self.near_misses is not None

  def example_captions(self, count: int = 8) -> list[tuple[str, bool]]:
    """Up to `count` (caption, held_out) pairs from the first shard of the run's training and
    evaluation codes (`data.codes_dir`, `data.eval_codes_dir`), held-out ones first."""
    data, pairs = self.run_config.get("data", {}), []
    for key, held_out in (("eval_codes_dir", True), ("codes_dir", False)):
      if not data.get(key) or not code_shards.list_shards(data[key]):
        continue
      shards = code_shards.CodeShards(data[key])
      pairs += [(shards[i]["captions"][0], held_out) for i in range(min(count, len(shards)))]
    half = [p for p in pairs if p[1]][:count // 2]
    return (half + [p for p in pairs if not p[1]])[:count]

  # ------------------------------------------------------------------------------- inputs

  def encode_captions(self, captions: Sequence[str], tokenizer=None
                      ) -> tuple[np.ndarray, list[bool], list[str]]:
    """int32[captions, text_len] ids, which were truncated, and a note for each of those."""
    tokenizer = tokenizer or self.tokenizer
    ids, truncated = zip(*(tokenizer.encode(c) for c in captions))
    notes = [f"caption {shorten(c)!r} is longer than the {tokenizer.text_len} text tokens: "
             f"truncated to {tokenizer.decode(row)!r}"
             for c, row, cut in zip(captions, ids, truncated) if cut]
    return np.stack(ids), [bool(t) for t in truncated], notes

  def encode_image(self, image: Any, name: str = "prime_image") -> tuple[np.ndarray, list[str]]:
    """The dVAE codes int32[h, w] of an image's centre square (`load_image` takes it), and a note
    when it had to be enlarged. Images smaller than the code grid are refused."""
    picture = load_image(image, name)
    notes = self.check_prime_size(picture, name)
    pixels = preprocess.preprocess(picture, self.image_size, "center")
    return np.asarray(self._encode(self.dvae_params, jnp.asarray(pixels[None])))[0], notes

  def check_prime_size(self, picture: Image.Image, name: str = "prime_image") -> list[str]:
    """Refuses an image smaller than the code grid; a note when it will be enlarged."""
    side, grid = self.image_size, self.config.image_size
    width, height = picture.size
    if min(width, height) < grid:
      raise GenerationError(
          f"{name} is {width}x{height} pixels, fewer than the {grid}x{grid} codes it becomes: "
          f"pass an image of at least {side}x{side}")
    if min(width, height) < side:
      return [f"{name} is {width}x{height} pixels: its centre square was enlarged to the "
              f"dVAE's {side}x{side}"]
    return []

  def _check(self, captions, num_candidates, keep, temperature, top_k, top_p, guidance,
             prime_image, prime_rows, batch_size) -> None:
    if not captions or not all(isinstance(c, str) for c in captions):
      raise GenerationError("captions must be a non-empty list of strings")
    if num_candidates < 1 or not 1 <= keep <= num_candidates:
      raise GenerationError(f"need num_candidates >= 1 and 1 <= keep <= num_candidates, got "
                            f"{num_candidates} and {keep}")
    if keep < num_candidates and not self.has_reranker:
      raise GenerationError(f"keeping {keep} of {num_candidates} candidates needs a reranker: "
                            "load one (reranker=, --reranker; or near_misses=, --near_misses) "
                            "or keep them all")
    if not temperature > 0:
      raise GenerationError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or top_k != int(top_k):
      raise GenerationError(f"top_k must be a whole number >= 0 (0: no filter), got {top_k}")
    if not 0 < top_p <= 1:
      raise GenerationError(f"top_p must be in (0, 1] (1: no filter), got {top_p}")
    if not 0 <= guidance < float("inf"):
      raise GenerationError(f"guidance must be a finite number >= 0 (1: off), got {guidance}")
    if batch_size < 1:
      raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    rows = self.config.image_size
    if prime_image is None and prime_rows:
      raise GenerationError("prime_rows needs a prime_image (the image whose top rows are kept)")
    if prime_image is not None and not 1 <= prime_rows <= rows:
      raise GenerationError(f"with a prime_image, prime_rows must be in 1..{rows} (the code "
                            f"grid's rows), got {prime_rows}")
    if prime_image is None and any(not c.strip() for c in captions):
      raise GenerationError("a caption is empty: write one, or pass a prime_image to draw "
                            "variations of it")

  # ------------------------------------------------------------------------------- drawing

  def _placement(self, batch: int):
    """The mesh a batch is split over (None: one device), how to place the batch's inputs, and
    the transformer's and dVAE's parameters placed for it."""
    mesh = self.mesh
    if mesh is None and batch % jax.local_device_count() == 0:
      mesh = sharding.make_mesh(devices=jax.local_devices())
    if mesh is None:
      whole, on_mesh = jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), jnp.asarray
    else:
      split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
      on_mesh = lambda x: jax.make_array_from_callback(x.shape, split, lambda i: x[i])
    params = self.params if self.param_shardings is not None else _place(self.params, whole)
    self.dvae_params = _place(self.dvae_params, whole)  # kept placed: the next call reuses it
    return mesh, on_mesh, params, self.dvae_params

  def _scorer(self, captions: list[str], text: np.ndarray, notes: list[str]
              ) -> Callable[..., np.ndarray] | None:
    """None without reranking; else (caption index int[B], images, codes, transformer params)
    -> float32[B], higher is better. Captions without near misses get a note."""
    if self.reranker is not None:
      rerank_text = self.encode_captions(captions, self.reranker.tokenizer)[0]
      return lambda owner, images, codes, params: self.reranker.score(images, rerank_text[owner])
    if self._contrast is None:
      return None
    alternatives = []
    for caption in captions:
      misses = list(self.near_misses(caption))
      if not misses and caption.strip():
        notes.append(f"caption {shorten(caption)!r} has no near misses to contrast it with: its "
                     "candidates are kept in the order drawn")
      alternatives.append(self.encode_captions(misses)[0] if misses
                          else np.zeros((0, self.text_len), text.dtype))
    return lambda owner, images, codes, params: self._contrast.score(
        params, text[owner], codes, [alternatives[i] for i in owner])

  def batch_size(self, batch_size: int, total: int) -> int:
    """Samples per call: at most `batch_size`, a whole number per device of a given mesh."""
    batch = min(batch_size, total)
    if self.mesh is not None:
      per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
      batch = -(-batch // per) * per
    return batch

  def generate(self, captions: Sequence[str] | str, num_candidates: int = 1,
               keep: int | None = None, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, guidance: float = 1.0, prime_image: Any = None,
               prime_rows: int = 0, seed: int = 0, progress: bool = True,
               batch_size: int = 16) -> Result:
    """Draws `num_candidates` images per caption and keeps the `keep` the reranker scores best.

    Args:
      captions: the captions (an empty one with `prime_image`: variations of that image).
      num_candidates: images drawn per caption.
      keep: images kept per caption (default: all; fewer needs a reranker).
      temperature, top_k, top_p, guidance: how codes are drawn (`sampling.SampleSettings`).
      prime_image: a path, file bytes, PIL image or uint8[H, W, 3] whose centre square's top
        `prime_rows` rows of codes every sample keeps.
      seed: sample g (over every caption's candidates) draws from fold_in(key(seed), g).
      progress: a progress bar on stderr.
      batch_size: samples per compiled call (the last call is padded to it).
    """
    captions = [captions] if isinstance(captions, str) else list(captions)
    keep = num_candidates if keep is None else keep
    self._check(captions, num_candidates, keep, temperature, top_k, top_p, guidance, prime_image,
                prime_rows, batch_size)
    text, truncated, notes = self.encode_captions(captions)
    grid = self.config.image_size
    prime = np.zeros((grid, grid), np.int32)
    if prime_image is not None:
      prime, resized = self.encode_image(prime_image)
      notes += resized
    score = self._scorer(captions, text, notes)
    for note in notes:
      logging.warning("%s", note)
    settings = sampling.SampleSettings(
        temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
        guidance=jnp.float32(guidance), prime_rows=jnp.int32(prime_rows))

    total = len(captions) * num_candidates
    batch = self.batch_size(batch_size, total)
    guided = float(guidance) != 1.0
    mesh, on_mesh, params, dvae_params = self._placement(batch)
    root = jax.random.key(seed)
    primes = on_mesh(np.broadcast_to(prime, (batch, grid, grid)).copy())

    def inputs(index: np.ndarray) -> tuple:
      keys = np.asarray(jax.random.key_data(
          jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index))))
      return (params, dvae_params, on_mesh(text[index // num_candidates]),
              jax.random.wrap_key_data(on_mesh(keys)), settings, primes)

    timing = {"compile_s": 0.0, "sampling_s": 0.0}
    if score is not None:
      timing["scoring_s"] = 0.0
    # Per caption: (score, candidate, image, codes), pruned to the `keep` best as batches arrive.
    kept: list[list[tuple]] = [[] for _ in captions]
    bar = tqdm.tqdm(total=total, unit="image", desc="drawing", disable=not progress,
                    leave=False)
    for start in range(0, total, batch):
      # Past the end the last sample again: every call has one shape, so one compilation.
      index = np.minimum(np.arange(start, start + batch), total - 1)
      args = inputs(index)
      if (batch, guided) not in self._compiled:
        began = time.perf_counter()
        sampler = sampling.make_sampler(self.config, self.dvae_config, mesh, guided=guided,
                                        param_shardings=self.param_shardings)
        self._compiled[batch, guided] = sampler.lower(*args).compile()
        timing["compile_s"] += time.perf_counter() - began
      began = time.perf_counter()
      images, codes = jax.block_until_ready(self._compiled[batch, guided](*args))
      timing["sampling_s"] += time.perf_counter() - began
      if jax.process_count() > 1:
        images, codes = jax.experimental.multihost_utils.process_allgather((images, codes),
                                                                           tiled=True)
      images, codes = np.asarray(images), np.asarray(codes)
      scores = np.zeros(batch, np.float32)
      if score is not None:  # the whole padded batch: one compiled shape
        began = time.perf_counter()
        scores = score(index // num_candidates, images, codes, params)
        timing["scoring_s"] += time.perf_counter() - began
      for row in range(min(batch, total - start)):
        caption, candidate = divmod(start + row, num_candidates)
        kept[caption].append((float(scores[row]), candidate, images[row], codes[row]))
        if score is not None:
          kept[caption] = sorted(kept[caption], key=lambda c: (-c[0], c[1]))[:keep]
      bar.update(min(batch, total - start))
    bar.close()
    timing["image_tokens_per_s"] = total * self.config.image_len / max(timing["sampling_s"],
                                                                        1e-9)
    field = lambda i, dtype: np.array([[c[i] for c in cs] for cs in kept], dtype)
    return Result(images=field(2, np.uint8), codes=field(3, np.int32),
                  scores=field(0, np.float32) if score is not None else None,
                  truncated=truncated, texts=[self.tokenizer.decode(row) for row in text],
                  candidates=field(1, np.int64), notes=notes,
                  timing=timing)
