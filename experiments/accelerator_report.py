"""The Markdown table of a `bench_accelerator.py` run: each figure, its limit, and the issue's
target for it (`TARGETS`), met or not. Parts that failed or paths that could not run say so."""

from __future__ import annotations

# The targets of issue 19, by part.
TARGETS = {"train_mfu": 0.45, "attention_speedup": 2.0, "sample_ratio_to_bound": 1.5,
           "dvae_speedup": 1.3}


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def _met(ok: bool) -> str:
  return "yes" if ok else "**no**"


def _peak_rows(peak: dict) -> list[list[str]]:
  m, c = peak["matmul"], peak["copy"]
  return [["peak", f"bf16 matmul {m['n']}^3", f"{m['flop_per_s'] / 1e12:.1f} TFLOP/s", "", "",
           "", ""],
          ["peak", f"copy x + 1 of {c['bytes'] / 2**30:.3g} GiB",
           f"{c['bytes_per_s'] / 1e12:.2f} TB/s (read + written)", "", "", "", ""]]


def _train_rows(train: dict) -> list[list[str]]:
  m = train["model"]
  what = (f"step, width {m['width']} x {m['depth']} layers, {train['params'] / 1e9:.2f}B params, "
          f"batch {train['batch']} x {m['seq_len']}, {m['attention']} "
          f"{m['attention_block_size']}{', remat' if m['remat'] else ''}")
  return [["train", what,
           f"{train['tokens_per_s']:,.0f} tokens/s ({_ms(train['median_s'])} a step)",
           f"model FLOPs at the peak: {_ms(train['median_s'] * train['mfu'])}",
           f"MFU {train['mfu']:.1%}", f">= {TARGETS['train_mfu']:.0%} MFU",
           _met(train["mfu"] >= TARGETS["train_mfu"])]]


def _attention_rows(attention: dict) -> list[list[str]]:
  rows = []
  for kind in ("row", "column", "conv", "dense"):
    entry = attention.get(kind)
    if not entry:
      continue
    times = []
    for name, path in entry["paths"].items():
      if "median_s" in path:
        times.append(f"{name} {_ms(path['median_s'])}")
      else:
        why = path.get("reason") or path.get("skipped") or path.get("error", "")[:80]
        times.append(f"{name}: {why}")
    sparse = entry["paths"].get(entry.get("best_sparse"), {})
    label = "dense causal (reference)" if kind == "dense" else kind
    target = f"sparse >= {TARGETS['attention_speedup']:g}x best dense"
    met = _met(entry["speedup"] >= TARGETS["attention_speedup"]) if "speedup" in entry else "n/a"
    rows.append(["attention", f"fwd + bwd, {label} ({entry['admitted_fraction']:.1%} of pairs)",
                 "; ".join(times), f"admitted pairs at the peak: {_ms(entry['bound_s'])}",
                 f"{sparse['fraction_of_peak']:.1%} (best sparse)" if sparse else "",
                 target, f"{entry['speedup']:.2f}x: {met}" if "speedup" in entry else met])
  return rows


def _sample_rows(sample: dict) -> list[list[str]]:
  rows = []
  for name, run in sample["runs"].items():
    if "median_s" not in run:
      rows.append(["sample", f"batch {name}", run.get("reason", ""), "", "", "", "n/a"])
      continue
    bound = run["bound_s_measured"]
    nominal = (f"; {run['ratio_to_bound_nominal']:.2f}x the nominal-bandwidth bound"
               if "ratio_to_bound_nominal" in run else "")
    rows.append(["sample", f"{sample['params'] / 1e9:.1f}B params, batch {run['batch']}",
                 f"{run['image_tokens_per_s']:,.0f} image tokens/s, "
                 f"{run['seconds_per_image']:.3g} s per image (codes)"
                 + (f", {run['seconds_per_image_with_dvae_decode']:.3g} s with the dVAE decode"
                    if "seconds_per_image_with_dvae_decode" in run else ""),
                 f"decode-step roofline, measured bandwidth: {bound:.3g} s a call",
                 f"{run['ratio_to_bound_measured']:.2f}x the bound{nominal}",
                 f"<= {TARGETS['sample_ratio_to_bound']:g}x the bound",
                 _met(run["ratio_to_bound_measured"] <= TARGETS["sample_ratio_to_bound"])])
  return rows


def _dvae_rows(section: dict) -> list[list[str]]:
  rows = []
  for step in ("encode", "decode"):
    for dtype in ("float32", "bfloat16"):
      entry = section.get(f"{step}_{dtype}")
      if not entry or "jax" not in entry:
        continue
      theirs = entry.get("torch", {})
      torch_text = (f"torch {theirs['images_per_s']:.4g} img/s" if "images_per_s" in theirs
                    else f"torch: {theirs.get('reason', 'not run')}")
      limit = (f"XLA FLOPs at the bf16 peak: {section['batch'] / entry['bound_s']:.4g} img/s"
               if "bound_s" in entry else "")
      speedup = entry.get("speedup_over_torch")
      rows.append(["dvae", f"{step} {section['resolution']}px, {dtype}, batch {section['batch']}",
                   f"ours {entry['jax']['images_per_s']:.4g} img/s; {torch_text}", limit,
                   f"{entry['bound_s'] / entry['jax']['median_s']:.1%}" if "bound_s" in entry
                   else "",
                   f">= {TARGETS['dvae_speedup']:g}x torch",
                   f"{speedup:.2f}x: {_met(speedup >= TARGETS['dvae_speedup'])}"
                   if speedup else "n/a"])
  return rows


_ROWS = {"peak": _peak_rows, "attention": _attention_rows, "train": _train_rows,
         "dvae": _dvae_rows, "sample": _sample_rows}


def markdown(results: dict) -> str:
  """The run as a Markdown table, with the machine above it."""
  m = results["machine"]
  lines = [f"{m['device']} ({m['platform']}), jax {m['jax']}, {m['date']}; sizes "
           f"{results['sizes']}; time limit {results['time_limit_s']:.0f} s"
           + (f"; **stopped by the time limit in {results['timed_out_in']}**"
              if "timed_out_in" in results else ""), "",
           "| part | what | measured | limit | of the limit | target | met |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for part, rows in _ROWS.items():
    section = results.get(part)
    if section is None:
      continue
    if "error" in section:
      lines.append(f"| {part} | failed: {section['error'][:300]} | | | | | |".replace("\n", " "))
      continue
    try:
      for row in rows(section):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    except KeyError as e:  # a part stopped by the time limit half-way
      lines.append(f"| {part} | incomplete (no {e}) | | | | | |")
  elapsed = ", ".join(f"{k} {v:.0f} s" for k, v in results.get("elapsed_s", {}).items())
  lines += ["", f"Seconds per part (compiles included): {elapsed}."]
  return "\n".join(lines) + "\n"
