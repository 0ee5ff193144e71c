"""Zero-shot evaluation: do samples for held-out captions show what the captions say?

  python experiments/eval_zero_shot.py --transformer_workdir=runs/transformer --dataset=shapes \
      --num_captions=64 --samples_per_caption=4 --top_k=64 --out=zero_shot.json --grid=zs.png
  python experiments/eval_zero_shot.py --transformer_workdir=runs/emoji --dataset=emoji

Draws `--samples_per_caption` images for `--num_captions` held-out captions and as many training
captions, and judges them with `dalle_jax/zero_shot.py`:

  shapes  the fraction of images whose objects have every captioned attribute (count, colour,
          shape, size, and position or relation), per attribute, beside the chance level (random
          training images judged against the same captions), the judge's own accuracy on
          jittered ground-truth renders of those captions, and on those renders through the dVAE
          (the most this dVAE lets a transformer reach);
  emoji   the fraction of images nearest to their own caption's render among the renders of
          every variant of the emoji's family (chance: 1 / family size), and among the skin tones
          of the same variant alone (`tone_accuracy`); the ceiling again through the dVAE.

Half of the shapes captions have one object, half two; held-out ones contain a colour-shape pair
never seen in training. Sample g (over all captions, held-out first) draws from
`fold_in(key(seed), g)`. With `--candidates=N --reranker=DIR` each caption gets N samples and a
train_reranker.py run keeps the `--samples_per_caption` it scores best, as the paper reranks;
the JSON then also holds each split's figures over all N (`without_reranking`). The JSON goes to
--out; --grid writes the samples, held-out framed red. `evaluate(...)` is the same run as a
function.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import dvae, dvae_training, image_grid, rerank, sampling, sharding
from dalle_jax import transformer_training
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax import zero_shot
from dalle_jax.data import emoji, shapes
from dalle_jax.sampling import SampleSettings

DATASETS = ("shapes", "emoji")
SPLITS = ("heldout", "train")
UNRERANKED_KEYS = ("accuracy", "count", "attributes", "tone_accuracy", "tone_count")

# ---------------------------------------------------------------------------------------------
# Loading the trained run.
# ---------------------------------------------------------------------------------------------


def load_models(workdir: str, step: int | None = None, ema: bool = True,
                dvae_workdir: str | None = None, tokenizer_dir: str | None = None) -> dict:
  """The transformer, the dVAE that decodes its codes and its tokenizer, checked to fit."""
  config, params, run_config = transformer_training.load_trained(workdir, step, ema=ema)
  data = run_config.get("data", {})
  dvae_workdir = dvae_workdir or data.get("dvae_workdir")
  tokenizer_dir = tokenizer_dir or data.get("tokenizer_dir")
  if not dvae_workdir or not tokenizer_dir:
    raise ValueError(f"the config of {workdir} names no data.dvae_workdir or data.tokenizer_dir: "
                     "pass --dvae_workdir and --tokenizer_dir")
  dvae_config, dvae_params = dvae_training.load_trained(dvae_workdir)
  grid = dvae_config.code_resolution
  if (dvae_config.vocab_size, grid) != (config.image_vocab_size, config.image_size):
    raise ValueError(f"the dVAE in {dvae_workdir} ({dvae_config.vocab_size} codes, {grid}x{grid}) "
                     f"does not decode this transformer ({config.image_vocab_size} codes, "
                     f"{config.image_size}x{config.image_size}): pass its --dvae_workdir")
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_dir)
  if (tokenizer.vocab_size, tokenizer.text_len) != (config.text_vocab_size, config.text_len):
    raise ValueError(f"the tokenizer in {tokenizer_dir} does not fit the transformer: pass the "
                     "run's --tokenizer_dir")
  return {"config": config, "params": params, "dvae_config": dvae_config,
          "dvae_params": dvae_params, "tokenizer": tokenizer, "dvae_workdir": dvae_workdir}


# ---------------------------------------------------------------------------------------------
# Which captions.
# ---------------------------------------------------------------------------------------------


def shapes_scenes(split: str, count: int, seed: int) -> list[shapes.Scene]:
  """`count` distinct scenes of a split, half with one object and half with two."""
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  scenes = []
  for objects, k in ((1, count // 2), (2, count - count // 2)):
    pool = [s for s in shapes.all_scenes(split) if len(s.objects) == objects]
    if k > len(pool):
      raise ValueError(f"--num_captions {count} needs {k} {split} scenes with {objects} "
                       f"object(s); the grammar has {len(pool)}")
    scenes += [pool[i] for i in np.sort(rng.choice(len(pool), k, replace=False))]
  return scenes


def emoji_prompts(entries: Sequence[emoji.EmojiEntry], count: int, seed: int
                  ) -> dict[str, list[emoji.EmojiEntry]]:
  """Per split, `count` entries: held-out variants, and training entries of the same families
  (so both choose among the same kind of variant sets)."""
  families = {e.family for e in entries if e.heldout}
  pools = {"heldout": [e for e in entries if e.heldout],
           "train": [e for e in entries if not e.heldout and e.family in families]}
  chosen = {}
  for split, pool in pools.items():
    if count > len(pool):
      raise ValueError(f"--num_captions {count}: only {len(pool)} {split} emoji to choose from")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    chosen[split] = [pool[i] for i in np.sort(rng.choice(len(pool), count, replace=False))]
  return chosen


# ---------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------


def draw_images(models: dict, captions: Sequence[str], per_caption: int,
                settings: SampleSettings, seed: int, batch_size: int
                ) -> tuple[np.ndarray, list[bool]]:
  """uint8[captions, per_caption, res, res, 3] samples, and which captions were truncated."""
  config, tokenizer = models["config"], models["tokenizer"]
  ids, truncated = zip(*(tokenizer.encode(c) for c in captions))
  for caption, cut in zip(captions, truncated):
    if cut:
      logging.warning("caption %r is longer than %d text tokens: truncated", caption,
                      tokenizer.text_len)
  text = np.stack(ids)
  total = len(captions) * per_caption
  batch = min(batch_size, total)
  devices = jax.local_devices()
  mesh = sharding.make_mesh(devices=devices) if batch % len(devices) == 0 else None
  place = (lambda x: x) if mesh is None else (
      lambda x: jax.device_put(x, sharding.replicated(mesh)))
  params, dvae_params = place(models["params"]), place(models["dvae_params"])
  sample = sampling.make_sampler(config, models["dvae_config"], mesh,
                                 guided=float(settings.guidance) != 1.0)
  root = jax.random.key(seed)
  prime = jnp.zeros((batch, config.image_size, config.image_size), jnp.int32)
  images = []
  for start in range(0, total, batch):
    # Past the end the last sample again: every call has one shape, so one compilation.
    index = np.minimum(np.arange(start, start + batch), total - 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(index))
    drawn, _ = sample(params, dvae_params, jnp.asarray(text[index // per_caption]), keys,
                      settings, prime)
    images.append(np.asarray(drawn)[:min(batch, total - start)])
  images = np.concatenate(images)
  return images.reshape(len(captions), per_caption, *images.shape[1:]), list(truncated)


def keep_best(reranker: rerank.TrainedReranker, captions: Sequence[str], images: np.ndarray,
              keep: int, batch_size: int) -> np.ndarray:
  """uint8[captions, candidates, ...] -> the `keep` candidates per caption the reranker scores
  highest, best first: uint8[captions, keep, ...]."""
  count, candidates = images.shape[:2]
  ids = np.stack([reranker.tokenizer.encode(c)[0] for c in captions])
  flat = images.reshape(count * candidates, *images.shape[2:])
  text = np.repeat(ids, candidates, axis=0)
  scores = np.concatenate([reranker.score(flat[i:i + batch_size], text[i:i + batch_size])
                           for i in range(0, len(flat), batch_size)])
  best = np.asarray(rerank.rerank(scores.reshape(count, candidates), keep))
  return np.take_along_axis(images, best.reshape(count, keep, 1, 1, 1), axis=1)


def reconstructor(models: dict) -> Callable[[np.ndarray], np.ndarray]:
  """uint8[N, res, res, 3] -> the dVAE's reconstructions: what perfect codes would decode to."""
  config, params = models["dvae_config"], models["dvae_params"]
  roundtrip = jax.jit(lambda p, x: dvae.decode(config, p, dvae.encode(config, p, x)))
  return lambda images: np.asarray(roundtrip(params, jnp.asarray(images)))


