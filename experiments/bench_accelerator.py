"""One run on an accelerator, each figure against its physical limit: the transformer's train step
(MFU), attention per mask (sparse against the best dense path), sampling the paper's 12B model
(against the HBM bound of a decode step) and the dVAE (against OpenAI's PyTorch modules).

  python experiments/bench_accelerator.py --json_out=acc.json --markdown_out=acc.md  # full size
  python experiments/bench_accelerator.py --smoke     # tiny sizes: every path in seconds, on CPU
  bash experiments/run_accelerator_bench.sh run      # on the H200 (BENCHMARKS.md says how)

Parts, in this order (each in one run, bf16 unless said; `--parts` picks some):
  peak       bf16 n x n x n matmul (FLOP/s) and a large elementwise copy (bytes read + written
             per second): the limits every other part is set against.
  attention  forward + backward at the paper's geometry (256 text + 32x32 image tokens) for the
             row, column, conv and dense causal masks: dense XLA, cuDNN
             (`jax.nn.dot_product_attention(implementation="cudnn")`, the mask as its mask, causal
             as is_causal) and our block-sparse path at several block sizes.
  train      the full train step (`transformer_training.make_train_step`: forward, loss,
             backward, clipping, AdamW, EMA) of a one-GPU config with the paper's mask schedule and
             block-sparse attention at the fastest block size the attention part found: tokens/s
             and MFU = model FLOPs (`dalle_jax.scaling.roofline.train_step_flops`: 6 x params x tokens
             plus the attention the masks admit; no recomputation) / time / the matmul peak.
  dvae       the paper's dVAE at 256px, encode (uint8 pixels -> argmax codes) and decode (codes ->
             uint8 pixels), float32 and bfloat16, against OpenAI's `dall_e` modules on the same
             device with the same weights (`dalle_jax.dvae.openai_weights`): torch float32, and bfloat16 under
             torch.autocast; their decoder takes one-hot floats, as its official usage does.
  sample     the paper's 12B transformer (random bfloat16 weights), `sampling.sample_codes` with
             the sparse decode step, at batch 1 and the largest batch that fits: image tokens/s,
             seconds per image (codes, and with the dvae part's bf16 decode per image added)
             against the roofline of 1024 decode steps: max(bytes read / copy bandwidth,
             FLOPs / peak), bytes = the parameters a step reads + the cached keys and values its
             masks admit.

Timing: every program is compiled and called once untimed; then samples of back-to-back calls
(enough to last `min_sample_s`), each waited for, until `repeats` samples or the part's budget;
the median sample is reported. A global guard writes what is done and exits (status 3) at
`--time_limit_s`; each part also stops starting programs once its budget is spent, and a part
that fails records its error and lets the next one run. Paths that cannot run on this platform
(cuDNN off GPU) are reported as "not available on <platform>".
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import threading
import time
import traceback

from absl import app, flags
import jax

import accelerator_dvae  # experiments/: this script's folder is on sys.path
import accelerator_parts
import accelerator_report

# The parts, in the order they run: the peak first (every other part is set against it), the
# 12B model's sampling last (it takes what device memory the others leave).
PARTS = {"peak": accelerator_parts.peak, "attention": accelerator_parts.attention_part,
         "train": accelerator_parts.train, "dvae": accelerator_dvae.run,
         "sample": accelerator_parts.sample}

_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: every path in seconds on a CPU.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Parts to run (always in the order above).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")
_MARKDOWN_OUT = flags.DEFINE_string("markdown_out", None, "Write the table here as Markdown.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", None, "Write what is done and exit at this "
                                 "many seconds (default: the sizes' own, 450 at full size).")
_NOMINAL_BANDWIDTH = flags.DEFINE_float(
    "nominal_bandwidth_tb_s", 0.0, "The device's datasheet HBM bandwidth (H200: 4.8); when set, "
    "sampling is also set against it (the measured copy bandwidth is always used).")


class Guard:
  """Writes the results and ends the process when the time limit passes, whatever is running
  (a compile cannot be interrupted otherwise)."""

  def __init__(self, limit_s: float, write):
    self.part = None
    self._write = write
    self._timer = threading.Timer(limit_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def _expire(self):
    self._write(timed_out_in=self.part or "between parts")
    print(f"time limit reached during {self.part}: partial results written", flush=True)
    os._exit(3)  # pylint: disable=protected-access

  def cancel(self):
    self._timer.cancel()


def machine() -> dict:
  device = jax.devices()[0]
  facts = {"platform": device.platform, "device": device.device_kind,
           "devices": jax.device_count(), "jax": jax.__version__,
           "jaxlib": _version("jaxlib"),
           "python": platform.python_version(), "host_cores": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "memory_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")}
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    facts["device_memory_gib"] = stats["bytes_limit"] / 2**30
  return facts


def _version(package: str) -> str | None:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(package)
  except Exception:  # pylint: disable=broad-except
    return None


def main(argv):
  del argv
  sizes = accelerator_parts.SMOKE if _SMOKE.value else accelerator_parts.FULL
  unknown = sorted(set(_PARTS.value) - set(PARTS))
  if unknown:
    raise app.UsageError(f"unknown parts {unknown}; choose from "
                         f"{', '.join(PARTS)}")
  limit = _TIME_LIMIT.value or sizes.time_limit_s
  results = {"sizes": "smoke" if _SMOKE.value else "full", "machine": machine(),
             "time_limit_s": limit, "budgets_s": dict(sizes.budgets_s),
             "nominal_bandwidth_bytes_per_s": _NOMINAL_BANDWIDTH.value * 1e12 or None,
             "elapsed_s": {}, "cpu_s": {}}
  lock = threading.Lock()

  def write(**extra):
    with lock:
      results.update(extra)
      # The guard's thread writes while a part may still be adding to its section: retry.
      for attempt in range(3):
        try:
          text = json.dumps(results, indent=2, default=str)
          table = accelerator_report.markdown(results)
          break
        except RuntimeError:  # a dict changed size while being read
          if attempt == 2:
            raise
      for path, content in ((_JSON_OUT.value, text), (_MARKDOWN_OUT.value, table)):
        if path:
          with open(path + ".tmp", "w") as f:
            f.write(content)
          os.replace(path + ".tmp", path)

  start = time.perf_counter()
  guard = Guard(limit, write)
  print(f"bench_accelerator ({results['sizes']}): {results['machine']}", flush=True)
  for part in PARTS:
    if part not in _PARTS.value:
      continue
    guard.part, part_start, part_cpu = part, time.perf_counter(), time.process_time()
    results[part] = section = {}
    try:
      PARTS[part](sizes, results, section)
    except Exception as e:  # pylint: disable=broad-except
      section["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
      section["traceback"] = traceback.format_exc()[-4000:]
      print(f"{part} failed: {section['error'][:500]}", flush=True)
    results["elapsed_s"][part] = time.perf_counter() - part_start
    results["cpu_s"][part] = time.process_time() - part_cpu
    gc.collect()
    write()
    print(f"{part}: done in {results['elapsed_s'][part]:.1f} s ({results['cpu_s'][part]:.1f} s "
          "of CPU)", flush=True)
  guard.cancel()
  results["elapsed_s"]["total"] = time.perf_counter() - start
  write()
  print(accelerator_report.markdown(results))


if __name__ == "__main__":
  app.run(main)
