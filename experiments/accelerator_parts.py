"""The transformer's parts of `bench_accelerator.py` (peak, attention, train, sample), each
against its limit; the sizes of a run; how a program is timed within a budget.

A part is `part(sizes, results, section)`: it fills its own `section` of the results as it goes
(the time guard writes whatever is there) and reads earlier parts' sections (the peak). Units are
in the keys: `_s` seconds, `_per_s` rates, `_bytes` bytes, `flops` FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import sharding
from dalle_jax.scaling import roofline
from dalle_jax.transformer import attention, model as transformer, sampling
from dalle_jax.transformer import training as transformer_training
from dalle_jax.transformer.model import TransformerConfig

MASK_KINDS = ("row", "column", "conv", "dense")  # dense: plain causal, the reference


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one run measures. `budgets_s`: seconds per part (compiles included) that it stops
  starting programs after; their sum stays under `time_limit_s`."""
  matmul_n: int
  copy_bytes: int
  model: dict            # the train and attention geometry (TransformerConfig fields)
  train_batch: int
  block_sizes: tuple[int, ...]
  sample_model: dict     # TransformerConfig fields of the sampled model
  sample_batches: tuple[int, ...]   # 0: the largest batch that fits in device memory
  dvae: dict             # DVAEConfig fields (dtype apart)
  dvae_batch: int
  repeats: int
  min_sample_s: float
  budgets_s: dict
  time_limit_s: float


_PAPER_SEQUENCE = dict(text_vocab_size=16_384, text_len=256, image_vocab_size=8_192,
                       image_size=32, conv_kernel=11, dtype="bfloat16", attention="block_sparse")

# One H200: a 0.9B-parameter model at the paper's sequence (batch 16: 20,480 tokens a step), the
# paper's 12B sampled, budgets that end well inside 8 minutes.
FULL = Sizes(
    matmul_n=8192, copy_bytes=2 * 2**30,  # 2^30 bf16 elements: int32 indexing stays safe
    model=dict(_PAPER_SEQUENCE, width=2048, depth=16, heads=32, head_dim=64, remat=False),
    train_batch=16, block_sizes=(64, 128, 32),
    sample_model=dict(_PAPER_SEQUENCE, width=3968, depth=64, heads=62, head_dim=64),
    sample_batches=(1, 0), dvae=dict(resolution=256), dvae_batch=32,
    repeats=10, min_sample_s=0.05,
    budgets_s=dict(peak=15, attention=70, train=110, dvae=60, sample=175), time_limit_s=450)

_TINY = dict(text_vocab_size=64, text_len=16, image_vocab_size=32, image_size=4, conv_kernel=3,
             dtype="bfloat16", attention="block_sparse", width=32, depth=2, heads=2, head_dim=16,
             remat=False)
SMOKE = Sizes(
    matmul_n=256, copy_bytes=2**20, model=_TINY, train_batch=2, block_sizes=(8,),
    sample_model=_TINY, sample_batches=(1, 0),
    dvae=dict(resolution=8, n_hid=64, n_blk_per_group=1, n_init=8, vocab_size=512), dvae_batch=1,
    repeats=2, min_sample_s=0.0,
    budgets_s=dict(peak=30, attention=30, train=30, dvae=30, sample=30), time_limit_s=300)


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], wait: Callable[[Any], Any], sizes: Sizes,
               budget_s: float) -> dict:
  """Median seconds per call of `fn` (its result waited for with `wait`). The first call
  (compiling, for a jitted `fn`) is untimed; the second sizes the samples: each is as many
  back-to-back calls as last `sizes.min_sample_s`, and where that is one call the second call is
  the first sample. Samples go on until `sizes.repeats` or `budget_s` from the start."""
  start = time.perf_counter()
  wait(fn())
  first = time.perf_counter() - start
  t = time.perf_counter()
  wait(fn())
  probe = time.perf_counter() - t
  calls = max(1, math.ceil(sizes.min_sample_s / max(probe, 1e-9)))
  samples = [probe] if calls == 1 else []
  while len(samples) < sizes.repeats:
    if samples and time.perf_counter() + samples[-1] * calls > start + budget_s:
      break
    t = time.perf_counter()
    for _ in range(calls):
      out = fn()
    wait(out)
    samples.append((time.perf_counter() - t) / calls)
  return {"median_s": statistics.median(samples), "samples_s": samples,
          "calls_per_sample": calls, "first_call_s": first}


