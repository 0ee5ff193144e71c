"""Zero-shot evaluation: do samples for held-out captions show what the captions say?

    gen = generate.Generator.load("runs/transformer", reranker="runs/reranker")
    results = zero_shot.evaluate(gen, "shapes", num_captions=48, samples_per_caption=2,
                                 candidates=8)
    print(zero_shot.report(results))

Draws `samples_per_caption` images for `num_captions` held-out captions and as many training
captions, and judges them with `dalle_jax/evaluation/judge.py`:

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
`fold_in(key(seed), g)`. With `candidates=N` each caption gets N samples and the generator's
reranker keeps the `samples_per_caption` it scores best, as the paper reranks; each split's
summary then also holds the figures over all N (`without_reranking`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import generate, image_grid
from dalle_jax.data import emoji, shapes
from dalle_jax.dvae import model as dvae
from dalle_jax.evaluation import judge

DATASETS = ("shapes", "emoji")
SPLITS = ("heldout", "train")
UNRERANKED_KEYS = ("accuracy", "count", "attributes", "tone_accuracy", "tone_count")

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
      raise generate.GenerationError(f"num_captions {count} needs {k} {split} scenes with "
                                     f"{objects} object(s); the grammar has {len(pool)}")
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
      raise generate.GenerationError(f"num_captions {count}: only {len(pool)} {split} emoji to "
                                     "choose from")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    chosen[split] = [pool[i] for i in np.sort(rng.choice(len(pool), count, replace=False))]
  return chosen


# ---------------------------------------------------------------------------------------------
# Judging.
# ---------------------------------------------------------------------------------------------


def reconstructor(gen: generate.Generator) -> Callable[[np.ndarray], np.ndarray]:
  """uint8[N, res, res, 3] -> the dVAE's reconstructions: what perfect codes would decode to."""
  config = gen.dvae_config
  roundtrip = jax.jit(lambda p, x: dvae.decode(config, p, dvae.encode(config, p, x)))
  return lambda images: np.asarray(roundtrip(gen.dvae_params, jnp.asarray(images)))


def _failed(verdict: dict[str, bool]) -> str:
  wrong = [a for a, ok in verdict.items() if a != "all" and not ok]
  return "ok" if not wrong else "x: " + ", ".join(wrong)


def judge_shapes_samples(scenes: Sequence[shapes.Scene], images: np.ndarray
                         ) -> tuple[dict, list[str]]:
  """Every sample judged: `judge.summarize` with the verdicts per caption, and a label per
  image."""
  per_caption, labels, verdicts = [], [], []
  for scene, samples in zip(scenes, images):
    judged = [judge.judge_shapes(image, scene) for image in samples]
    verdicts += judged
    labels += [_failed(v) for v in judged]
    per_caption.append({"caption": shapes.canonical_caption(scene),
                        "accuracy": float(np.mean([v["all"] for v in judged])),
                        "verdicts": judged})
  summary = judge.summarize(verdicts)
  summary["captions"] = per_caption
  return summary, labels


