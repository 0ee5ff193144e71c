"""experiments/bench_peers.py: GPT-2 at our geometry (sequence, vocabulary, about our parameter
count), its train step and `generate` give positive rates; bench_train.py and bench_sample.py
time it after our figure and report ours/peer."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import CACHE_ENV, REPO
from dalle_jax.transformer import model as transformer
from dalle_jax.transformer.model import TransformerConfig
from experiments.configs import transformer_bench_small, transformer_tiny

sys.path.insert(0, os.path.join(REPO, "experiments"))  # bench_peers imports bench_util, as scripts do
import bench_peers  # noqa: E402  pylint: disable=wrong-import-position

TINY = bench_peers.Geometry(width=32, depth=2, heads=2, text_len=4, image_len=16, text_vocab=40,
                            image_vocab=24)
ENV = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}
TINY_CONFIG = os.path.join(REPO, "experiments", "configs", "transformer_tiny.py")


def _positive(x):
  return math.isfinite(x) and x > 0


def test_gpt2_has_the_bench_geometry_and_about_our_parameter_count():
  ours = TransformerConfig(**transformer_bench_small.get_config().model)
  model = bench_peers.gpt2(bench_peers.Geometry.of(ours))
  assert model.config.n_positions == ours.seq_len == 64 + 256
  assert model.config.vocab_size == ours.num_text_tokens + ours.image_vocab_size == 4096 + 1024
  assert (model.config.n_embd, model.config.n_layer, model.config.n_head) == (256, 4, 4)
  # GPT-2's positions are one table of 320 (ours: 64 text, 16 row, 16 column), and its q/k/v
  # carry biases: 5,862,912 parameters against our 5,810,688.
  assert bench_peers.count_params(model) == pytest.approx(transformer.count_params(ours), rel=0.02)


def test_geometry_refuses_heads_that_do_not_tile_the_width():
  ours = TransformerConfig(**dict(transformer_tiny.get_config().model, head_dim=16))
  with pytest.raises(ValueError, match="heads x head_dim"):
    bench_peers.Geometry.of(ours)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_step_and_generate_give_positive_rates(dtype):
  train = bench_peers.time_train(TINY, batch=2, steps=2, warmup=1, dtype=dtype)
  assert train["tokens_per_step"] == 2 * 20 and len(train["step_s"]) == 2
  assert _positive(train["tokens_per_s"]) and math.isfinite(train["final_loss"])
  generate = bench_peers.time_generate(TINY, batch=2, repeats=1, warmup=0, dtype=dtype)
  assert _positive(generate["image_tokens_per_s"])
  assert generate["image_tokens_per_s"] == pytest.approx(2 * 16 / generate["median_s"])


def _script(tmp_path, name, *flags):
  out = tmp_path / f"{name}.json"
  subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{name}.py"),
                  f"--config={TINY_CONFIG}", "--peer=gpt2", "--peer_dtypes=float32,bfloat16",
                  f"--json_out={out}", *flags], env=ENV, check=True, capture_output=True,
                 timeout=600)
  return json.loads(out.read_text())


def test_bench_train_reports_ours_over_the_peer(tmp_path):
  results = _script(tmp_path, "bench_train", "--steps=2", "--warmup=1", "--peak_sizes=64",
                    "--peak_repeats=1")
  assert set(results["peers"]) == set(results["ratios"]) == {"gpt2_float32", "gpt2_bfloat16"}
  for name, peer in results["peers"].items():
    assert peer["tokens_per_step"] == results["tokens_per_step"]
    assert results["ratios"][name] == pytest.approx(results["tokens_per_s"] / peer["tokens_per_s"])


def test_bench_sample_reports_ours_over_the_peer(tmp_path):
  results = _script(tmp_path, "bench_sample", "--batch=2", "--repeats=1")
  assert set(results["ratios"]) == {f"{path}/gpt2_{dtype}" for path in ("cached", "cached_sparse")
                                    for dtype in ("float32", "bfloat16")}
  peer = results["peers"]["gpt2_bfloat16"]
  assert results["ratios"]["cached_sparse/gpt2_bfloat16"] == pytest.approx(
      results["cached_sparse"]["image_tokens_per_s"] / peer["image_tokens_per_s"])