# ---------------------------------------------------------------------------------------------
# Judging.
# ---------------------------------------------------------------------------------------------


def _failed(verdict: dict[str, bool]) -> str:
  wrong = [a for a, ok in verdict.items() if a != "all" and not ok]
  return "ok" if not wrong else "x: " + ", ".join(wrong)


def judge_shapes_samples(scenes: Sequence[shapes.Scene], images: np.ndarray
                         ) -> tuple[dict, list[str]]:
  """Every sample judged: `zero_shot.summarize` with the verdicts per caption, and a label per
  image."""
  per_caption, labels, verdicts = [], [], []
  for scene, samples in zip(scenes, images):
    judged = [zero_shot.judge_shapes(image, scene) for image in samples]
    verdicts += judged
    labels += [_failed(v) for v in judged]
    per_caption.append({"caption": shapes.canonical_caption(scene),
                        "accuracy": float(np.mean([v["all"] for v in judged])),
                        "verdicts": judged})
  summary = zero_shot.summarize(verdicts)
  summary["captions"] = per_caption
  return summary, labels


def judge_shapes_split(scenes: Sequence[shapes.Scene], images: np.ndarray, seed: int,
                       chance_draws: int, reconstruct: Callable[[np.ndarray], np.ndarray]
                       ) -> tuple[dict, list[str]]:
  """The split's summary with its chance level and ceilings, and a label per image.

  Ceilings: a jittered ground-truth render of each caption judged as drawn (the judge's own
  accuracy) and through the dVAE (the most a transformer can get with this dVAE).
  """
  resolution = images.shape[2]
  summary, labels = judge_shapes_samples(scenes, images)
  summary["chance"] = zero_shot.shapes_chance(scenes, resolution, chance_draws, seed)
  summary["chance"]["method"] = zero_shot.CHANCE_METHOD
  rng = np.random.default_rng(seed)
  truths = np.stack([shapes.render_scene(s, resolution, rng) for s in scenes])
  for name, pictures in (("judge_on_ground_truth", truths),
                         ("judge_on_dvae_reconstructions", reconstruct(truths))):
    summary[name] = zero_shot.summarize(
        [zero_shot.judge_shapes(p, s) for p, s in zip(pictures, scenes)])
  return summary, labels


