"""dalle_jax/train/launch.py: config sections that take any override, and the huge-page malloc:
its environment and the restart a launch makes onto it."""

import dataclasses
import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from dalle_jax.dvae import training as dvae_training
from dalle_jax.train import launch
from conftest import REPO

CONFIGS = os.path.join(REPO, "experiments", "configs")


@dataclasses.dataclass(frozen=True)
class _Example:
  steps: int
  rate: float = 1.0
  floor: float | None = None
  name: str = "x"


def test_config_section_holds_every_field_with_values_over_defaults():
  section = launch.config_section(_Example, steps=3, rate=2)
  assert section.to_dict() == {"steps": 3, "rate": 2.0, "floor": None, "name": "x"}
  assert isinstance(section.rate, float)  # an int given for a float: overridable with 2.5
  assert _Example(**section) == _Example(steps=3, rate=2.0)
  with pytest.raises(TypeError, match=r"no field \['stpes'\]"):
    launch.config_section(_Example, stpes=3)
  with pytest.raises(TypeError, match="_Example.steps has no default"):
    launch.config_section(_Example)


@pytest.mark.parametrize("name", ["dvae_emoji64.py", "dvae_emoji32.py"])
def test_fields_a_config_leaves_at_their_default_parse_from_the_command_line(name):
  # The config files do not name these: config_section puts every field in, and dvae_emoji32
  # keeps them from the configs it derives from.
  path = os.path.join(CONFIGS, name)
  argv = ["prog", f"--config={path}", "--config.train.min_log_scale=-2.5",
          "--config.train.tau_end=0.1", "--config.train.beta=3"]
  flag_values = flags.FlagValues()
  # ml_collections finds the override flags in the command line it is given.
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  train = dvae_training.DVAETrainConfig(**flag_values.config.train)
  assert (train.min_log_scale, train.tau_end, train.beta) == (-2.5, 0.1, 3.0)


def test_hugepages_env_adds_the_tunable_once():
  env = launch.hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{launch.HUGEPAGES_TUNABLE}",
                 "A": "b"}
  assert launch.hugepages_env(env) == env
  assert launch.hugepages_env({})["GLIBC_TUNABLES"] == launch.HUGEPAGES_TUNABLE


# A launch script that records each start (a line in `starts`) and what its main sees.
_SCRIPT = """
import json, os, sys
from absl import flags
from dalle_jax.train import launch

with open(sys.argv[1], "a") as f:
  f.write("start\\n")
_NAME = flags.DEFINE_string("name", "", "")

def main(argv):
  print(json.dumps({"argv": argv, "name": _NAME.value, "utf8": sys.flags.utf8_mode,
                    "tunables": os.environ.get("GLIBC_TUNABLES", "")}))

if __name__ == "__main__":
  launch.run(main)
"""


def _launch(tmp_path, **env_changes):
  """Runs _SCRIPT under `python -X utf8` with `env_changes`: (its starts, what its main saw)."""
  script, starts = tmp_path / "script.py", tmp_path / "starts"
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", launch.HUGEPAGES_SWITCH, launch._RESTARTED)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-X", "utf8", str(script), str(starts), "--name=a b",
                        "rest"], env=env, capture_output=True, text=True, check=True).stdout
  return starts.read_text().count("start"), json.loads(out.strip().splitlines()[-1])


def test_a_launch_restarts_once_on_huge_pages_with_its_arguments(tmp_path):
  starts, seen = _launch(tmp_path)
  assert starts == 2
  assert launch.HUGEPAGES_TUNABLE in seen["tunables"].split(":")
  assert seen["argv"][1:] == [str(tmp_path / "starts"), "rest"] and seen["name"] == "a b"
  assert seen["utf8"] == 1  # the interpreter's own options survive the restart


@pytest.mark.parametrize("env", [{launch.HUGEPAGES_SWITCH: "0"},
                                 {"GLIBC_TUNABLES": launch.HUGEPAGES_TUNABLE},
                                 {"JAX_PLATFORMS": "tpu,cpu"}], ids=["opt-out", "set", "tpu"])
def test_a_launch_runs_once_when_opted_out_already_set_or_off_the_cpu(tmp_path, env):
  starts, seen = _launch(tmp_path, **env)
  assert starts == 1
  assert seen["tunables"] == env.get("GLIBC_TUNABLES", "")
  assert seen["name"] == "a b"
