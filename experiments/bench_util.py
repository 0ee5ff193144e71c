"""What the benchmark scripts share: machine facts, how much CPU other processes used, and XLA's
FLOP count of a compiled program.

On two cores any other job skews a timing badly, so each measurement is bracketed:

  before = cpu_seconds(); start = time.perf_counter()
  ...                                          # the measured work
  load = foreign_load(before, time.perf_counter() - start)   # cores' worth; 0 on a quiet machine

Imported by the scripts in this folder as `import bench_util` (a script's own folder is on
sys.path).
"""

import json
import os
import platform
from typing import Any


def cpu_seconds() -> tuple[float, float]:
  """(CPU seconds all processes have used, CPU seconds this process has used) so far."""
  with open("/proc/stat") as f:
    jiffies = [int(v) for v in f.readline().split()[1:]]
  busy = sum(jiffies) - jiffies[3] - jiffies[4]  # everything but idle and iowait
  own = os.times()
  return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def foreign_load(since: tuple[float, float], wall: float) -> float:
  """Cores' worth of CPU that other processes used since `since` (0 on a quiet machine)."""
  busy, own = cpu_seconds()
  return max(busy - since[0] - (own - since[1]), 0.0) / wall


def own_load(since: tuple[float, float], wall: float) -> float:
  """Cores' worth of CPU that this process used since `since`."""
  return (cpu_seconds()[1] - since[1]) / wall


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def memory_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def read(path: str) -> str:
  """A small text file's contents (e.g. a /sys setting), or "unknown"."""
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return "unknown"


def write_json(path: str | None, results: dict[str, Any]) -> None:
  """Writes a benchmark's results to `path` (the scripts' --json_out), if one is given."""
  if path:
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {path}")


def xla_flops(compiled) -> float | None:
  """XLA's own FLOP count of a compiled computation (its HLO cost analysis), if it gives one."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None