class Budget:
  """A part's time budget: how much is left, shared out among the programs still to time."""

  def __init__(self, seconds: float):
    self.end = time.perf_counter() + seconds

  def left(self) -> float:
    return self.end - time.perf_counter()

  def share(self, programs_left: int) -> float:
    return max(self.left(), 0.0) / max(programs_left, 1)


def not_available(what: str) -> dict:
  return {"available": False, "reason": f"{what} not available on {jax.default_backend()}"}


def _out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------------------
# Parts.
# ---------------------------------------------------------------------------------------------

def peak(sizes: Sizes, results: dict, section: dict) -> None:
  """The bf16 matmul rate and the copy bandwidth of this device."""
  budget = Budget(sizes.budgets_s["peak"])
  n = sizes.matmul_n
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  dot = jax.jit(jnp.matmul)
  timed = time_calls(lambda: dot(a, b), jax.block_until_ready, sizes, budget.share(2))
  section["matmul"] = dict(timed, n=n, dtype="bfloat16", flop_per_s=2 * n**3 / timed["median_s"])
  x = jnp.ones(sizes.copy_bytes // 2, jnp.bfloat16)
  # x + 1 reads and writes every element once; a plain copy XLA could elide.
  copy = jax.jit(lambda x: x + 1)
  timed = time_calls(lambda: copy(x), jax.block_until_ready, sizes, budget.share(1))
  section["copy"] = dict(timed, bytes=sizes.copy_bytes,
                         bytes_per_s=2 * sizes.copy_bytes / timed["median_s"])
  section["flop_per_s"] = section["matmul"]["flop_per_s"]
  section["bytes_per_s"] = section["copy"]["bytes_per_s"]


def peak_flops(results: dict) -> float:
  if "flop_per_s" not in results.get("peak", {}):
    raise RuntimeError("the peak part did not run: no matmul peak to set this part against")
  return results["peak"]["flop_per_s"]


def _fwd_bwd(attend: Callable) -> Callable:
  """attend(q, k, v) -> jitted (q, k, v, d_out) -> (out, dq, dk, dv)."""
  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(d_out))
  return jax.jit(fwd_bwd)


def _attention_programs(model: TransformerConfig, kind: str, block_sizes) -> dict:
  mask, perm = model.mask(kind), model.permutation(kind)
  programs = {"xla_dense": lambda q, k, v: attention.attend(q, k, v, mask, "dense")}
  if jax.default_backend() == "gpu":
    cudnn_mask = dict(is_causal=True) if kind == "dense" else dict(mask=jnp.asarray(mask)[None,
                                                                                           None])
    programs["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", **cudnn_mask)
  for bs in block_sizes:
    programs[f"block_sparse_{bs}"] = lambda q, k, v, bs=bs: attention.attend(
        q, k, v, mask, "block_sparse", perm, bs)
  return programs


def attention_part(sizes: Sizes, results: dict, section: dict) -> None:
  """Forward + backward of every attention path for each mask kind, against the time the
  admitted pairs' FLOPs take at the matmul peak."""
  budget, peak_rate = Budget(sizes.budgets_s["attention"]), peak_flops(results)
  model = TransformerConfig(**sizes.model)
  shape = (sizes.train_batch, model.seq_len, model.heads, model.head_dim)
  q, k, v, d_out = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4))
  section["shape"] = list(shape)
  left = len(MASK_KINDS) * (2 + len(sizes.block_sizes))
  for kind in MASK_KINDS:
    pairs = int(model.mask(kind).sum())
    flops = 3 * roofline.attention_flops(pairs, *shape[:1], model.heads, model.head_dim)
    entry = section[kind] = {"admitted_fraction": pairs / model.seq_len**2, "model_flops": flops,
                             "bound_s": flops / peak_rate, "paths": {}}
    if jax.default_backend() != "gpu":
      entry["paths"]["cudnn"] = not_available("cuDNN")
    reference = None
    for name, attend in _attention_programs(model, kind, sizes.block_sizes).items():
      left -= 1
      if budget.left() <= 0:
        entry["paths"][name] = {"skipped": "the part's time budget is spent"}
        continue
      try:
        program = _fwd_bwd(attend)
        timed = time_calls(lambda: program(q, k, v, d_out), jax.block_until_ready, sizes,
                           min(budget.share(left + 1), 10.0))
        outs = program(q, k, v, d_out)
      except Exception as e:  # pylint: disable=broad-except
        entry["paths"][name] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
        continue
      reference = outs if reference is None else reference
      diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                 for a, b in zip(outs, reference))
      entry["paths"][name] = dict(timed, max_abs_diff_vs_xla_dense=diff,
                                  fraction_of_peak=flops / timed["median_s"] / peak_rate)
    timed_paths = {n: p["median_s"] for n, p in entry["paths"].items() if "median_s" in p}
    dense = {n: s for n, s in timed_paths.items() if not n.startswith("block_sparse")}
    sparse = {n: s for n, s in timed_paths.items() if n.startswith("block_sparse")}
    if dense and sparse:
      entry["best_dense"], entry["best_sparse"] = min(dense, key=dense.get), min(sparse,
                                                                                 key=sparse.get)
      entry["speedup"] = dense[entry["best_dense"]] / sparse[entry["best_sparse"]]
  section["best_block_size"] = _best_block_size(section, sizes.block_sizes)


