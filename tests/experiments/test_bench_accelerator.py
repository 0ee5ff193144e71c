"""experiments/bench_accelerator.py at its smoke sizes on CPU: every part runs, its figures are
positive and consistent with each other and with their limits, paths that need a GPU say so, and
the time guard leaves partial results behind."""

import json
import math
import os
import subprocess
import sys

from conftest import CACHE_ENV, REPO

SCRIPT = os.path.join(REPO, "experiments", "bench_accelerator.py")
ENV = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}


def _run(tmp_path, *flags):
  json_out, md_out = tmp_path / "acc.json", tmp_path / "acc.md"
  result = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--json_out={json_out}",
                           f"--markdown_out={md_out}", *flags], env=ENV, capture_output=True,
                          text=True, timeout=600)
  with open(json_out) as f:
    return result, json.load(f), md_out.read_text()


def _close(a, b):
  return math.isclose(a, b, rel_tol=1e-9)


def test_smoke_run_measures_every_part_against_its_limit(tmp_path):
  result, r, table = _run(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert r["machine"]["platform"] == "cpu" and "timed_out_in" not in r
  assert not [part for part in ("peak", "attention", "train", "dvae", "sample")
              if "error" in r[part]], {p: r[p].get("error") for p in r if isinstance(r[p], dict)}

  peak = r["peak"]
  assert peak["flop_per_s"] > 0 and peak["bytes_per_s"] > 0
  assert _close(peak["flop_per_s"], 2 * 256**3 / peak["matmul"]["median_s"])

  for kind in ("row", "column", "conv", "dense"):
    entry = r["attention"][kind]
    assert entry["paths"]["cudnn"] == {"available": False,
                                       "reason": "cuDNN not available on cpu"}
    dense, sparse = entry["paths"]["xla_dense"], entry["paths"]["block_sparse_8"]
    assert 0 < entry["bound_s"] <= min(dense["median_s"], sparse["median_s"])
    assert sparse["max_abs_diff_vs_xla_dense"] < 0.05  # bf16 outputs and gradients
    assert _close(entry["speedup"], dense["median_s"] / sparse["median_s"])
    assert 0 < entry["admitted_fraction"] < 1
  # Every mask admits fewer pairs than plain causal attention.
  assert max(r["attention"][k]["model_flops"] for k in ("row", "column", "conv")) < \
      r["attention"]["dense"]["model_flops"]

  train = r["train"]
  assert 0 < train["mfu"] <= 1 and math.isfinite(train["loss"])
  assert _close(train["tokens_per_s"], 2 * (16 + 16) / train["median_s"])
  assert _close(train["mfu"], sum(train["model_flops"].values()) / train["median_s"]
                / peak["flop_per_s"])
  assert train["model_flops"]["attention"] < train["dense_attention_flops"]
  assert train["model"]["attention_block_size"] == r["attention"]["best_block_size"] == 8

  for step in ("encode", "decode"):
    for dtype in ("float32", "bfloat16"):
      entry = r["dvae"][f"{step}_{dtype}"]
      ours, theirs = entry["jax"], entry["torch"]
      assert ours["images_per_s"] > 0 and theirs["images_per_s"] > 0
      assert _close(entry["speedup_over_torch"], theirs["median_s"] / ours["median_s"])
      assert 0 < entry["bound_s"] <= ours["median_s"]
  # The same weights on both sides: float32 codes agree.
  assert r["dvae"]["encode_float32"]["codes_agree"] >= 0.99

  runs = r["sample"]["runs"]
  assert runs["largest"] == {"available": False,
                             "reason": "a device memory limit not available on cpu"}
  run = runs["1"]
  assert 0 < run["bound_s_measured"] <= run["median_s"]
  assert _close(run["image_tokens_per_s"], 16 / run["median_s"])
  assert _close(run["seconds_per_image_with_dvae_decode"], run["seconds_per_image"]
                + r["dvae"]["decode_bfloat16"]["jax"]["median_s"] / r["dvae"]["batch"])
  assert run["step_bytes"]["params"] == r["sample"]["decode_params_bytes"] < \
      r["sample"]["params_bytes"]

  assert "| attention | fwd + bwd, row" in table and "cuDNN not available on cpu" in table
  for part in ("| peak |", "| train |", "| dvae |", "| sample |"):
    assert part in table


def test_time_limit_writes_partial_results_and_exits(tmp_path):
  result, r, table = _run(tmp_path, "--parts=peak,attention", "--time_limit_s=0.5")
  assert result.returncode == 3, result.stderr[-3000:]
  assert r["timed_out_in"] in ("peak", "attention")
  assert "stopped by the time limit" in table
