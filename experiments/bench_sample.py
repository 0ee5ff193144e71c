"""Sampling speed: image tokens/s of the cached sampler at `bench_small`, compile time apart,
beside Hugging Face's GPT-2 `generate` at the same geometry, timed in the same run.

  python experiments/bench_sample.py                       # batch 8, the bench_small geometry
  python experiments/bench_sample.py --batch=8 --repeats=5 --uncached   # also the no-cache path
  python experiments/bench_sample.py --peer=none           # without GPT-2 (no [bench] extra)

What is timed: `sampling.sample_codes` (caption prefill, then 256 image codes drawn one at a time
with the key/value cache), compiled ahead of time, random parameters; each call draws batch x
image_len codes, once with decode steps over the whole cache through their mask row and once
reading only the cached keys the row admits (`attention="block_sparse"`). `--uncached` also times the reference path that runs the whole sequence for every
code (what a sampler without a working cache pays). The peer, after ours: GPT-2 (transformers,
PyTorch) at the same width, depth, heads, sequence and vocabulary, `generate` continuing the same
number of captions with H*W tokens through its key/value cache, in each of `--peer_dtypes`
(bench_peers.py); the ratio ours/peer of image tokens/s is reported for each of our cached paths.
Medians of `--repeats` calls; the foreign CPU load during them is reported (see bench_util).
Like bench_train.py, the script restarts on the huge-page malloc that training launches use.
"""

import dataclasses
import os
import statistics
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

import bench_util  # experiments/bench_util.py: this script's folder is on sys.path
try:
  import bench_peers  # torch and transformers: the [bench] extra
except ImportError:
  bench_peers = None
from dalle_jax.train import launch
from dalle_jax.transformer import model as transformer, sampling
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.sampling import SampleSettings

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "transformer_bench_small.py"),
    "Transformer config whose geometry is measured.")
_BATCH = flags.DEFINE_integer("batch", 8, "Samples per call.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).", lower_bound=1)
_UNCACHED = flags.DEFINE_bool("uncached", False, "Also time the full-forward-per-code path.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0: none; the filters cost a sort).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")
_HUGEPAGES = flags.DEFINE_bool(
    "hugepages", True, "Restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as training "
    "launches do (DALLE_JAX_HUGEPAGES=0 or --nohugepages: the plain malloc).")
_PEER = flags.DEFINE_enum("peer", "gpt2" if bench_peers else "none", ["gpt2", "none"],
                          "Also time this peer's `generate` at the same geometry.")
_PEER_DTYPES = flags.DEFINE_list("peer_dtypes", ["float32", "bfloat16"],
                                 "The peer's dtypes (bfloat16: the model cast to it).")


def timed(fn, args, repeats: int) -> dict[str, float]:
  """Compile time, then the median wall time of `repeats` calls and the foreign load meanwhile."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(*args))  # warm-up
  times, before, wall0 = [], bench_util.cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  load = bench_util.foreign_load(before, time.perf_counter() - wall0)
  return {"compile_s": compile_s, "median_s": statistics.median(times), "times_s": times,
          "foreign_load_cores": load}


def main(argv):
  del argv
  if _HUGEPAGES.value:
    launch.restart_with_hugepages()
  if _PEER.value == "gpt2" and bench_peers is None:
    raise app.UsageError("--peer=gpt2 needs torch and transformers: pip install -e .[bench]")
  model = TransformerConfig(**_CONFIG.value.model)
  params = nn.unbox(transformer.init(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(0, model.text_vocab_size, (_BATCH.value, model.text_len)),
                     jnp.int32)
  keys = jax.random.split(jax.random.key(1), _BATCH.value)
  settings = SampleSettings(temperature=1.0, top_k=_TOP_K.value)
  tokens = _BATCH.value * model.image_len
  results = {"machine": {"cpu": bench_util.cpu_model(), "cores": os.cpu_count(),
                         "memory_gib": bench_util.memory_gib(), "jax": jax.__version__,
                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
             "batch": _BATCH.value,
             "config": {k: getattr(model, k) for k in
                        ("text_len", "text_vocab_size", "image_size", "image_vocab_size",
                         "width", "depth", "heads", "head_dim")}}
  # The cached path with each decode step: the whole cache through the mask row ("dense"), or
  # only the keys the row admits ("block_sparse"); the same draws (tests/test_sampling.py).
  sparse = dataclasses.replace(model, attention="block_sparse")
  paths = {"cached": (model, sampling.sample_codes),
           "cached_sparse": (sparse, sampling.sample_codes)}
  if _UNCACHED.value:
    paths["uncached"] = (model, sampling.sample_codes_uncached)
  for name, (config, fn) in paths.items():
    run = timed(lambda p, t, k, s, c=config, fn=fn: fn(c, p, t, k, s),
                (params, text, keys, settings), _REPEATS.value)
    run["image_tokens_per_s"] = tokens / run["median_s"]
    results[name] = run
    print(f"{name}: {run['image_tokens_per_s']:.0f} image tokens/s ({tokens} tokens in "
          f"{run['median_s']:.3f} s, median of {_REPEATS.value}); compile {run['compile_s']:.1f} s;"
          f" other processes used {run['foreign_load_cores']:.2f} cores")
  if _PEER.value == "gpt2":
    geometry = bench_peers.Geometry.of(model)
    results["peers"], results["ratios"] = {}, {}
    for dtype in _PEER_DTYPES.value:
      name = f"gpt2_{dtype}"
      peer = results["peers"][name] = bench_peers.time_generate(
          geometry, _BATCH.value, _REPEATS.value, 1, dtype)
      ratios = {path: results[path]["image_tokens_per_s"] / peer["image_tokens_per_s"]
                for path in ("cached", "cached_sparse")}
      results["ratios"].update({f"{path}/{name}": r for path, r in ratios.items()})
      print(f"{name} generate (transformers {peer['transformers']}, torch {peer['torch']}, "
            f"{peer['attention']} attention, {peer['params']:,} parameters): "
            f"{peer['image_tokens_per_s']:.0f} image tokens/s ({tokens} tokens in "
            f"{peer['median_s']:.3f} s, median of {_REPEATS.value}); ours/peer = "
            + ", ".join(f"{r:.2f} ({path})" for path, r in ratios.items())
            + f"; other processes used {peer['foreign_load_cores']:.2f} cores")
  if _UNCACHED.value:
    print(f"the cache is {results['uncached']['median_s'] / results['cached']['median_s']:.1f}x "
          "faster than a full forward pass per code")
  bench_util.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