def _best_block_size(section: dict, block_sizes) -> int:
  """The block size whose row + column + conv times sum least (the train step's layers)."""
  totals = {}
  for bs in block_sizes:
    times = [section[kind]["paths"].get(f"block_sparse_{bs}", {}).get("median_s")
             for kind in ("row", "column", "conv")]
    if all(t is not None for t in times):
      totals[bs] = sum(times)
  return min(totals, key=totals.get) if totals else block_sizes[0]


def _random_batch(model: TransformerConfig, batch: int) -> dict:
  rng = np.random.default_rng(0)
  return {"text": rng.integers(0, model.num_text_tokens, (batch, model.text_len), np.int32),
          "codes": rng.integers(0, model.image_vocab_size,
                                (batch, model.image_size, model.image_size), np.int32)}


def _train_once(model: TransformerConfig, sizes: Sizes, budget: Budget, section: dict) -> None:
  train = transformer_training.TransformerTrainConfig(batch_size=sizes.train_batch,
                                                      warmup_steps=10, num_steps=1000)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  shardings = transformer_training.state_shardings(model, train, mesh)
  state = [transformer_training.create_sharded_state(model, train, mesh, shardings)]
  batch = jax.device_put(_random_batch(model, train.batch_size),
                         transformer_training.batch_shardings(mesh))
  step = transformer_training.make_train_step(model, train, mesh, shardings)

  def run():
    state[0], metrics = step(state[0], batch)
    return metrics

  section.update(time_calls(run, jax.block_until_ready, sizes, max(budget.left(), 0.0)))
  section["loss"] = float(run()["loss"])


def train(sizes: Sizes, results: dict, section: dict) -> None:
  """Tokens/s and MFU of the train step; rematerialised only if the plain step does not fit."""
  budget, peak_rate = Budget(sizes.budgets_s["train"]), peak_flops(results)
  block_size = results.get("attention", {}).get("best_block_size", sizes.block_sizes[0])
  model = TransformerConfig(**sizes.model, attention_block_size=block_size)
  try:
    _train_once(model, sizes, budget, section)
  except Exception as e:  # pylint: disable=broad-except
    if not _out_of_memory(e) or model.remat:
      raise
    section["without_remat"] = f"{type(e).__name__}: {str(e)[:500]}"
    model = dataclasses.replace(model, remat=True)
    _train_once(model, sizes, budget, section)
  flops = roofline.train_step_flops(model, sizes.train_batch)
  section.update(
      model={k: getattr(model, k) for k in ("width", "depth", "heads", "head_dim", "seq_len",
                                            "attention", "attention_block_size", "remat",
                                            "dtype")},
      batch=sizes.train_batch, params=transformer.count_params(model), kinds=model.kinds(),
      model_flops=flops, dense_attention_flops=roofline.dense_attention_flops(
          model, sizes.train_batch),
      tokens_per_s=sizes.train_batch * model.seq_len / section["median_s"],
      mfu=sum(flops.values()) / section["median_s"] / peak_rate)


def _random_params(abstract: Any, dtype) -> Any:
  """N(0, 0.02) parameters of the abstract tree's shapes in `dtype`, made on the device: one draw
  the size of the largest leaf, each leaf a slice of it times its own factor (a draw per leaf
  compiles one random-bits program per leaf: hundreds for the 12B model)."""
  leaves, tree = jax.tree.flatten(abstract)
  sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves]

  @jax.jit
  def make(key):
    draw = 0.02 * jax.random.normal(key, (max(sizes),), dtype)
    return tree.unflatten([(draw[:size] * jnp.asarray(1 + i / len(leaves), dtype)).reshape(
        leaf.shape) for i, (size, leaf) in enumerate(zip(sizes, leaves))])
  return make(jax.random.key(0))


