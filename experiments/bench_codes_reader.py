"""Stage-2 reader: host memory and time per batch of `CodeBatches` against the `.npz` reader.

  python experiments/bench_codes_reader.py                  # 10M generated examples, 4x4 codes
  python experiments/bench_codes_reader.py --smoke          # 20k examples, seconds (the test)

Both readers get the same generated data (captions "a red circle number i" and random codes),
once as the `.npz` shards the old reader loaded whole and once as code shards. Each is measured in
a fresh process: the time to open the data, the peak RSS above the process's size after imports
(host memory), and the median time of `--batches` global batches of `--batch` rows on one host,
BPE dropout on. The old reader (kept here only for this comparison) concatenates every shard in
memory as int32 codes and fixed-width strings and draws a permutation of N for every batch.
The grid is small so that the old reader fits in memory at 10M examples; its memory grows with
the grid (int32: 4 KiB an example at 32x32), the new reader's does not.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

import bench_util
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import code_shards
from dalle_jax.data.code_batches import CodeBatches

_EXAMPLES = flags.DEFINE_integer("examples", 10_000_000, "Generated examples.", lower_bound=1)
_GRID = flags.DEFINE_integer("grid", 4, "Codes per side.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 1024, "Rows per global batch.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches (median).", lower_bound=1)
_SHARD = flags.DEFINE_integer("shard_size", 100_000, "Examples per shard.", lower_bound=1)
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/bench_codes_reader", "Where the data goes "
                                "(kept and reused for the same --examples and --grid).")
_SMOKE = flags.DEFINE_bool("smoke", False, "20k examples, batch 256, 3 batches.")
_MEASURE = flags.DEFINE_enum("measure", None, ["old", "new"], "Internal: measure one reader.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


def _caption(i: int) -> str:
  return f"a red circle number {i}"


class OldCodeBatches:
  """The `.npz` reader's logic, for comparison: all codes and captions in host memory."""

  def __init__(self, directory, tokenizer, batch_size, seed=0):
    paths = sorted(p for p in os.listdir(directory) if p.endswith(".npz"))
    parts = [np.load(os.path.join(directory, p)) for p in paths]
    self.codes = np.concatenate([p["codes"] for p in parts]).astype(np.int32)
    self.captions = np.concatenate([p["captions"] for p in parts])
    self.keys = np.concatenate([p["keys"] for p in parts])
    self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
    self.epoch, self.position = 0, 0

  def __next__(self):
    if self.position + self.batch_size > len(self.codes):
      self.epoch, self.position = self.epoch + 1, 0
    order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.codes))
    indices = order[self.position:self.position + self.batch_size]
    self.position += self.batch_size
    text = np.empty((len(indices), self.tokenizer.text_len), np.int32)
    for row, index in enumerate(indices):
      candidates = str(self.captions[index]).split("\n")
      rng = np.random.default_rng([self.seed, self.epoch, int(index)])
      caption = candidates[rng.integers(len(candidates))]
      text[row], _ = self.tokenizer.encode(caption, training=True, rng=rng)
    return {"text": text, "codes": self.codes[indices]}


def generate(work_dir: str, examples: int, grid: int, shard_size: int) -> None:
  """Both formats of the same data, unless `work_dir` already holds them."""
  marker = os.path.join(work_dir, "generated.json")
  wanted = {"examples": examples, "grid": grid}
  if os.path.exists(marker) and json.load(open(marker)) == wanted:
    return
  for sub in ("npz", "codes"):
    os.makedirs(os.path.join(work_dir, sub), exist_ok=True)
    for name in os.listdir(os.path.join(work_dir, sub)):
      os.remove(os.path.join(work_dir, sub, name))
  rng = np.random.default_rng(0)
  for index, start in enumerate(range(0, examples, shard_size)):
    count = min(shard_size, examples - start)
    codes = rng.integers(0, 8192, (count, grid, grid)).astype(np.int16)
    captions = [_caption(i) for i in range(start, start + count)]
    keys = [str(i) for i in range(start, start + count)]
    np.savez(os.path.join(work_dir, "npz", f"codes-000-{index:05d}.npz"), codes=codes,
             captions=np.array(captions), keys=np.array(keys))
    code_shards.write_shard(code_shards.shard_path(os.path.join(work_dir, "codes"), 0, index),
                            codes, captions, keys)
  tokenizer_lib.train_tokenizer([_caption(i) for i in range(1000)], 300, 16,
                                os.path.join(work_dir, "tokenizer"))
  with open(marker, "w") as f:
    json.dump(wanted, f)


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure(kind: str, work_dir: str, batch: int, batches: int) -> dict:
  """One reader in this process: open time, peak RSS above the start, median seconds a batch."""
  tokenizer = tokenizer_lib.Tokenizer.load(os.path.join(work_dir, "tokenizer"))
  start_rss = _status("VmRSS")
  start = time.perf_counter()
  if kind == "old":
    reader = OldCodeBatches(os.path.join(work_dir, "npz"), tokenizer, batch)
  else:
    reader = CodeBatches(code_shards.CodeShards(os.path.join(work_dir, "codes")), tokenizer,
                         batch)
  next(reader)  # the new reader's threads start on the first batch
  open_seconds = time.perf_counter() - start
  times = []
  cpu = bench_util.cpu_seconds()
  wall = time.perf_counter()
  for _ in range(batches):
    start = time.perf_counter()
    next(reader)
    times.append(time.perf_counter() - start)
  return {"reader": kind, "open_and_first_batch_s": round(open_seconds, 3),
          "seconds_per_batch": round(statistics.median(times), 4),
          "peak_rss_delta_mib": round((_status("VmHWM") - start_rss) / 2 ** 20, 1),
          "foreign_load": round(bench_util.foreign_load(cpu, time.perf_counter() - wall), 2)}


def main(argv):
  del argv
  examples, batch, batches = _EXAMPLES.value, _BATCH.value, _BATCHES.value
  if _SMOKE.value:
    examples, batch, batches = 20_000, 256, 3
  work_dir = _WORK_DIR.value
  if _MEASURE.value:
    print(json.dumps(measure(_MEASURE.value, work_dir, batch, batches)))
    return
  start = time.perf_counter()
  generate(work_dir, examples, _GRID.value, _SHARD.value)
  print(f"data: {examples:,} examples of {_GRID.value}x{_GRID.value} codes in {work_dir} "
        f"({time.perf_counter() - start:.0f} s)")
  results = []
  for kind in ("old", "new"):
    command = [sys.executable, __file__, f"--measure={kind}", f"--work_dir={work_dir}",
               f"--batch={batch}", f"--batches={batches}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    results.append(json.loads(output.strip().splitlines()[-1]))
  print(f"| reader | open + first batch (s) | s / batch of {batch} | peak RSS delta (MiB) "
        "| foreign load |\n|---|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['reader']} | {r['open_and_first_batch_s']} | {r['seconds_per_batch']} | "
          f"{r['peak_rss_delta_mib']} | {r['foreign_load']} |")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"examples": examples, "grid": _GRID.value, "batch": batch,
                 "machine": bench_util.cpu_model(), "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
