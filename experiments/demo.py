"""The main job: from nothing to captioned samples in one command (`make demo`).

  python experiments/demo.py --out=demo_out                   # shapes, about 15 minutes on 2 cores
  python experiments/demo.py --out=demo_out --steps_scale=4   # longer runs, better samples
  python experiments/demo.py --out=demo_emoji --dataset=emoji # emoji at 32x32, half an hour

Runs every stage's script in turn, each in its own workdir under `--out/work` (so a killed demo
started again resumes where it stopped: every stage resumes or skips finished work):

  train_tokenizer.py -> train_dvae.py -> encode_dataset.py (train and held-out splits)
  -> train_reranker.py (emoji) -> train_transformer.py -> sample.py (held-out and training
  captions, reranked) -> eval_zero_shot.py (shapes: the share of samples with every captioned
  attribute; emoji: the share nearest to their own variant among the family's renders; reranking
  keeps 2 of 8 candidates per caption, as the paper reranks, and the figure over all 8 is kept
  too; both sample at the dataset's classifier-free guidance, 3 for emoji, or --guidance)

Shapes reranks without a reranker run: the transformer scores each candidate against its
caption's near misses (dalle_jax/transformer/caption_contrast.py), which picks shapes better than
the CLIP-style reranker the emoji demo trains.

and writes into `--out`: samples.png (captioned grid; held-out captions framed in red),
reconstructions.png (dVAE input beside output), loss_curves.png, zero_shot.png (judged samples)
and metrics.json. What differs between the datasets is one entry of `PLANS`; each stage's length
is its config's train.num_steps, times --steps_scale.
"""

import dataclasses
import json
import os
import shutil
import sys
import time
import types
from typing import Callable

from absl import app, flags
import numpy as np
from PIL import Image

from dalle_jax import image_grid, plots
from dalle_jax.data import code_shards
from dalle_jax.data import emoji, shapes
from dalle_jax.train import launch

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.configs import (  # noqa: E402
    dvae_emoji32, dvae_shapes, reranker_emoji32, transformer_emoji32,
    transformer_shapes)

FLAGS = flags.FLAGS  # defined by define_flags(), below
HERE = os.path.dirname(os.path.abspath(__file__))


def run(stage: str, script: str, *args: str, timings: dict) -> None:
  """Runs one stage's script with this interpreter; its progress bars go to the terminal.

  It inherits the huge-page malloc that `launch.run` restarted this process with."""
  print(f"\n=== {stage}: {script} {' '.join(args)}", flush=True)
  start = time.time()
  launch.run_stage([sys.executable, os.path.join(HERE, script), *args])
  timings[stage] = round(timings.get(stage, 0.0) + time.time() - start, 1)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def unigram_entropy(codes: np.ndarray, vocab: int) -> float:
  """Entropy (nats) of the image codes' frequencies: the loss of a model that ignores context."""
  p = np.bincount(codes.reshape(-1), minlength=vocab) / codes.size
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------
# What differs per dataset: one entry of PLANS each.
# ---------------------------------------------------------------------------------------------


def shapes_captions() -> tuple[list[str], list[bool]]:
  """Captions to draw: held-out colour-shape compositions first, then training ones."""
  by_pair = {}  # (colour, shape) -> its one-object scenes, for one caption per pair
  for split in ("heldout", "train"):
    for scene in shapes.all_scenes(split):
      if len(scene.objects) == 1:
        by_pair.setdefault(split, {}).setdefault(scene.objects[0][1:], []).append(scene)
  pick = lambda split, stride, count: [  # positions and sizes vary from pair to pair
      shapes.canonical_caption(scenes[7 * i % len(scenes)])
      for i, scenes in enumerate(list(by_pair[split].values())[::stride][:count])]
  heldout, train = pick("heldout", 1, 5), pick("train", 7, 3)
  return heldout + train, [True] * len(heldout) + [False] * len(train)


def emoji_captions() -> tuple[list[str], list[bool]]:
  """Captions to draw: the held-out skin tone of five families (their other tones are trained),
  then a trained tone of the first three, to compare."""
  entries = emoji.load_emoji_entries()
  families = emoji.group_by_family(entries)
  toned = {}  # family -> its first held-out entry that differs by a skin tone alone
  for entry in entries:
    if entry.heldout and entry.variant in emoji.SKIN_TONES:
      toned.setdefault(entry.family, entry)
  picked = list(toned.values())
  heldout = [picked[i] for i in np.linspace(0, len(picked) - 1, 5).astype(int)]
  train = [next(m for m in families[e.family] if not m.heldout and m.variant in emoji.SKIN_TONES)
           for e in heldout[:3]]
  return [e.name for e in heldout + train], [True] * len(heldout) + [False] * len(train)