def largest_batch(model: TransformerConfig, cap: int = 256) -> int | None:
  """The largest batch (a multiple of 8 from 8 on) whose key/value caches and a margin fit in
  what the device has free; None where the device does not say (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  cache = 2 * model.depth * model.seq_len * model.heads * model.head_dim * 2  # bf16 k and v
  # Per sample besides the cache: the prefill's activations (the MLP's are the widest), x4.
  activations = 4 * model.text_len * model.mlp_ratio * model.width * 2
  batch = int(0.85 * free // (cache + activations))
  return min(cap, batch // 8 * 8 if batch >= 8 else max(batch, 1))


def _sample_once(model: TransformerConfig, params: Any, batch: int, sizes: Sizes,
                 budget_s: float, peak_rate: float, bandwidths: dict) -> dict:
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(0, model.text_vocab_size, (batch, model.text_len)), jnp.int32)
  keys = jax.random.split(jax.random.key(1), batch)
  sample = jax.jit(lambda p, t, k: sampling.sample_codes(model, p, t, k,
                                                         sampling.SampleSettings()))
  entry = time_calls(lambda: sample(params, text, keys), jax.block_until_ready, sizes, budget_s)
  step_bytes = roofline.decode_step_bytes(model, params, batch, sparse=True)
  step_flops = roofline.decode_step_flops(model, batch, sparse=True)
  entry.update(batch=batch, image_tokens_per_s=batch * model.image_len / entry["median_s"],
               seconds_per_image=entry["median_s"] / batch, step_bytes=step_bytes,
               step_flops=step_flops)
  # The roofline of the image codes' decode steps; the caption's prefill is left out of it.
  for name, bandwidth in bandwidths.items():
    bound = model.image_len * max(sum(step_bytes.values()) / bandwidth, step_flops / peak_rate)
    entry[f"bound_s_{name}"] = bound
    entry[f"ratio_to_bound_{name}"] = entry["median_s"] / bound
  return entry


def sample(sizes: Sizes, results: dict, section: dict) -> None:
  """Image tokens/s of the cached sampler on the paper's 12B model at batch 1 and the largest
  batch that fits, against the decode steps' roofline."""
  budget, peak_rate = Budget(sizes.budgets_s["sample"]), peak_flops(results)
  bandwidths = {"measured": results["peak"]["bytes_per_s"]}
  if results.get("nominal_bandwidth_bytes_per_s"):
    bandwidths["nominal"] = results["nominal_bandwidth_bytes_per_s"]
  model = TransformerConfig(**sizes.sample_model)
  abstract = nn.unbox(transformer.abstract_params(model))
  start = time.perf_counter()
  params = jax.block_until_ready(_random_params(abstract, jnp.bfloat16))
  section.update(params=transformer.count_params(model), init_s=time.perf_counter() - start,
                 params_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                 decode_params_bytes=roofline.decode_params_bytes(params),
                 model={k: getattr(model, k) for k in ("width", "depth", "heads", "head_dim",
                                                       "seq_len", "attention", "dtype")},
                 runs={})
  batches = list(sizes.sample_batches)
  for i, batch in enumerate(batches):
    if batch == 0:
      batch = largest_batch(model)
      if batch is None:
        section["runs"]["largest"] = not_available("a device memory limit")
        continue
    while True:
      try:
        run = _sample_once(model, params, batch, sizes, budget.share(len(batches) - i),
                           peak_rate, bandwidths)
        break
      except Exception as e:  # pylint: disable=broad-except
        if not _out_of_memory(e) or batch < 2:
          raise
        section.setdefault("out_of_memory_at", []).append(batch)
        batch //= 2
    decode = results.get("dvae", {}).get("decode_bfloat16", {}).get("jax")
    if decode:  # the dvae part's bf16 decode, per image
      run["seconds_per_image_with_dvae_decode"] = (run["seconds_per_image"]
                                                   + decode["median_s"] / results["dvae"]["batch"])
    section["runs"]["largest" if sizes.sample_batches[i] == 0 else str(batch)] = run
    if budget.left() <= 0:
      break
