"""The main job: from nothing to captioned samples in one command (`make demo`).

  python experiments/demo.py --out=demo_out                   # shapes, about 15 minutes on 2 cores
  python experiments/demo.py --out=demo_out --steps_scale=4   # longer runs, better samples

Runs every stage's script in turn, each in its own workdir under `--out/work` (so a killed demo
started again resumes where it stopped: every stage resumes or skips finished work):

  train_tokenizer.py -> train_dvae.py -> encode_dataset.py (train and held-out splits)
  -> train_reranker.py -> train_transformer.py -> sample.py (held-out and training captions,
  reranked) -> eval_zero_shot.py (the share of samples with every captioned attribute)

and writes into `--out`: samples.png (captioned grid; held-out compositions framed in red),
reconstructions.png (dVAE input beside output), loss_curves.png, zero_shot.png (judged samples)
and metrics.json.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags
import numpy as np
from PIL import Image

from dalle_jax import image_grid, plots
from dalle_jax.data import codes as codes_lib
from dalle_jax.data import shapes

_OUT = flags.DEFINE_string("out", "demo_out", "Output directory.")
_STEPS_SCALE = flags.DEFINE_float("steps_scale", 1.0, "Multiplies every stage's training steps.")
_SAMPLES = flags.DEFINE_integer("samples_per_caption", 4, "Images shown per caption.")
_CANDIDATES = flags.DEFINE_integer("candidates", 16, "Samples drawn per caption for reranking.")
_ZERO_SHOT_CAPTIONS = flags.DEFINE_integer("zero_shot_captions", 48, "Captions per split "
                                           "(held-out, training) judged by eval_zero_shot.py.")

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
# Stage lengths at --steps_scale=1, chosen so that the whole demo fits 15 minutes on 2 cores.
STEPS = {"dvae": 1_500, "reranker": 600, "transformer": 1_500}
NUM_TRAIN, NUM_HELDOUT = 20_000, 512


def run(stage: str, script: str, *args: str, timings: dict) -> None:
  """Runs one stage's script with this interpreter; its progress bars go to the terminal."""
  print(f"\n=== {stage}: {script} {' '.join(args)}", flush=True)
  start = time.time()
  subprocess.run([sys.executable, os.path.join(HERE, script), *args], check=True)
  timings[stage] = round(timings.get(stage, 0.0) + time.time() - start, 1)


