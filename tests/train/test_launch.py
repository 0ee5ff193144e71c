"""dalle_jax/train/launch.py: config sections that take any override, and the huge-pages environment."""

import dataclasses
import os

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
