"""Ablation of the attention masks: the same transformer trained for the same steps with

  dense   causal attention in every layer (what the sparse masks approximate),
  paper   the paper's schedule: row, column, row, row, ..., conv last (block-sparse kernels),
  axial   DALLE-pytorch's masks in the same schedule: row -> axial_row, column -> axial_col
          (a token sees only its own row or column), conv last,

then a Markdown table of held-out text and image loss and training steps/s.

  python experiments/ablate_attention.py --demo_work=demo_out/work --workdir=runs/ablation
  python experiments/ablate_attention.py --codes_dir=... --eval_codes_dir=... \\
      --tokenizer_dir=... --num_steps=3000 --workdir=runs/ablation

Each variant is a train_transformer.py run (`--workdir/<variant>`, resumable) from a config file
written next to it, so a variant can be rerun or inspected by hand.
"""

import json
import os
import runpy
import subprocess
import sys

from absl import app, flags
import numpy as np

from dalle_jax.transformer import masks

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the table go.", required=True)
_DEMO_WORK = flags.DEFINE_string("demo_work", None, "A demo's work directory (demo_out/work): "
                                 "its encoded shapes codes and tokenizer.")
_CODES = flags.DEFINE_string("codes_dir", None, "Training code shards (encode_dataset.py).")
_EVAL_CODES = flags.DEFINE_string("eval_codes_dir", None, "Held-out code shards.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "train_tokenizer.py output.")
_CONFIG = flags.DEFINE_string("config", os.path.join(os.path.dirname(__file__), "configs",
                                                     "transformer_small.py"),
                              "Base transformer config file.")
_STEPS = flags.DEFINE_integer("num_steps", None, "Training steps of every variant (default: "
                              "the base config's train.num_steps).")
_VARIANTS = flags.DEFINE_list("variants", ["dense", "paper", "axial"], "Which to train.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", "block_sparse",
                                      "Attention implementation of the sparse variants.")

AXIAL = {"row": "axial_row", "column": "axial_col", "conv": "conv"}


def layer_kinds(variant: str, depth: int) -> tuple[tuple[str, ...], str]:
  """The variant's mask per layer and the attention implementation that runs it."""
  paper = masks.layer_kinds(depth)
  if variant == "dense":
    return ("dense",) * depth, "dense"
  if variant == "paper":
    return tuple(paper), _IMPLEMENTATION.value
  if variant == "axial":
    return tuple(AXIAL[kind] for kind in paper), _IMPLEMENTATION.value
  raise ValueError(f"unknown variant {variant!r}; choose from dense, paper, axial")


def write_config(variant: str, depth: int, path: str) -> str:
  """A config file: the base config with the variant's masks and implementation."""
  kinds, implementation = layer_kinds(variant, depth)
  base = os.path.abspath(_CONFIG.value)
  with open(path, "w") as f:
    f.write(f'''"""{variant} masks over {base} (written by ablate_attention.py)."""
import runpy


def get_config():
  config = runpy.run_path({base!r})["get_config"]()
  config.model.layer_kinds = {kinds!r}
  config.model.attention = {implementation!r}
  return config
''')
  return path


def data_dirs() -> tuple[str, str, str]:
  if _DEMO_WORK.value:
    work = _DEMO_WORK.value
    return (os.path.join(work, "codes_train"), os.path.join(work, "codes_heldout"),
            os.path.join(work, "tokenizer"))
  if not (_CODES.value and _EVAL_CODES.value and _TOKENIZER.value):
    raise ValueError("pass --demo_work, or all of --codes_dir, --eval_codes_dir and "
                     "--tokenizer_dir")
  return _CODES.value, _EVAL_CODES.value, _TOKENIZER.value


def summarize(workdir: str) -> dict:
  """Final held-out losses and the median logged steps/s of a finished run."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  evals = [l for l in lines if "eval/image_loss" in l]
  speeds = [l["perf/steps_per_s"] for l in lines if "perf/steps_per_s" in l]
  if not evals:
    raise RuntimeError(f"{workdir} logged no evaluation: is --eval_codes_dir empty?")
  return {"step": evals[-1]["step"], "text_loss": evals[-1]["eval/text_loss"],
          "image_loss": evals[-1]["eval/image_loss"],
          "steps_per_s": float(np.median(speeds)) if speeds else float("nan")}


def main(argv):
  del argv
  codes_dir, eval_codes_dir, tokenizer_dir = data_dirs()
  base = runpy.run_path(_CONFIG.value)["get_config"]()
  depth, steps = base.model.depth, _STEPS.value or base.train.num_steps
  for variant in _VARIANTS.value:
    layer_kinds(variant, depth)  # refuse an unknown variant before anything trains
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = {}
  for variant in _VARIANTS.value:
    workdir = os.path.join(_WORKDIR.value, variant)
    config = write_config(variant, depth, os.path.join(_WORKDIR.value, f"{variant}_config.py"))
    print(f"--- {variant}: {workdir}", flush=True)
    subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                 "train_transformer.py"),
                    f"--config={config}", f"--workdir={workdir}",
                    f"--config.train.num_steps={steps}",
                    f"--config.data.codes_dir={codes_dir}",
                    f"--config.data.eval_codes_dir={eval_codes_dir}",
                    f"--config.data.tokenizer_dir={tokenizer_dir}",
                    "--config.sample_every=0", f"--config.eval_every={steps}"],
                   check=True)
    results[variant] = summarize(workdir)

  rows = ["| masks | steps | held-out text loss | held-out image loss | steps/s |",
          "|---|---:|---:|---:|---:|"]
  for variant, r in results.items():
    rows.append(f"| {variant} | {r['step']} | {r['text_loss']:.4f} | {r['image_loss']:.4f} | "
                f"{r['steps_per_s']:.2f} |")
  table = "\n".join(rows)
  print(table)
  with open(os.path.join(_WORKDIR.value, "ablation.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(_WORKDIR.value, "ablation.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
