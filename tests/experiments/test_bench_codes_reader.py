"""experiments/bench_codes_reader.py --smoke: both readers run on the same generated data."""

import json
import os
import subprocess
import sys
from conftest import REPO



def test_smoke_run_measures_the_old_and_the_new_reader(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "bench_codes_reader.py"), "--smoke",
       f"--work_dir={tmp_path / 'data'}", f"--json_out={tmp_path / 'out.json'}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "out.json").read_text())
  assert report["examples"] == 20_000 and report["batch"] == 256
  assert [r["reader"] for r in report["results"]] == ["old", "new"]
  for r in report["results"]:
    assert r["seconds_per_batch"] > 0 and r["peak_rss_delta_mib"] >= 0
  assert len(os.listdir(tmp_path / "data" / "codes")) == len(os.listdir(tmp_path / "data" / "npz"))
  assert "| old |" in result.stdout and "| new |" in result.stdout