def family_renders(chosen: Sequence[emoji.EmojiEntry],
                   families: dict[str, tuple[emoji.EmojiEntry, ...]], resolution: int
                   ) -> dict[str, np.ndarray]:
  """Each chosen entry's family drawn: family -> uint8[members, res, res, 3]."""
  return {family: np.stack([emoji.render_emoji(m.sequence, resolution)
                            for m in families[family]])
          for family in dict.fromkeys(e.family for e in chosen)}


def judge_emoji_samples(chosen: Sequence[emoji.EmojiEntry], images: np.ndarray,
                        families: dict[str, tuple[emoji.EmojiEntry, ...]],
                        renders: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Variant retrieval over each entry's family (`renders`, from `family_renders`) and over its
  skin tones, with chance levels, and a label per image."""
  right, tone_right, chance, tone_chance, labels, per_caption = [], [], [], [], [], []
  for entry, samples in zip(chosen, images):
    members = families[entry.family]
    variants, own = renders[entry.family], members.index(entry)
    nearest = [zero_shot.nearest_variant(image, variants) for image in samples]
    right += [n == own for n in nearest]
    chance += [1 / len(members)] * len(samples)
    labels += ["ok" if n == own else f"x: {members[n].variant or 'default'}" for n in nearest]
    tones = zero_shot.tone_siblings(entry, members)
    if tones:
      tone_variants = variants[[members.index(t) for t in tones]]
      tone_right += [zero_shot.nearest_variant(image, tone_variants) == tones.index(entry)
                     for image in samples]
      tone_chance += [1 / len(tones)] * len(samples)
    per_caption.append({"caption": entry.name, "family_size": len(members),
                        "accuracy": float(np.mean([n == own for n in nearest])),
                        "nearest": [members[n].name for n in nearest]})
  summary = {"accuracy": _mean(right), "count": len(right), "chance": {"accuracy": _mean(chance)},
             "tone_accuracy": _mean(tone_right), "tone_count": len(tone_right),
             "tone_chance": _mean(tone_chance), "captions": per_caption}
  return summary, labels


def judge_emoji_split(chosen: Sequence[emoji.EmojiEntry], images: np.ndarray,
                      families: dict[str, tuple[emoji.EmojiEntry, ...]],
                      reconstruct: Callable[[np.ndarray], np.ndarray], *,
                      renders: dict[str, np.ndarray] | None = None) -> tuple[dict, list[str]]:
  """`judge_emoji_samples`, and the ceiling: how often the dVAE's reconstruction of the true
  image retrieves itself. `renders`: `family_renders` of `chosen`, if already drawn."""
  if renders is None:
    renders = family_renders(chosen, families, images.shape[2])
  summary, labels = judge_emoji_samples(chosen, images, families, renders)
  own = [renders[e.family][families[e.family].index(e)] for e in chosen]
  summary["dvae_reconstruction_accuracy"] = _mean(
      [zero_shot.nearest_variant(r, renders[e.family]) == families[e.family].index(e)
       for e, r in zip(chosen, reconstruct(np.stack(own)))])
  return summary, labels


def _mean(xs: Sequence[float]) -> float:
  return float(np.mean(xs)) if xs else 0.0


# ---------------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------------


def evaluate(transformer_workdir: str, dataset: str = "shapes", *, num_captions: int = 32,
             samples_per_caption: int = 4, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, guidance: float = 1.0, seed: int = 0, batch_size: int = 16,
             step: int | None = None, ema: bool = True, dvae_workdir: str | None = None,
             tokenizer_dir: str | None = None, chance_draws: int = 4,
             candidates: int = 0, reranker_workdir: str | None = None,
             grid_path: str | None = None, models: dict | None = None) -> dict[str, Any]:
  """Samples for held-out and training captions, judged; returns the JSON-able results.

  With `candidates` > 0 each caption gets that many samples, the `reranker_workdir` run keeps
  the `samples_per_caption` best (the paper's reranking), and each split's summary also holds
  `without_reranking`: every candidate judged. `models` (from `load_models`) skips loading;
  `grid_path` writes a PNG grid of the (kept) samples.
  """
  if dataset not in DATASETS:
    raise ValueError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
  if temperature <= 0 or not 0 < top_p <= 1 or min(num_captions, samples_per_caption) < 1:
    raise ValueError("need temperature > 0, 0 < top_p <= 1, num_captions and "
                     "samples_per_caption >= 1")
  if candidates and (candidates < samples_per_caption or not reranker_workdir):
    raise ValueError(f"reranking {candidates} candidates needs at least samples_per_caption "
                     f"({samples_per_caption}) of them and a reranker's workdir")
  reranker = rerank.TrainedReranker(reranker_workdir) if candidates else None
  models = models or load_models(transformer_workdir, step, ema, dvae_workdir, tokenizer_dir)
  if dataset == "shapes":
    chosen = {split: shapes_scenes(split, num_captions, seed) for split in SPLITS}
    captions = {split: [shapes.canonical_caption(s) for s in chosen[split]] for split in SPLITS}
  else:
    entries = emoji.load_emoji_entries()
    families = emoji.group_by_family(entries)
    chosen = emoji_prompts(entries, num_captions, seed)
    captions = {split: [e.name for e in chosen[split]] for split in SPLITS}
  settings = SampleSettings(temperature=jnp.float32(temperature), top_k=jnp.int32(top_k),
                            top_p=jnp.float32(top_p), guidance=jnp.float32(guidance))
  everything = captions["heldout"] + captions["train"]
  drawn, truncated = draw_images(models, everything, candidates or samples_per_caption,
                                 settings, seed, batch_size)
  images = drawn if reranker is None else keep_best(reranker, everything, drawn,
                                                    samples_per_caption, batch_size)
  split_images = {"heldout": images[:num_captions], "train": images[num_captions:]}

  results: dict[str, Any] = {
      "dataset": dataset, "transformer_workdir": transformer_workdir, "step": step, "ema": ema,
      "dvae_workdir": models["dvae_workdir"], "seed": seed, "batch_size": batch_size,
      "settings": {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "guidance": guidance},
      "num_captions": num_captions, "samples_per_caption": samples_per_caption,
      "candidates": candidates, "reranker_workdir": reranker_workdir,
      "resolution": int(images.shape[2]), "truncated_captions": int(sum(truncated)),
  }
  labels, reconstruct = [], reconstructor(models)
  renders = {split: family_renders(chosen[split], families, int(images.shape[2]))
             for split in SPLITS} if dataset == "emoji" else {}  # drawn once, judged twice

  def judge(split: str, samples: np.ndarray) -> tuple[dict, list[str]]:
    if dataset == "shapes":
      return judge_shapes_split(chosen[split], samples, seed, chance_draws, reconstruct)
    return judge_emoji_split(chosen[split], samples, families, reconstruct,
                             renders=renders[split])

  def judge_candidates(split: str, samples: np.ndarray) -> dict:
    """Every candidate: the samples' figures only (chance and ceilings do not change)."""
    if dataset == "shapes":
      every = judge_shapes_samples(chosen[split], samples)[0]
    else:
      every = judge_emoji_samples(chosen[split], samples, families, renders[split])[0]
    return {k: every[k] for k in UNRERANKED_KEYS if k in every}

  for split, offset in zip(SPLITS, (0, num_captions)):
    summary, split_labels = judge(split, split_images[split])
    if reranker is not None:
      summary["without_reranking"] = judge_candidates(split, drawn[offset:offset + num_captions])
    results[split], labels = summary, labels + split_labels
  results.update({"heldout_accuracy": results["heldout"]["accuracy"],
                  "train_accuracy": results["train"]["accuracy"],
                  "chance_accuracy": results["heldout"]["chance"]["accuracy"]})
  if grid_path:
    names = [f"{'[held out] ' if i < num_captions else ''}{c}"
             for i, c in enumerate(everything) for _ in range(samples_per_caption)]
    marked = [i < num_captions * samples_per_caption for i in range(len(names))]
    grid = image_grid.captioned_grid(images.reshape(-1, *images.shape[2:]),
                                     [f"{n} ({v})" for n, v in zip(names, labels)],
                                     columns=samples_per_caption, marked=marked)
    _make_parent(grid_path)
    grid.save(grid_path)
    results["grid"] = grid_path
  return results


def _make_parent(path: str) -> None:
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)


def report(results: dict[str, Any]) -> str:
  """A few lines for the terminal."""
  lines = [f"{results['dataset']}: {results['num_captions']} captions x "
           f"{results['samples_per_caption']} samples per split"]
  for split in SPLITS:
    r = results[split]
    line = f"  {split:8s} accuracy {r['accuracy']:.3f}  chance {r['chance']['accuracy']:.3f}"
    if "without_reranking" in r:
      line += f"  (all {results['candidates']} candidates {r['without_reranking']['accuracy']:.3f})"
    if "attributes" in r:
      line += "  " + " ".join(f"{a} {v:.2f}" for a, v in r["attributes"].items())
      line += (f"  (ground truth {r['judge_on_ground_truth']['accuracy']:.2f}, through the "
               f"dVAE {r['judge_on_dvae_reconstructions']['accuracy']:.2f})")
    else:
      line += (f"  tones {r['tone_accuracy']:.3f} (chance {r['tone_chance']:.3f})  "
               f"(true images through the dVAE {r['dvae_reconstruction_accuracy']:.2f})")
    lines.append(line)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The script. Flags are defined only when run as one: demo.py imports `evaluate` and has its
# own --out and --samples_per_caption.
# ---------------------------------------------------------------------------------------------


def define_flags() -> None:
  flags.DEFINE_string("transformer_workdir", None, "A train_transformer.py workdir.",
                      required=True)
  flags.DEFINE_enum("dataset", "shapes", DATASETS, "Which captions and which judge.")
  flags.DEFINE_integer("num_captions", 32, "Captions per split (held-out and training).",
                       lower_bound=1)
  flags.DEFINE_integer("samples_per_caption", 4, "Images drawn per caption.", lower_bound=1)
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).")
  flags.DEFINE_integer("top_k", 0, "Keep the k likeliest codes; 0: all.", lower_bound=0)
  flags.DEFINE_float("top_p", 1.0, "Nucleus: keep codes up to this mass; 1: all.")
  flags.DEFINE_float("guidance", 1.0, "Classifier-free guidance scale; 1: off.")
  flags.DEFINE_integer("seed", 0, "Picks the captions and the samples' keys.")
  flags.DEFINE_integer("batch_size", 16, "Samples per compiled call.", lower_bound=1)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("raw_params", False, "Use the raw parameters, not the EMA.")
  flags.DEFINE_string("dvae_workdir", None, "Default: the run config's data.dvae_workdir.")
  flags.DEFINE_string("tokenizer_dir", None, "Default: the run config's data.tokenizer_dir.")
  flags.DEFINE_integer("candidates", 0, "Rerank: draw this many per caption and judge the "
                       "--samples_per_caption best by the --reranker; 0: no reranking.",
                       lower_bound=0)
  flags.DEFINE_string("reranker", None, "With --candidates: a train_reranker.py workdir.")
  flags.DEFINE_integer("chance_draws", 4, "shapes: random training images judged per caption "
                       "for the chance level.", lower_bound=1)
  flags.DEFINE_string("out", "zero_shot.json", "Where the results JSON goes.")
  flags.DEFINE_string("grid", None, "Optional PNG of every sample, held-out captions framed red.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  f = flags.FLAGS
  results = evaluate(
      f.transformer_workdir, f.dataset, num_captions=f.num_captions,
      samples_per_caption=f.samples_per_caption, temperature=f.temperature, top_k=f.top_k,
      top_p=f.top_p, guidance=f.guidance, seed=f.seed, batch_size=f.batch_size, step=f.step,
      ema=not f.raw_params, dvae_workdir=f.dvae_workdir, tokenizer_dir=f.tokenizer_dir,
      chance_draws=f.chance_draws, candidates=f.candidates, reranker_workdir=f.reranker,
      grid_path=f.grid)
  _make_parent(f.out)
  with open(f.out, "w", encoding="utf-8") as out:
    json.dump(results, out, indent=2)
    out.write("\n")
  print(report(results))
  print(f"wrote {f.out}" + (f" and {f.grid}" if f.grid else ""))


if __name__ == "__main__":
  define_flags()
  app.run(main)