def judge_shapes_split(scenes: Sequence[shapes.Scene], images: np.ndarray, seed: int,
                       chance_draws: int, reconstruct: Callable[[np.ndarray], np.ndarray]
                       ) -> tuple[dict, list[str]]:
  """The split's summary with its chance level and ceilings, and a label per image.

  Ceilings: a jittered ground-truth render of each caption judged as drawn (the judge's own
  accuracy) and through the dVAE (the most a transformer can get with this dVAE), each with
  `judge.shapes_kept`.
  """
  resolution = images.shape[2]
  summary, labels = judge_shapes_samples(scenes, images)
  summary["chance"] = judge.shapes_chance(scenes, resolution, chance_draws, seed)
  summary["chance"]["method"] = judge.CHANCE_METHOD
  rng = np.random.default_rng(seed)
  truths = np.stack([shapes.render_scene(s, resolution, rng) for s in scenes])
  for name, pictures in (("judge_on_ground_truth", truths),
                         ("judge_on_dvae_reconstructions", reconstruct(truths))):
    summary[name] = judge.summarize(
        [judge.judge_shapes(p, s) for p, s in zip(pictures, scenes)])
    summary[name]["shapes_kept"] = judge.shapes_kept(scenes, pictures)
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
    nearest = [judge.nearest_variant(image, variants) for image in samples]
    right += [n == own for n in nearest]
    chance += [1 / len(members)] * len(samples)
    labels += ["ok" if n == own else f"x: {members[n].variant or 'default'}" for n in nearest]
    tones = judge.tone_siblings(entry, members)
    if tones:
      tone_variants = variants[[members.index(t) for t in tones]]
      tone_right += [judge.nearest_variant(image, tone_variants) == tones.index(entry)
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
      [judge.nearest_variant(r, renders[e.family]) == families[e.family].index(e)
       for e, r in zip(chosen, reconstruct(np.stack(own)))])
  return summary, labels


def _mean(xs: Sequence[float]) -> float:
  return float(np.mean(xs)) if xs else 0.0


# ---------------------------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------------------------


def evaluate(gen: generate.Generator, dataset: str = "shapes", *, num_captions: int = 32,
             samples_per_caption: int = 4, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, guidance: float = 1.0, seed: int = 0, batch_size: int = 16,
             chance_draws: int = 4, candidates: int = 0, grid_path: str | None = None,
             progress: bool = True) -> dict[str, Any]:
  """Samples for held-out and training captions, judged; returns the JSON-able results.

  With `candidates` > 0 each caption gets that many samples, the generator's reranker keeps the
  `samples_per_caption` best (the paper's reranking), and each split's summary also holds
  `without_reranking`: every candidate judged. `grid_path` writes a PNG grid of the (kept)
  samples, held-out captions framed red.
  """
  if dataset not in DATASETS:
    raise generate.GenerationError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if min(num_captions, samples_per_caption) < 1:
    raise generate.GenerationError("num_captions and samples_per_caption must be >= 1")
  if candidates and (candidates < samples_per_caption or not gen.has_reranker):
    raise generate.GenerationError(
        f"reranking {candidates} candidates needs at least samples_per_caption "
        f"({samples_per_caption}) of them and a reranker (Generator.load(reranker=...), "
        "--reranker)")
  if dataset == "shapes":
    chosen = {split: shapes_scenes(split, num_captions, seed) for split in SPLITS}
    captions = {split: [shapes.canonical_caption(s) for s in chosen[split]] for split in SPLITS}
  else:
    entries = emoji.load_emoji_entries()
    families = emoji.group_by_family(entries)
    chosen = emoji_prompts(entries, num_captions, seed)
    captions = {split: [e.name for e in chosen[split]] for split in SPLITS}
  everything = captions["heldout"] + captions["train"]
  # With a reranker every candidate comes back, best first: the kept ones lead each row.
  drawn = gen.generate(everything, num_candidates=candidates or samples_per_caption,
                       temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance,
                       seed=seed, progress=progress, batch_size=batch_size)
  images = drawn.images[:, :samples_per_caption]
  split_images = {"heldout": images[:num_captions], "train": images[num_captions:]}

  results: dict[str, Any] = {
      "dataset": dataset, "seed": seed, "batch_size": batch_size,
      "settings": {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "guidance": guidance},
      "num_captions": num_captions, "samples_per_caption": samples_per_caption,
      "candidates": candidates, "resolution": int(images.shape[2]),
      "truncated_captions": int(sum(drawn.truncated)),
  }
  labels, reconstruct = [], reconstructor(gen)
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
    if candidates:
      summary["without_reranking"] = judge_candidates(
          split, drawn.images[offset:offset + num_captions])
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
    if os.path.dirname(grid_path):
      os.makedirs(os.path.dirname(grid_path), exist_ok=True)
    grid.save(grid_path)
    results["grid"] = grid_path
  return results


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