def shapes_tokenizer_flags(work: str) -> list[str]:
  """train_tokenizer.py draws 20,000 shapes captions itself."""
  del work
  return ["--dataset=shapes", "--num_captions=20000", "--vocab_size=400", "--text_len=24"]


def emoji_tokenizer_flags(work: str) -> list[str]:
  """Writes the training split's names for train_tokenizer.py: held-out names stay unseen."""
  path = os.path.join(work, "emoji_train_captions.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(e.name + "\n" for e in emoji.load_emoji_entries() if not e.heldout))
  # 768 pieces split the longest name ("couple with heart: woman, man, medium-dark skin tone,
  # medium-light skin tone") into 19, and BPE-dropout into at most 21: 24 positions hold any.
  return [f"--captions_file={path}", "--vocab_size=768", "--text_len=24"]


def without_reranking(results: dict) -> dict:
  """Each split's accuracy over every candidate drawn, when eval_zero_shot.py reranked."""
  return {f"{split}_accuracy_without_reranking": results[split]["without_reranking"]["accuracy"]
          for split in ("heldout", "train") if "without_reranking" in results[split]}


def shapes_summary(results: dict) -> dict:
  """The headline figures of eval_zero_shot.py's JSON: all attributes right, per split."""
  return {**without_reranking(results), "heldout_accuracy": results["heldout_accuracy"],
          "train_accuracy": results["train_accuracy"],
          "chance_accuracy": results["chance_accuracy"],
          "heldout_attributes": results["heldout"]["attributes"],
          "dvae_ceiling": results["heldout"]["judge_on_dvae_reconstructions"]["accuracy"],
          "images_per_split": results["heldout"]["count"]}


def emoji_summary(results: dict) -> dict:
  """The headline figures of eval_zero_shot.py's JSON: the own variant retrieved, per split."""
  held = results["heldout"]
  return {**without_reranking(results), "heldout_accuracy": results["heldout_accuracy"],
          "train_accuracy": results["train_accuracy"],
          "chance_accuracy": results["chance_accuracy"],
          "heldout_tone_accuracy": held["tone_accuracy"],
          "tone_chance_accuracy": held["tone_chance"],
          "dvae_ceiling": held["dvae_reconstruction_accuracy"],
          "images_per_split": held["count"]}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the demo does differently per dataset."""
  tokenizer_flags: Callable[[str], list[str]]  # the work dir -> train_tokenizer.py's data flags
  # Stage -> its config module in experiments/configs ("dvae", "transformer" and, without
  # near_misses, "reranker"): the file its script runs, and the stage's length at
  # --steps_scale=1 (train.num_steps).
  configs: dict[str, types.ModuleType]
  encode_counts: dict[str, int | None]  # split -> encode_dataset.py --num_examples (None: all)
  captions: Callable[[], tuple[list[str], list[bool]]]  # for samples.png, and which are held out
  zero_shot_summary: Callable[[dict], dict]  # eval_zero_shot.py's JSON -> metrics.json's part
  guidance: float = 1.0  # classifier-free guidance scale of the samples and of the zero-shot judge
  temperature: float = 1.0  # sampling temperature of the samples and of the zero-shot judge
  # Rerank by caption contrast against these near misses (caption_contrast.NEAR_MISSES) instead
  # of a trained reranker.
  near_misses: str | None = None


PLANS = {
    # Its configs' lengths fit the whole demo in 15 minutes on 2 cores.
    "shapes": Plan(
        tokenizer_flags=shapes_tokenizer_flags,
        configs={"dvae": dvae_shapes, "transformer": transformer_shapes},
        encode_counts={"train": 20_000, "heldout": 512}, captions=shapes_captions,
        zero_shot_summary=shapes_summary, near_misses="shapes",
        # A short run's codes are noisy at 1: 0.7 takes held-out drawn 0.38 -> 0.45 and reranked
        # 0.45 -> 0.47; 0.5 loses diversity (0.43, 0.45; 96 captions, seed 1).
        temperature=0.7),
    "emoji": Plan(
        tokenizer_flags=emoji_tokenizer_flags,
        configs={"dvae": dvae_emoji32, "reranker": reranker_emoji32,
                 "transformer": transformer_emoji32},
        encode_counts={"train": None, "heldout": None}, captions=emoji_captions,
        zero_shot_summary=emoji_summary,
        # The held-out tones are a weak conditional signal against 3,172 memorised images: guidance
        # 3 takes held-out tone retrieval from 0.58 to 0.665 (96 captions). On shapes it does not
        # help (3: every attribute right 0.33 against 0.56).
        guidance=3.0),
}


def stage_steps(plan: Plan, scales: dict[str, float]) -> dict[str, int]:
  """Each stage's training steps: its config's train.num_steps times the stage's scale."""
  return {stage: max(1, round(config.get_config().train.num_steps * scales[stage]))
          for stage, config in plan.configs.items()}


def check_dataset(work: str, dataset: str) -> None:
  """Records which dataset `work` holds; refuses to resume another's stages in it."""
  marker = os.path.join(work, "dataset")
  held = dataset
  if os.path.exists(marker):
    with open(marker) as f:
      held = f.read().strip()
  if held != dataset:
    raise app.UsageError(f"{work} holds the {held} demo's stages: pass another --out for "
                         f"--dataset={dataset}")
  os.makedirs(work, exist_ok=True)
  with open(marker, "w") as f:
    f.write(dataset + "\n")


def main(argv):
  del argv
  plan = PLANS[FLAGS.dataset]
  out = os.path.abspath(FLAGS.out)
  work = os.path.join(out, "work")
  check_dataset(work, FLAGS.dataset)
  dvae_scale = FLAGS.dvae_steps_scale
  scales = {"dvae": FLAGS.steps_scale if dvae_scale is None else dvae_scale,
            "reranker": FLAGS.steps_scale, "transformer": FLAGS.steps_scale}
  steps = stage_steps(plan, scales)
  config_file = {stage: config.__file__ for stage, config in plan.configs.items()}
  path = lambda *p: os.path.join(work, *p)
  guidance = plan.guidance if FLAGS.guidance is None else FLAGS.guidance
  timings = {}

  run("tokenizer", "train_tokenizer.py", *plan.tokenizer_flags(work),
      f"--out_dir={path('tokenizer')}", timings=timings)
  # The dVAE's schedules (tau, beta, learning rate) stretch with its steps.
  dvae_train = plan.configs["dvae"].get_config().train
  run("dvae", "train_dvae.py", f"--config={config_file['dvae']}",
      f"--workdir={path('dvae')}", f"--config.train.num_steps={steps['dvae']}",
      f"--config.train.schedule_scale={dvae_train.schedule_scale * scales['dvae']}",
      timings=timings)
  for split, count in plan.encode_counts.items():
    run(f"encode_{split}", "encode_dataset.py", f"--dvae_workdir={path('dvae')}",
        f"--dataset={FLAGS.dataset}", f"--split={split}",
        *([f"--num_examples={count}"] if count else []),
        f"--out_dir={path('codes_' + split)}", "--batch_size=128", "--shard_size=4096",
        timings=timings)
  if plan.near_misses:
    rerank = [f"--near_misses={plan.near_misses}"]
  else:
    rerank = [f"--reranker={path('reranker')}"]
    run("reranker", "train_reranker.py", f"--config={config_file['reranker']}",
        f"--workdir={path('reranker')}", f"--config.train.num_steps={steps['reranker']}",
        f"--config.data.tokenizer_dir={path('tokenizer')}", timings=timings)
  run("transformer", "train_transformer.py", f"--config={config_file['transformer']}",
      f"--workdir={path('transformer')}", f"--config.train.num_steps={steps['transformer']}",
      f"--config.data.codes_dir={path('codes_train')}",
      f"--config.data.eval_codes_dir={path('codes_heldout')}",
      f"--config.data.tokenizer_dir={path('tokenizer')}",
      f"--config.data.dvae_workdir={path('dvae')}", timings=timings)

  captions, heldout = plan.captions()
  with open(path("prompts.txt"), "w") as f:
    f.write("\n".join(captions) + "\n")
  run("sample", "sample.py", f"--checkpoint={path('transformer')}",
      f"--prompts_file={path('prompts.txt')}", f"--num_samples={FLAGS.samples_per_caption}",
      f"--rerank={FLAGS.candidates}", f"--keep={FLAGS.samples_per_caption}", *rerank,
      f"--out={path('samples')}", "--batch_size=32",
      f"--guidance={guidance}", f"--temperature={plan.temperature}", timings=timings)

  run("zero_shot", "eval_zero_shot.py", f"--transformer_workdir={path('transformer')}",
      f"--dataset={FLAGS.dataset}", f"--num_captions={FLAGS.zero_shot_captions}",
      "--samples_per_caption=2", "--batch_size=32", f"--out={path('zero_shot.json')}",
      f"--candidates={FLAGS.zero_shot_candidates}", *rerank,
      f"--grid={os.path.join(out, 'zero_shot.png')}", f"--guidance={guidance}",
      f"--temperature={plan.temperature}", timings=timings)

  # ---------------------------------------------------------------- the pictures
  with open(path("samples", "samples.json")) as f:
    manifest = json.load(f)
  images, labels, marks = [], [], []
  for prompt, is_heldout in zip(manifest["prompts"], heldout):
    for sample in prompt["samples"]:
      images.append(np.asarray(Image.open(path("samples", sample["file"])).convert("RGB")))
      labels.append(prompt["prompt"] + (" (held out)" if is_heldout else ""))
      marks.append(is_heldout)
  image_grid.captioned_grid(images, labels, columns=FLAGS.samples_per_caption, tile_size=128,
                            marked=marks).save(os.path.join(out, "samples.png"))
  reconstructions = sorted(os.listdir(path("dvae", "reconstructions")),
                           key=lambda name: int(name.split("_")[1].split(".")[0]))
  shutil.copy(path("dvae", "reconstructions", reconstructions[-1]),
              os.path.join(out, "reconstructions.png"))

  dvae_log, transformer_log = read_metrics(path("dvae")), read_metrics(path("transformer"))
  train_codes = code_shards.read_all(path("codes_train"))["codes"]
  vocab = json.load(open(path("transformer", "config.json")))["model"]["image_vocab_size"]
  unigram = unigram_entropy(train_codes, vocab)
  image_curves = plots.curves_from_metrics(transformer_log, ["image_loss", "eval/image_loss"])
  image_curves["unigram baseline"] = ([0, steps["transformer"]], [unigram, unigram])
  plots.side_by_side([
      plots.line_plot(plots.curves_from_metrics(dvae_log, ["loss"]), "dVAE: loss (bits/dim)"),
      plots.line_plot(plots.curves_from_metrics(dvae_log, ["eval/psnr"]),
                      "dVAE: held-out PSNR", y_label="dB"),
      plots.line_plot(image_curves, "transformer: image-token loss (nats)"),
  ]).save(os.path.join(out, "loss_curves.png"))

  last = lambda log, key: next((r[key] for r in reversed(log) if key in r), None)
  with open(path("zero_shot.json")) as f:
    zero_shot = plan.zero_shot_summary(json.load(f))
  metrics = {
      "dataset": FLAGS.dataset,
      "steps": steps,
      "guidance": guidance,
      "temperature": plan.temperature,
      "dvae": {k: last(dvae_log, k) for k in ("eval/psnr", "eval/perplexity", "eval/codes_used")},
      "transformer": {k: last(transformer_log, k) for k in
                      ("loss", "text_loss", "image_loss", "eval/loss", "eval/text_loss",
                       "eval/image_loss")},
      "image_unigram_entropy_nats": unigram,
      "zero_shot": zero_shot,
      "seconds": timings,
      "total_minutes": round(sum(timings.values()) / 60, 1),
  }
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  print(json.dumps(metrics, indent=2))
  print(f"\nwrote {out}/samples.png, reconstructions.png, loss_curves.png, metrics.json")


# ---------------------------------------------------------------------------------------------
# The script. Flags are defined only when run as one, so that tests can import PLANS.
# ---------------------------------------------------------------------------------------------


def define_flags() -> None:
  flags.DEFINE_enum("dataset", "shapes", list(PLANS), "What the demo learns.")
  flags.DEFINE_string("out", "demo_out", "Output directory.")
  flags.DEFINE_float("steps_scale", 1.0,
                     "Multiplies every stage's training steps (and the dVAE's schedules).")
  # Shape fidelity comes from dVAE length: the dVAE is the cheap stage to stretch.
  flags.DEFINE_float("dvae_steps_scale", None,
                     "The dVAE's own --steps_scale (default: --steps_scale).", lower_bound=1e-6)
  flags.DEFINE_integer("samples_per_caption", 4, "Images shown per caption.")
  flags.DEFINE_integer("candidates", 16, "Samples drawn per caption for reranking.")
  flags.DEFINE_integer("zero_shot_captions", 48, "Captions per split (held-out, training) "
                       "judged by eval_zero_shot.py.")
  flags.DEFINE_integer("zero_shot_candidates", 8, "Samples drawn per judged caption; the "
                       "reranker keeps the best 2 (0: judge 2 unreranked).", lower_bound=0)
  flags.DEFINE_float("guidance", None, "Classifier-free guidance scale of samples.png and the "
                     "zero-shot judge (default: the dataset's; 1: off).", lower_bound=1.0)


if __name__ == "__main__":
  define_flags()
  launch.run(main)
