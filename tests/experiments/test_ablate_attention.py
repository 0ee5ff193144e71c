"""experiments/ablate_attention.py on the tiny transformer: every variant trains with its masks
and the table reports each one's held-out losses and speed."""

import json
import os
import subprocess
import sys

from conftest import CACHE_ENV, REPO, make_stage2_data
from dalle_jax.transformer import masks

SCRIPT = os.path.join(REPO, "experiments", "ablate_attention.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "transformer_tiny.py")


def test_each_variant_trains_with_its_masks_and_lands_in_the_table(tmp_path):
  tokenizer_dir, codes_dir = make_stage2_data(str(tmp_path))
  out = tmp_path / "ablation"
  command = [sys.executable, SCRIPT, f"--workdir={out}", f"--config={CONFIG}",
             f"--codes_dir={codes_dir}", f"--eval_codes_dir={codes_dir}",
             f"--tokenizer_dir={tokenizer_dir}", "--num_steps=3"]
  env = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  expected = {"dense": (("dense",) * 4, "dense"),
              "paper": (tuple(masks.layer_kinds(4)), "block_sparse"),
              "axial": (("axial_row", "axial_col", "axial_row", "conv"), "block_sparse")}
  with open(out / "ablation.json") as f:
    results = json.load(f)
  assert list(results) == ["dense", "paper", "axial"]
  for variant, (kinds, implementation) in expected.items():
    with open(out / variant / "config.json") as f:
      model = json.load(f)["model"]
    assert (tuple(model["layer_kinds"]), model["attention"]) == (kinds, implementation)
    assert results[variant]["step"] == 3
    assert 0 < results[variant]["image_loss"] < 10 and 0 < results[variant]["text_loss"] < 10
    assert results[variant]["steps_per_s"] > 0  # logged from the second interval on
  table = (out / "ablation.md").read_text().splitlines()
  assert len(table) == 5 and table[2].startswith("| dense | 3 |")
  # Different masks, different models: the image losses are not all the same number.
  assert len({r["image_loss"] for r in results.values()}) == 3
