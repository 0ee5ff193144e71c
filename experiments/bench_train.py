"""Transformer training throughput: tokens/s and FLOP/s of the full train step, against the
float32 matmul peak and Hugging Face's GPT-2 at the same geometry, measured in the same run.

  python experiments/bench_train.py                     # bench_small geometry, 20 timed steps
  python experiments/bench_train.py --nohugepages       # the plain malloc (launches use huge pages)
  python experiments/bench_train.py --peer=none         # without GPT-2 (no [bench] extra needed)
  python experiments/bench_train.py --profile=5 --json_out=bench_train.json
  python experiments/bench_train.py --config.model.depth=8   # any config field, as in training

What is timed: `transformer_training.make_train_step` exactly as train_transformer.py builds it
(forward, loss, backward, clipping, AdamW, EMA; the state donated), on random text and codes,
compiled ahead of time so that compilation is reported apart. tokens = batch x (text_len + H*W)
per step. FLOPs are counted analytically (`step_flops`) and cross-checked against XLA's own
count; the step's FLOP/s is then compared with the best float32 `jnp.dot` of a few square sizes,
measured before and after the step, and with that size's median call: the fairer yardstick when
other jobs leave the step fewer cores than the best call had. `--profile` then traces more steps
with `jax.profiler` and splits their time by part of the model (`_PARTS`). The peer, after our
step: GPT-2 (transformers, PyTorch) at the same width, depth, heads, sequence and vocabulary,
forward, loss, backward, clipping and AdamW with our hyperparameters, in each of `--peer_dtypes`
(bench_peers.py); the ratio ours/peer of tokens/s is reported. The CPU time other processes used
meanwhile is reported: on two cores any other job skews the numbers. No XLA flag is set by the
script. Results: BENCHMARKS.md.
"""

import collections
import datetime
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dalle_jax import sharding
from dalle_jax.train import launch
from dalle_jax.transformer import model as transformer, training as transformer_training
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.training import TransformerTrainConfig
import bench_util  # experiments/bench_util.py: this script's folder is on sys.path
try:
  import bench_peers  # torch and transformers: the [bench] extra
except ImportError:
  bench_peers = None

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "transformer_bench_small.py"),
    "Experiment config (a .py file with get_config()); override fields with --config.a.b=v.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps (median).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.", lower_bound=0)
_PEAK_SIZES = flags.DEFINE_list("peak_sizes", ["1024", "2048", "4096"],
                                "Sides n of the n x n float32 matmuls that measure the peak.")
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 5, "Timed calls per matmul size (best).",
                                     lower_bound=1)
_PROFILE = flags.DEFINE_integer("profile", 0, "Then trace this many more steps with "
                                "jax.profiler and print where their time goes (0: no trace).",
                                lower_bound=0)
_HUGEPAGES = flags.DEFINE_bool(
    "hugepages", True, "Restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as training "
    "launches do: malloc asks for transparent huge pages, so XLA's per-call buffers page-fault "
    "in far less often (DALLE_JAX_HUGEPAGES=0 or --nohugepages: the plain malloc).")
_PEER = flags.DEFINE_enum("peer", "gpt2" if bench_peers else "none", ["gpt2", "none"],
                          "Also time this peer's train step at the same geometry.")
