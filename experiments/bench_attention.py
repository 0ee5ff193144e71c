"""Attention alone: forward + backward time of dense and block-sparse attention at the paper's
geometry, for the row, column (on column-major states) and conv masks.

  python experiments/bench_attention.py                         # blocks of 32, 64 and 128
  python experiments/bench_attention.py --hugepages --repeats=20
  python experiments/bench_attention.py --block_sizes=32 --kinds=conv --json_out=attention.json

What is timed: `jax.vjp` of `attention.attend` on random q, k, v [batch, text_len + grid^2,
heads, head_dim] and a random output cotangent, returning the output and the three gradients,
float32, compiled ahead of time (compilation apart). Dense attention computes every score whatever
the mask, so it is timed once (with the row mask). All programs take turns call by call for
`--repeats` rounds, in a new random order each round (the program run just after dense attention
pays for the memory dense attention released), so that a change in the machine's load hits them
alike; the table gives medians. For each mask and block size: the fraction of non-empty blocks (of the permuted mask for
column layers), the speedup over dense, and block-sparse time / (dense time x fraction): 1 would be
dense attention's efficiency on only the non-empty blocks. Also the speedup in this process's CPU
time (all threads), which other jobs on a shared machine disturb less than wall time, and each
program's temporary buffers (XLA's temp allocation: under glibc's 32 MiB mmap threshold they are
reused from call to call; over it they are page-faulted in afresh at every call, which costs dense
attention about 40% of its time here). The outputs and gradients are checked against dense ones
(largest absolute difference). The CPU other processes used meanwhile is reported (see
bench_util).
"""

import datetime
import os
import random
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.train import launch
from dalle_jax.transformer import attention, block_plan, masks
import bench_util  # experiments/bench_util.py: this script's folder is on sys.path

