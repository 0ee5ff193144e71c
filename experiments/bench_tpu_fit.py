"""The paper's models compiled for TPU slices on this host: per-chip memory, FLOPs, bounds.

  .venv/bin/python experiments/bench_tpu_fit.py --out=/tmp/tpu_fit.json
  .venv/bin/python experiments/bench_tpu_fit.py --cases=scan_unrolled,scan_scanned

Each case is the launch scripts' own fit check (`dalle_jax.scaling.fit_check`, what `--fit_check` runs),
compiled one after another (each takes minutes of CPU at the paper's size). Prints one markdown
row per case and, with --out, writes every figure as JSON. Needs libtpu (`pip install -e .[tpu]`).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags
import jax

import bench_util
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.scaling import fit_check
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.training import TransformerTrainConfig

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.configs import dvae_paper, transformer_paper  # noqa: E402

_CASES = flags.DEFINE_list("cases", ["12b_v5p_128", "12b_v5e_256", "12b_v6e_256", "dvae_v5p_64",
                                     "sample_12b_v5p_8"], "Which cases to compile, in order.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")


def _transformer(**model):
  config = transformer_paper.get_config()
  return TransformerConfig(**{**config.model, **model}), TransformerTrainConfig(**config.train)


def _train_case(target, fsdp, tensor, **model):
  model, train = _transformer(**model)
  return lambda: fit_check.transformer_train(model, train, dict(data=-1, fsdp=fsdp,
                                                                tensor=tensor),
                                             fit_check.Target.parse(target))


def _scan_case(scan):
  """The paper's layers at width 256 (compile time depends on the program, not the width), 16
  deep, batch 16: compile time unrolled vs scanned."""
  model, train = _transformer(width=256, heads=4, head_dim=64, depth=16, scan_layers=scan)
  train = dataclasses.replace(train, batch_size=16)
  return lambda: fit_check.transformer_train(model, train, dict(data=-1, fsdp=2, tensor=2),
                                             fit_check.Target.parse("v5e:2x2"))


def _dvae_case():
  config = dvae_paper.get_config()
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  return fit_check.dvae_train(model, train, dict(data=-1, fsdp=8, tensor=1),
                              fit_check.Target.parse("v5p:4x4x4"))


def _sample_case(target):
  model, _ = _transformer()
  return lambda: fit_check.transformer_sampling(model, dict(data=-1, fsdp=4, tensor=2),
                                                fit_check.Target.parse(target), batch=8)


CASES = {
    "12b_v5p_128": _train_case("v5p:4x4x8", 64, 2),
    "12b_v5e_256": _train_case("v5e:16x16", 128, 2),
    "12b_v6e_256": _train_case("v6e:16x16", 128, 2),
    "12b_v4_512": _train_case("v4:8x8x8", 256, 2),
    "dvae_v5p_64": _dvae_case,
    "sample_12b_v5p_8": _sample_case("v5p:2x2x2"),
    "sample_12b_v5e_8": _sample_case("v5e:2x4"),
    "scan_unrolled": _scan_case(False),
    "scan_scanned": _scan_case(True),
}


def main(argv):
  del argv
  unknown = sorted(set(_CASES.value) - set(CASES))
  if unknown:
    raise ValueError(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
  print(f"# {bench_util.cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
  print("| case | slice | mesh | state GiB | temps GiB | total GiB / HBM | TFLOP/chip (XLA's) | "
        "bound ms | bound items/s | compile s (CPU s, others' load) | splash |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  results = {}
  for name in _CASES.value:
    before, began = bench_util.cpu_seconds(), time.perf_counter()
    try:
      report = CASES[name]()
    except fit_check.FitError as error:
      print(f"| {name} | refused: {error} |", flush=True)
      results[name] = {"refused": str(error)}
      continue
    wall = time.perf_counter() - began
    own_cpu = bench_util.own_load(before, wall) * wall
    load = bench_util.foreign_load(before, wall)
    g = lambda n: f"{n / fit_check.GIB:.2f}"
    print(f"| {name} | {report.target.name} | {fit_check._mesh_text(report.mesh)} | "
          f"{g(report.state_bytes)} | {g(report.temp_bytes)} | {g(report.total_bytes)} / "
          f"{g(report.target.chip.hbm_bytes)} | {report.step_flops / 1e12:.1f} "
          f"({report.flops / 1e12:.1f}) | "
          f"{report.call_s_bound * 1e3:.1f} | {report.items_per_s_bound:,.0f} "
          f"{report.item_name} | {report.compile_s:.0f} ({own_cpu:.0f}, {load:.1f} cores) | "
          f"{'yes' if any('splash' in k for k in report.kernels) else 'no'} |", flush=True)
    results[name] = {**dataclasses.asdict(report), "target": report.target.name,
                     "total_bytes": report.total_bytes, "fits": report.fits,
                     "step_flops": report.step_flops,
                     "call_s_bound": report.call_s_bound,
                     "items_per_s_bound": report.items_per_s_bound, "own_cpu_s": own_cpu,
                     "foreign_load_cores": load}
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