_PEER_DTYPES = flags.DEFINE_list("peer_dtypes", ["float32", "bfloat16"],
                                 "The peer's compute dtypes (bfloat16: torch.autocast).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------

def step_flops(model: TransformerConfig, batch: int) -> dict[str, int]:
  """Analytic FLOPs of one forward + backward pass, by part; a multiply-add counts 2.

  dense:     6 x (matmul weights of the blocks) x B*S: q/k/v, output and both MLP projections on
             every position (2 forward; 4 backward, for the input and the weight gradients).
  heads:     6 x width x vocab x positions, each head only on the positions that use it: the text
             head on B*(T-1), the image head on B*H*W.
  attention: 4 x B x layers x heads x S^2 x head_dim x 3: Q K^T and weights x V (2 S^2 D each)
             over the full dense S x S, forward and twice that backward.

  Not counted: embeddings (gathers), biases, layer norms, softmax, GELU, the loss and the
  optimiser: elementwise work, a few percent of XLA's count (see `bench_util.xla_flops`).
  """
  c = model
  inner = c.heads * c.head_dim
  per_block = c.width * 3 * inner + inner * c.width + 2 * c.width * c.mlp_ratio * c.width
  return {
      "dense": 6 * c.depth * per_block * batch * c.seq_len,
      "heads": 6 * c.width * (c.num_text_tokens * batch * (c.text_len - 1)
                              + c.image_vocab_size * batch * c.image_len),
      "attention": 4 * batch * c.depth * c.heads * c.seq_len**2 * c.head_dim * 3,
  }


# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------

def _measured(fn, results: dict, name: str):
  """Runs fn(), recording the CPU that other processes (foreign_load) and this one (own_load)
  used meanwhile, in cores, under `name`."""
  start, before = time.perf_counter(), bench_util.cpu_seconds()
  out = fn()
  wall = time.perf_counter() - start
  results["foreign_load"][name] = bench_util.foreign_load(before, wall)
  results["own_load"][name] = bench_util.own_load(before, wall)
  return out


def matmul_peak(sizes: list[int], repeats: int) -> dict[str, list[float]]:
  """FLOP/s of each of `repeats` calls of a jitted float32 n x n x n `jnp.dot`, for each n
  (2 n^3 FLOPs a call)."""
  rates = {}
  for n in sizes:
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (1, 2))
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    dot(a, b).block_until_ready()
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      dot(a, b).block_until_ready()
      seconds.append(time.perf_counter() - start)
    rates[str(n)] = [2 * n**3 / s for s in seconds]
  return rates


def random_batch(model: TransformerConfig, batch: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"text": rng.integers(0, model.num_text_tokens, (batch, model.text_len), np.int32),
          "codes": rng.integers(0, model.image_vocab_size,
                                (batch, model.image_size, model.image_size), np.int32)}


class TrainStep:
  """The compiled train step and its (donated) state: `run()` takes one step and waits for it."""

  def __init__(self, model: TransformerConfig, train: TransformerTrainConfig, mesh_axes: dict,
               rules, results: dict):
    mesh = sharding.make_mesh(**mesh_axes)
    shardings = transformer_training.state_shardings(model, train, mesh, rules)
    self.state = transformer_training.create_sharded_state(model, train, mesh, shardings)
    self.batch = jax.device_put(random_batch(model, train.batch_size, train.seed),
                                transformer_training.batch_shardings(mesh))
    step = transformer_training.make_train_step(model, train, mesh, shardings, rules)
    start = time.perf_counter()
    # Lowered under the mesh and logical axis rules the step traces with: what training runs.
    self.compiled = step.lower(self.state, self.batch).compile()
    results["compile_s"] = time.perf_counter() - start
    results["xla_flops"] = bench_util.xla_flops(self.compiled)
    self.metrics = None

  def run(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))


