"""dVAE throughput on CPU: our JAX dVAE against OpenAI's PyTorch `dall_e` modules, same run.

  python experiments/bench_dvae.py                       # 256x256, batch 4, 5 timed repeats
  python experiments/bench_dvae.py --batch=1 --repeats=3 --json_out=bench.json
  python experiments/bench_dvae.py --hugepages           # both sides on transparent huge pages

Both sides get the same random weights (the torch state dict converted by `dalle_jax.dvae.openai_weights`)
and the same images. Encode = uint8 pixels -> argmax codes; decode = codes -> uint8 pixels
(torch: the official one-hot float input; ours: integer codes). Outputs are compared first, so
that the two timings are of one computation. float32 throughout; both use every core this
process may run on (torch.set_num_threads; XLA's default pool). The two take turns call by call,
and the CPU time other processes used meanwhile is reported: on two cores any other job skews
the numbers. No XLA flag is set. Results: BENCHMARKS.md.
"""

import datetime
import os
import statistics
import time
from typing import TYPE_CHECKING

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.dvae import model as dvae, openai_weights
from dalle_jax.train import launch
import bench_util  # experiments/bench_util.py: this script's folder is on sys.path

if TYPE_CHECKING:  # torch and dall_e are imported only when --torch: JAX alone needs neither.
  import torch

_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.", lower_bound=1)
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image side in pixels.", lower_bound=8)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls before timing.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the weights and the images.")
_TORCH = flags.DEFINE_bool("torch", True, "Also run OpenAI's PyTorch modules.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")
_HUGEPAGES = flags.DEFINE_bool(
    "hugepages", False, "Restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: malloc asks for "
    "transparent huge pages, so both sides page-fault their big buffers in far less often.")


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------