def demo_captions() -> tuple[list[str], list[bool]]:
  """Captions to draw: held-out colour-shape compositions first, then training ones."""
  heldout = [shapes.canonical_caption(s) for s in shapes.all_scenes("heldout")
             if len(s.objects) == 1][::37][:5]
  train = [shapes.canonical_caption(s) for s in shapes.all_scenes("train")
           if len(s.objects) == 1][::101][:3]
  return heldout + train, [True] * len(heldout) + [False] * len(train)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def unigram_entropy(codes: np.ndarray, vocab: int) -> float:
  """Entropy (nats) of the image codes' frequencies: the loss of a model that ignores context."""
  p = np.bincount(codes.reshape(-1), minlength=vocab) / codes.size
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def zero_shot_summary(path: str) -> dict:
  """The headline figures of eval_zero_shot.py's JSON: all attributes right, per split."""
  with open(path) as f:
    results = json.load(f)
  return {"heldout_accuracy": results["heldout_accuracy"],
          "train_accuracy": results["train_accuracy"],
          "chance_accuracy": results["chance_accuracy"],
          "heldout_attributes": results["heldout"]["attributes"],
          "dvae_ceiling": results["heldout"]["judge_on_dvae_reconstructions"]["accuracy"],
          "images_per_split": results["heldout"]["count"]}


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  work = os.path.join(out, "work")
  os.makedirs(work, exist_ok=True)
  steps = {k: max(1, round(v * _STEPS_SCALE.value)) for k, v in STEPS.items()}
  path = lambda *p: os.path.join(work, *p)
  timings = {}

  run("tokenizer", "train_tokenizer.py", "--dataset=shapes", "--num_captions=20000",
      "--vocab_size=400", "--text_len=24", f"--out_dir={path('tokenizer')}", timings=timings)
  run("dvae", "train_dvae.py", f"--config={CONFIGS}/dvae_shapes.py",
      f"--workdir={path('dvae')}", f"--config.train.num_steps={steps['dvae']}", timings=timings)
  for split, count in (("train", NUM_TRAIN), ("heldout", NUM_HELDOUT)):
    run(f"encode_{split}", "encode_dataset.py", f"--dvae_workdir={path('dvae')}",
        "--dataset=shapes", f"--split={split}", f"--num_examples={count}",
        f"--out_dir={path('codes_' + split)}", "--batch_size=128", "--shard_size=4096",
        timings=timings)
  run("reranker", "train_reranker.py", f"--config={CONFIGS}/reranker_small.py",
      f"--workdir={path('reranker')}", f"--config.train.num_steps={steps['reranker']}",
      f"--config.data.tokenizer_dir={path('tokenizer')}", timings=timings)
  run("transformer", "train_transformer.py", f"--config={CONFIGS}/transformer_small.py",
      f"--workdir={path('transformer')}", f"--config.train.num_steps={steps['transformer']}",
      f"--config.data.codes_dir={path('codes_train')}",
      f"--config.data.eval_codes_dir={path('codes_heldout')}",
      f"--config.data.tokenizer_dir={path('tokenizer')}",
      f"--config.data.dvae_workdir={path('dvae')}", timings=timings)

  captions, heldout = demo_captions()
  with open(path("prompts.txt"), "w") as f:
    f.write("\n".join(captions) + "\n")
  run("sample", "sample.py", f"--checkpoint={path('transformer')}",
      f"--prompts_file={path('prompts.txt')}", f"--num_samples={_SAMPLES.value}",
      f"--rerank={_CANDIDATES.value}", f"--keep={_SAMPLES.value}",
      f"--reranker={path('reranker')}", f"--out={path('samples')}", "--batch_size=32",
      timings=timings)

  run("zero_shot", "eval_zero_shot.py", f"--transformer_workdir={path('transformer')}",
      "--dataset=shapes", f"--num_captions={_ZERO_SHOT_CAPTIONS.value}",
      "--samples_per_caption=2", "--batch_size=32", f"--out={path('zero_shot.json')}",
      f"--grid={os.path.join(out, 'zero_shot.png')}", timings=timings)

  # ---------------------------------------------------------------- the pictures
  with open(path("samples", "samples.json")) as f:
    manifest = json.load(f)
  images, labels, marks = [], [], []
  for prompt, is_heldout in zip(manifest["prompts"], heldout):
    for sample in prompt["samples"]:
      images.append(np.asarray(Image.open(path("samples", sample["file"])).convert("RGB")))
      labels.append(prompt["prompt"] + (" (held out)" if is_heldout else ""))
      marks.append(is_heldout)
  image_grid.captioned_grid(images, labels, columns=_SAMPLES.value, tile_size=128,
                            marked=marks).save(os.path.join(out, "samples.png"))
  reconstructions = sorted(os.listdir(path("dvae", "reconstructions")),
                           key=lambda name: int(name.split("_")[1].split(".")[0]))
  shutil.copy(path("dvae", "reconstructions", reconstructions[-1]),
              os.path.join(out, "reconstructions.png"))

  dvae_log, transformer_log = read_metrics(path("dvae")), read_metrics(path("transformer"))
  train_codes = codes_lib.read_shards(path("codes_train"))["codes"]
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
  metrics = {
      "steps": steps,
      "dvae": {k: last(dvae_log, k) for k in ("eval/psnr", "eval/perplexity", "eval/codes_used")},
      "transformer": {k: last(transformer_log, k) for k in
                      ("loss", "text_loss", "image_loss", "eval/loss", "eval/text_loss",
                       "eval/image_loss")},
      "image_unigram_entropy_nats": unigram,
      "zero_shot": zero_shot_summary(path("zero_shot.json")),
      "seconds": timings,
      "total_minutes": round(sum(timings.values()) / 60, 1),
  }
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  print(json.dumps(metrics, indent=2))
  print(f"\nwrote {out}/samples.png, reconstructions.png, loss_curves.png, metrics.json")


if __name__ == "__main__":
  app.run(main)