def time_steps(step: TrainStep, steps: int, warmup: int, results: dict) -> list[float]:
  """Seconds of each of `steps` train steps, after `warmup` untimed ones; also the page faults
  a step takes (XLA:CPU allocates its temporaries afresh on every call)."""
  for _ in range(warmup):
    step.run()
  seconds = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    start = time.perf_counter()
    step.run()
    seconds.append(time.perf_counter() - start)
  results["minor_faults_per_step"] = (
      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  return seconds


def time_peer(model: TransformerConfig, train: TransformerTrainConfig, results: dict) -> None:
  """GPT-2's train step at our geometry, batch and hyperparameters, in each peer dtype."""
  if bench_peers is None:
    raise app.UsageError("--peer=gpt2 needs torch and transformers: pip install -e .[bench]")
  geometry = bench_peers.Geometry.of(model)
  results["peers"] = {}
  for dtype in _PEER_DTYPES.value:
    name = f"gpt2_{dtype}"
    results["peers"][name] = _measured(
        lambda d=dtype: bench_peers.time_train(
            geometry, train.batch_size, _STEPS.value, _WARMUP.value, d,
            learning_rate=train.learning_rate, betas=(train.adam_b1, train.adam_b2),
            weight_decay=train.weight_decay, clip_norm=train.clip_norm), results, name)


# ---------------------------------------------------------------------------------------------
# Where the time goes.
# ---------------------------------------------------------------------------------------------

# Parts of the step, by the JAX op name XLA keeps in each instruction's metadata: first match.
_PARTS = (
    ("attention (scores, softmax, weights x V)", r"/attention/(?!qkv/|out/)"),
    ("q/k/v and output projections", r"/attention/(qkv|out)/"),
    ("MLP", r"/mlp/"),
    ("layer norms and residual stream", r"/ln_"),
    ("text and image heads", r"/(text|image)_head/"),
    ("loss (log-softmax, targets)", r"log_softmax|take_along_axis|dalle_loss|_cross_entropy"),
    ("embeddings and the rest of the model", r"Transformer"),
    ("optimiser (clipping, AdamW, EMA) and the rest", r""),
)


def _op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> the JAX op name in its metadata. A fusion that holds a matmul gets the
  matmul's: XLA fuses e.g. the heads' forward dots into the loss's log-softmax."""
  names, dots, calls = {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY )?%([\w.\-]+) \(", line)
    if header:
      computation = None if header.group(1) else header.group(2)
    match = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ ([\w\-]+)\(.*?op_name=\"([^\"]*)\"", line)
    if match:
      names[match.group(1)] = match.group(3)
      if match.group(2) == "dot" and computation:
        dots.setdefault(computation, match.group(3))
      called = re.search(r"calls=%([\w.\-]+)", line)
      if called:
        calls[match.group(1)] = called.group(1)
  return {name: dots.get(calls.get(name), op_name) for name, op_name in names.items()}


def profile_steps(step: TrainStep, steps: int, results: dict) -> None:
  """Traces `steps` train steps with jax.profiler; the time of each instruction of the compiled
  step (as the trace's per-instruction events give it), summed by part and by direction."""
  names = _op_names(step.compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        step.run()
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  seconds = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in names:
      seconds[event["name"]] += event["dur"] * 1e-6 / steps
  parts = collections.Counter()
  for instruction, s in seconds.items():
    op_name = names[instruction]
    part = next(p for p, pattern in _PARTS if re.search(pattern, op_name))
    direction = "backward" if "transpose(" in op_name else "forward"
    parts[f"{part}|{direction}"] += s
  results["profile"] = {"steps": steps, "instructions": len(seconds),
                        "sum_s": sum(seconds.values()), "parts_s": dict(parts),
                        "top_instructions_s": {f"{k} ({names[k]})": v
                                               for k, v in seconds.most_common(15)}}


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------

def _report(model: TransformerConfig, results: dict) -> None:
  """Tokens/s and FLOP/s of the median step, against the peak; into `results` and printed."""
  step_s = statistics.median(results["step_s"])
  flops = sum(results["analytic_flops"].values())
  results["median_step_s"] = step_s
  results["tokens_per_s"] = results["tokens_per_step"] / step_s
  results["flop_per_s"] = flops / step_s
  results["peak_flop_per_s"] = peak = max(results["matmul_flop_per_s"].values())
  results["fraction_of_peak"] = results["flop_per_s"] / peak
  # On a busy machine the best call may have caught a moment with more cores free than the
  # step's median did; the median call of the best size is the like-for-like figure there.
  best_n = max(results["matmul_flop_per_s"], key=results["matmul_flop_per_s"].get)
  median_peak = statistics.median(results["matmul_calls_flop_per_s"][best_n])
  results["median_peak_flop_per_s"] = median_peak
  results["fraction_of_median_peak"] = results["flop_per_s"] / median_peak
  results["ratios"] = {}  # ours / each peer, tokens/s
  kinds = "/".join(model.kinds())
  print(f"\ntransformer train step: batch {results['batch']}, S = {model.text_len} + "
        f"{model.image_len} = {model.seq_len}, width {model.width}, depth {model.depth}, "
        f"{model.heads}x{model.head_dim} heads, {model.attention} attention ({kinds}), "
        f"{model.dtype}; {results['params']:,} parameters; {results['cores']} cores "
        f"({results['cpu']}), jax {results['jax']}; "
        f"GLIBC_TUNABLES={results['glibc_tunables'] or '(unset)'}")
  print(f"compile (trace, lower, compile): {results['compile_s']:.1f} s")
  times = results["step_s"]
  print(f"step: median {step_s * 1e3:.1f} ms of {len(times)} (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}) after {results['warmup']} warm-up")
  print(f"tokens/s: {results['tokens_per_s']:,.0f} ({results['tokens_per_step']:,} a step); "
        f"{results['minor_faults_per_step']:,.0f} minor page faults a step")
  parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in results["analytic_flops"].items())
  print(f"FLOPs a step, analytic: {flops / 1e9:.2f} G ({parts})")
  if results["xla_flops"]:
    print(f"FLOPs a step, XLA cost analysis: {results['xla_flops'] / 1e9:.2f} G "
          f"(analytic / XLA = {flops / results['xla_flops']:.3f})")
  else:
    print("FLOPs a step, XLA cost analysis: not available")
  peaks = ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in results["matmul_flop_per_s"].items())
  print(f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s (best n x n jnp.dot; GFLOP/s by n: "
        f"{peaks})")
  print(f"step: {results['flop_per_s'] / 1e9:.1f} GFLOP/s (analytic FLOPs) = "
        f"{results['fraction_of_peak']:.1%} of the peak ({results['fraction_of_median_peak']:.1%} "
        f"of the median {best_n} x {best_n} call, "
        f"{results['median_peak_flop_per_s'] / 1e9:.0f} GFLOP/s)")
  for name, peer in results.get("peers", {}).items():
    ratio = results["ratios"][name] = results["tokens_per_s"] / peer["tokens_per_s"]
    print(f"{name} (transformers {peer['transformers']}, torch {peer['torch']}, "
          f"{peer['attention']} attention, {peer['params']:,} parameters): step median "
          f"{peer['median_step_s'] * 1e3:.1f} ms, {peer['tokens_per_s']:,.0f} tokens/s; "
          f"ours/peer = {ratio:.2f}")
  if "profile" in results:
    prof = results["profile"]
    print(f"\nwhere the time goes ({prof['steps']} traced steps; per step, summed over "
          f"{prof['instructions']} instructions: {prof['sum_s'] * 1e3:.0f} ms):")
    by_part = collections.defaultdict(dict)
    for key, s in prof["parts_s"].items():
      part, direction = key.split("|")
      by_part[part][direction] = s
    print(f"  {'':48}{'forward':>10}{'backward':>10}{'share':>8}")
    for part, _ in _PARTS:
      fwd, bwd = by_part[part].get("forward", 0.0), by_part[part].get("backward", 0.0)
      print(f"  {part:48}{fwd * 1e3:8.1f}ms{bwd * 1e3:8.1f}ms{(fwd + bwd) / prof['sum_s']:8.1%}")
    print("  slowest instructions (ms per step):")
    for name, s in list(prof["top_instructions_s"].items())[:8]:
      print(f"    {s * 1e3:6.1f}  {name[:110]}")
  for what, key in (("other processes", "foreign_load"), ("this process", "own_load")):
    print(f"CPU used by {what}, in cores: "
          + ", ".join(f"{k} {v:.2f}" for k, v in results[key].items()))
  if max(results["foreign_load"].values()) > 0.1:
    print("warning: the machine was not quiet; these timings are not trustworthy")


def main(argv):
  del argv
  if _HUGEPAGES.value:
    launch.restart_with_hugepages()
  config = _CONFIG.value
  model = TransformerConfig(**config.model)
  train = TransformerTrainConfig(**config.train)
  sizes = [int(n) for n in _PEAK_SIZES.value]
  results = {"batch": train.batch_size, "steps": _STEPS.value, "warmup": _WARMUP.value,
             "model": config.model.to_dict(), "params": transformer.count_params(model),
             "tokens_per_step": train.batch_size * model.seq_len,
             "analytic_flops": step_flops(model, train.batch_size),
             "cores": len(os.sched_getaffinity(0)), "cpu": bench_util.cpu_model(),
             "memory_gib": round(bench_util.memory_gib(), 1), "jax": jax.__version__,
             "backend": jax.default_backend(), "devices": jax.device_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
             "date": datetime.date.today().isoformat(), "foreign_load": {}, "own_load": {}}
  # Two cores: any other job on the machine skews everything, so we measure how much there was.
  _measured(lambda: time.sleep(1.0), results, "before")
  peak_before = _measured(lambda: matmul_peak(sizes, _PEAK_REPEATS.value), results,
                          "peak_before")
  step = TrainStep(model, train, dict(config.mesh), transformer_training.run_rules(config),
                   results)
  results["step_s"] = _measured(lambda: time_steps(step, _STEPS.value, _WARMUP.value, results),
                                results, "train_step")
  results["final_loss"] = float(step.metrics["loss"])
  peak_after = _measured(lambda: matmul_peak(sizes, _PEAK_REPEATS.value), results, "peak_after")
  results["matmul_calls_flop_per_s"] = {n: peak_before[n] + peak_after[n] for n in peak_before}
  results["matmul_flop_per_s"] = {n: max(v) for n, v in results["matmul_calls_flop_per_s"].items()}
  if _PEER.value == "gpt2":
    time_peer(model, train, results)
  if _PROFILE.value:
    _measured(lambda: profile_steps(step, _PROFILE.value, results), results, "profile")
  _report(model, results)
  bench_util.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