def _time(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
  """Seconds per call of each of `fns` (each blocks until its result is ready).

  The contenders take turns, one call each, so that a drift in machine load hits all of them.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  seconds = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      seconds[name].append(time.perf_counter() - start)
  return seconds


# ---------------------------------------------------------------------------------------------
# OpenAI's modules, and the check that both compute the same thing.
# ---------------------------------------------------------------------------------------------

def _torch_contender(config: dvae.DVAEConfig, results: dict) -> tuple[dict, dict]:
  """OpenAI's Encoder and Decoder with fresh random weights -> (their steps, our params)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import dall_e  # pylint: disable=g-import-not-at-top
  torch.manual_seed(_SEED.value)
  torch.set_num_threads(results["cores"])
  results["torch"] = torch.__version__
  results["torch_threads"] = torch.get_num_threads()
  t_enc = dall_e.Encoder(vocab_size=config.vocab_size).eval()
  t_dec = dall_e.Decoder(vocab_size=config.vocab_size).eval()
  params = {part: openai_weights.openai_dvae_to_flax(module.state_dict(), part)
            for part, module in (("encoder", t_enc), ("decoder", t_dec))}
  params = jax.device_put(params)  # Once: NumPy leaves would be copied in on every call.

  def encode(x: np.ndarray) -> "torch.Tensor":
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return torch.argmax(t_enc(dall_e.map_pixels(pixels)), dim=1)

  def stats(z: "torch.Tensor") -> "torch.Tensor":  # The official usage: a one-hot float input.
    return t_dec(F.one_hot(z, config.vocab_size).permute(0, 3, 1, 2).float())

  def decode(z: "torch.Tensor") -> "torch.Tensor":  # What our `dvae.decode` returns.
    pixels = dall_e.unmap_pixels(torch.sigmoid(stats(z)[:, :3]))
    return torch.round(pixels * 255.0).to(torch.uint8).permute(0, 2, 3, 1)

  return {"encode": encode, "stats": stats, "decode": decode}, params


def _check_agreement(config: dvae.DVAEConfig, params: dict, images: np.ndarray,
                     codes: jax.Array, torch_steps: dict, results: dict) -> "torch.Tensor":
  """Both encoders give the same codes and both decoders the same pixels; returns torch's codes."""
  t_codes = torch_steps["encode"](images)
  theirs = t_codes.numpy()
  # Codes could differ only where two logits tie to float32 rounding.
  results["codes_agree"] = float(np.mean(np.asarray(codes) == theirs))
  theirs_stats = torch_steps["stats"](t_codes).permute(0, 2, 3, 1).numpy()
  z = jnp.asarray(theirs, jnp.int32)
  ours_stats = np.asarray(jax.jit(lambda p, z: dvae.decoder_stats(config, p, z))(params, z))
  results["decoder_stats_max_abs_diff"] = float(np.max(np.abs(ours_stats - theirs_stats)))
  results["decoder_stats_max_abs"] = float(np.max(np.abs(theirs_stats)))
  ours_pixels = np.asarray(jax.jit(lambda p, z: dvae.decode(config, p, z))(params, z), np.int32)
  theirs_pixels = torch_steps["decode"](t_codes).numpy().astype(np.int32)
  results["decoded_pixels_max_abs_diff"] = int(np.max(np.abs(ours_pixels - theirs_pixels)))
  print(f"agreement: codes {results['codes_agree']:.4%} identical; decoder stats max |diff| "
        f"{results['decoder_stats_max_abs_diff']:.2e} (max |value| "
        f"{results['decoder_stats_max_abs']:.2e}); decoded uint8 pixels max |diff| "
        f"{results['decoded_pixels_max_abs_diff']}")
  if results["codes_agree"] < 0.99 or results["decoded_pixels_max_abs_diff"] > 1:
    raise SystemExit("the two implementations disagree: their timings would not be comparable")
  return t_codes


def _report(results: dict) -> None:
  """Images/s (median call), ratios, and how quiet the machine was; into `results` and printed."""
  batch, side, repeats = results["batch"], results["resolution"], results["repeats"]
  print(f"\ndVAE {side}x{side}, batch {batch}, float32, {results['cores']} cores "
        f"({results['cpu']}); median of {repeats} after {results['warmup']} warm-up; "
        f"GLIBC_TUNABLES={results['glibc_tunables'] or '(unset)'}")
  print(f"{'':10}{'encode img/s':>14}{'decode img/s':>14}")
  names = ["jax"] + (["torch"] if "torch_encode_s" in results else [])
  for name in names:
    for step in ("encode", "decode"):
      seconds = statistics.median(results[f"{name}_{step}_s"])
      results[f"{name}_{step}_images_per_s"] = batch / seconds
    print(f"{name:10}{results[f'{name}_encode_images_per_s']:14.3f}"
          f"{results[f'{name}_decode_images_per_s']:14.3f}")
  if "torch" in names:
    for step in ("encode", "decode"):
      results[f"{step}_ratio"] = (results[f"jax_{step}_images_per_s"]
                                  / results[f"torch_{step}_images_per_s"])
    print(f"{'jax/torch':10}{results['encode_ratio']:13.2f}x{results['decode_ratio']:13.2f}x")
  load = ", ".join(f"{k} {v:.2f}" for k, v in results["foreign_load"].items())
  print(f"CPU used by other processes, in cores: {load}")
  if max(results["foreign_load"].values()) > 0.1:
    print("warning: the machine was not quiet; these timings are not trustworthy")
  print(f"jax compile: encode {results['jax_encode_compile_s']:.1f} s, "
        f"decode {results['jax_decode_compile_s']:.1f} s")


def main(argv):
  del argv
  if _HUGEPAGES.value:
    launch.restart_with_hugepages()
  batch, side, repeats, warmup = _BATCH.value, _RESOLUTION.value, _REPEATS.value, _WARMUP.value
  config = dvae.DVAEConfig(resolution=side)
  cores = len(os.sched_getaffinity(0))
  rng = np.random.default_rng(_SEED.value)
  images = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
  results = {"batch": batch, "resolution": side, "repeats": repeats, "warmup": warmup,
             "cores": cores, "cpu": bench_util.cpu_model(),
             "memory_gib": round(bench_util.memory_gib(), 1),
             "jax": jax.__version__, "backend": jax.default_backend(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
             "transparent_hugepage":
                 bench_util.read("/sys/kernel/mm/transparent_hugepage/enabled"),
             "date": datetime.date.today().isoformat(),
             "foreign_load": {}}
  # Two cores: any other job on the machine skews both sides, so we measure how much there was.
  start, before = time.perf_counter(), bench_util.cpu_seconds()
  time.sleep(1.0)
  results["foreign_load"]["before"] = bench_util.foreign_load(before,
                                                              time.perf_counter() - start)

  if _TORCH.value:
    torch_steps, params = _torch_contender(config, results)
  else:
    params = dvae.init(config, jax.random.key(_SEED.value))
  # Ours: compiled ahead of time so that compilation is timed on its own.
  codes_shape = jax.ShapeDtypeStruct((batch, config.code_resolution, config.code_resolution),
                                     jnp.int32)
  start = time.perf_counter()
  encode = jax.jit(lambda p, x: dvae.encode(config, p, x)).lower(params, images).compile()
  results["jax_encode_compile_s"] = time.perf_counter() - start
  start = time.perf_counter()
  decode = jax.jit(lambda p, z: dvae.decode(config, p, z)).lower(params, codes_shape).compile()
  results["jax_decode_compile_s"] = time.perf_counter() - start
  images_dev = jax.device_put(images)
  codes = encode(params, images_dev).block_until_ready()
  steps = {"jax_encode": lambda: encode(params, images_dev).block_until_ready(),
           "jax_decode": lambda: decode(params, codes).block_until_ready()}

  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    with torch.inference_mode():
      t_codes = _check_agreement(config, params, images, codes, torch_steps, results)
      steps["torch_encode"] = lambda: torch_steps["encode"](images)
      steps["torch_decode"] = lambda: torch_steps["decode"](t_codes)
      for step in ("encode", "decode"):
        start, before = time.perf_counter(), bench_util.cpu_seconds()
        timed = _time({k: v for k, v in steps.items() if k.endswith(step)}, repeats, warmup)
        results["foreign_load"][step] = bench_util.foreign_load(before,
                                                                time.perf_counter() - start)
        results.update({f"{k}_s": v for k, v in timed.items()})
  else:
    start, before = time.perf_counter(), bench_util.cpu_seconds()
    results.update({f"{k}_s": v for k, v in _time(steps, repeats, warmup).items()})
    results["foreign_load"]["timing"] = bench_util.foreign_load(before,
                                                                time.perf_counter() - start)

  _report(results)
  bench_util.write_json(_JSON_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