_KINDS = flags.DEFINE_list("kinds", ["row", "column", "conv"], "Masks to time (masks.KINDS).")
_BLOCK_SIZES = flags.DEFINE_list("block_sizes", ["32", "64", "128"], "Block sizes to time.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.", lower_bound=1)
_TEXT_LEN = flags.DEFINE_integer("text_len", 256, "Text positions.", lower_bound=0)
_GRID = flags.DEFINE_integer("grid", 32, "Image tokens per side.", lower_bound=1)
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.", lower_bound=1)
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Dimension per head.", lower_bound=1)
_KERNEL = flags.DEFINE_integer("kernel", 11, "The conv mask's kernel size (the paper's 11).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds (median).", lower_bound=1)
_HUGEPAGES = flags.DEFINE_bool(
    "hugepages", False, "Restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: malloc asks for "
    "transparent huge pages, so XLA's per-call buffers page-fault in far less often.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def compiled_fwd_bwd(attend, args):
  """attend(q, k, v) -> (out, dq, dk, dv) for a cotangent, compiled; and its compile time."""
  def fwd_bwd(q, k, v, d_out):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(d_out))
  start = time.perf_counter()
  compiled = jax.jit(fwd_bwd).lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_in_turns(programs: dict, args, repeats: int) -> tuple[dict, dict, float]:
  """Wall and CPU seconds of each call of each program, the programs taking turns; and the
  foreign load."""
  for fn in programs.values():
    jax.block_until_ready(fn(*args))  # warm-up
  seconds = {name: [] for name in programs}
  cpu = {name: [] for name in programs}
  order, shuffle = list(programs.items()), random.Random(0).shuffle
  before, wall = bench_util.cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    shuffle(order)
    for name, fn in order:
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      seconds[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return seconds, cpu, bench_util.foreign_load(before, time.perf_counter() - wall)


def main(argv):
  del argv
  if _HUGEPAGES.value:
    launch.restart_with_hugepages()
  text_len, grid = _TEXT_LEN.value, _GRID.value
  seq = text_len + grid * grid
  rng = np.random.default_rng(0)
  shape = (_BATCH.value, seq, _HEADS.value, _HEAD_DIM.value)
  args = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]
  results = {"shape": shape, "date": datetime.date.today().isoformat(),
             "cpu": bench_util.cpu_model(), "cores": len(os.sched_getaffinity(0)),
             "jax": jax.__version__, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "runs": {}}
  programs, fractions, compile_s = {}, {}, {}
  row_mask = masks.attention_mask("row", text_len, grid, grid, _KERNEL.value)
  programs["dense"], compile_s["dense"] = compiled_fwd_bwd(
      lambda q, k, v: attention.attend(q, k, v, row_mask, "dense"), args)
  # jax.nn.dot_product_attention: cuDNN's fused kernel on a GPU, XLA elsewhere (a second baseline).
  programs["fused"], compile_s["fused"] = compiled_fwd_bwd(
      lambda q, k, v: attention.attend(q, k, v, row_mask, "fused"), args)
  for kind in _KINDS.value:
    mask = masks.attention_mask(kind, text_len, grid, grid, _KERNEL.value)
    perm = masks.column_major_permutation(text_len, grid, grid) if kind == "column" else None
    for block_size in (int(b) for b in _BLOCK_SIZES.value):
      name = f"{kind}/{block_size}"
      layout = block_plan.block_layout(mask if perm is None else mask[perm][:, perm],
                                         block_size)
      fractions[name] = layout.fraction
      programs[name], compile_s[name] = compiled_fwd_bwd(
          lambda q, k, v, mask=mask, perm=perm, block_size=block_size: attention.attend(
              q, k, v, mask, "block_sparse", perm, block_size), args)
  # Correctness first: each block-sparse program against dense attention with its own mask.
  errors = {}
  for kind in _KINDS.value:
    mask = masks.attention_mask(kind, text_len, grid, grid, _KERNEL.value)
    expected = compiled_fwd_bwd(lambda q, k, v, mask=mask: attention.attend(q, k, v, mask),
                                args)[0](*args)
    for name in (n for n in programs if n.startswith(kind + "/")):
      errors[name] = max(float(jnp.abs(a - b).max()) for a, b in zip(programs[name](*args),
                                                                     expected))
  seconds, cpu, load = time_in_turns(programs, args, _REPEATS.value)
  temp_mib = {name: fn.memory_analysis().temp_size_in_bytes / 2**20
              for name, fn in programs.items()}
  dense_s, dense_cpu = statistics.median(seconds["dense"]), statistics.median(cpu["dense"])
  print(f"\nattention forward + backward: batch {shape[0]}, seq {text_len} + {grid}x{grid} = "
        f"{seq}, {shape[2]} heads of {shape[3]}, float32; median of {_REPEATS.value} rounds; "
        f"{results['cores']} cores ({results['cpu']}), jax {jax.__version__}; "
        f"GLIBC_TUNABLES={results['glibc_tunables'] or '(unset)'}\n")
  print(f"dense: {dense_s * 1e3:.1f} ms (min {min(seconds['dense']) * 1e3:.1f}; CPU "
        f"{dense_cpu * 1e3:.1f} ms; temp {temp_mib['dense']:.0f} MiB; compile "
        f"{compile_s['dense']:.1f} s)")
  fused_s = statistics.median(seconds["fused"])
  print(f"fused (jax.nn.dot_product_attention, {jax.default_backend()}): {fused_s * 1e3:.1f} ms, "
        f"{dense_s / fused_s:.2f}x dense\n")
  results["fused_median_s"] = fused_s
  print("| mask | block | non-empty blocks | block-sparse | speedup | / (dense x fraction) "
        "| CPU speedup | temp | max abs diff | compile |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for name, fraction in fractions.items():
    sparse_s, sparse_cpu = statistics.median(seconds[name]), statistics.median(cpu[name])
    kind, block_size = name.split("/")
    results["runs"][name] = {"fraction": fraction, "median_s": sparse_s, "times_s": seconds[name],
                             "speedup": dense_s / sparse_s,
                             "ratio_to_dense_x_fraction": sparse_s / (dense_s * fraction),
                             "cpu_median_s": sparse_cpu, "cpu_speedup": dense_cpu / sparse_cpu,
                             "temp_mib": temp_mib[name], "max_abs_diff": errors[name],
                             "compile_s": compile_s[name]}
    print(f"| {kind} | {block_size} | {fraction:.1%} | {sparse_s * 1e3:.1f} ms | "
          f"{dense_s / sparse_s:.2f}x | {sparse_s / (dense_s * fraction):.2f} | "
          f"{dense_cpu / sparse_cpu:.2f}x | {temp_mib[name]:.0f} MiB | "
          f"{errors[name]:.1e} | {compile_s[name]:.1f} s |")
  results["dense"] = {"median_s": dense_s, "times_s": seconds["dense"],
                      "cpu_median_s": dense_cpu, "temp_mib": temp_mib["dense"],
                      "compile_s": compile_s["dense"]}
  results["foreign_load_cores"] = load
  print(f"\nCPU used by other processes meanwhile: {load:.2f} cores")
  if load > 0.1:
    print("warning: the machine was not quiet; these timings are not trustworthy")
  bench_util.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
