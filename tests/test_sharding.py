"""dalle_jax/sharding.py on 8 simulated CPU devices: the mesh, the batch and FSDP placements, the
divisibility check, and the configs' placement (the transformer's rules, the other stages')."""

import glob
import importlib
import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from conftest import REPO
from dalle_jax import sharding

CONFIGS = os.path.join(REPO, "experiments", "configs")


@pytest.mark.parametrize("axes, sizes", [({}, (8, 1, 1)), ({"fsdp": 2, "tensor": 2}, (2, 2, 2)),
                                         ({"data": 1, "fsdp": 4, "tensor": 2}, (1, 4, 2))])
def test_make_mesh_fills_data_with_the_devices_left(axes, sizes):
  mesh = sharding.make_mesh(**axes)
  assert mesh.axis_names == sharding.MESH_AXES
  assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == sizes


def test_make_mesh_refuses_sizes_that_do_not_use_the_devices():
  with pytest.raises(ValueError, match="fsdp=3 x tensor=1 does not divide 8 devices"):
    sharding.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match="must use exactly the 8 devices; set --config.mesh.data=-1"):
    sharding.make_mesh(data=2, fsdp=2)


def test_batch_sharding_splits_the_batch_over_data_and_fsdp_and_host_batches_land_there():
  mesh = sharding.make_mesh(fsdp=2, tensor=2)
  batch = {"text": np.arange(24, dtype=np.int32).reshape(8, 3)}
  placed = sharding.host_batch_to_global(batch, sharding.batch_sharding(mesh))["text"]
  assert placed.sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}  # 4 ways, tensor whole
  np.testing.assert_array_equal(np.asarray(placed), batch["text"])
  assert sharding.replicated(mesh).is_fully_replicated


@pytest.mark.parametrize("shape, fsdp, min_size, spec", [
    ((256, 64), 1, 0, P()),                    # no fsdp axis: whole
    ((64, 64), 4, 2 ** 14, P()),               # under min_size: whole
    ((64, 256), 4, 0, P(None, "fsdp")),        # the largest axis
    ((6, 3, 4), 2, 0, P("fsdp", None, None)),  # the largest that fsdp divides
    ((6, 3, 10), 4, 0, P()),                   # none it divides: whole
])
def test_fsdp_spec(shape, fsdp, min_size, spec):
  assert sharding.fsdp_spec(shape, fsdp, min_size) == spec


def test_check_divisible_names_the_array_and_the_split():
  mesh = sharding.make_mesh(fsdp=2, tensor=2)
  abstract = {"ok": jax.ShapeDtypeStruct((4, 6), jnp.float32),
              "bad": jax.ShapeDtypeStruct((5, 6), jnp.float32)}
  spec = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
  sharding.check_divisible({"ok": abstract["ok"]}, {"ok": spec})
  message = r"mesh sizes .*\n  \['bad'\] \(5, 6\): 5 over data x fsdp = 4$"
  with pytest.raises(ValueError, match=message):
    sharding.check_divisible(abstract, {"bad": spec, "ok": spec})


def test_state_sharding_splits_or_replicates_as_the_config_says():
  mesh = sharding.make_mesh(fsdp=4)
  tree = {"big": jax.ShapeDtypeStruct((8, 64), jnp.float32),
          "small": jax.ShapeDtypeStruct((4,), jnp.float32)}
  split = sharding.StateSharding.from_config(dict(min_size=64)).shardings(tree, mesh)
  assert (split["big"].spec, split["small"].spec) == (P(None, "fsdp"), P())
  assert sharding.StateSharding.from_config(None) == sharding.StateSharding()  # today's rule
  whole = sharding.StateSharding(mode="replicated", min_size=0).shardings(tree, mesh)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(whole))
  with pytest.raises(ValueError, match="must be an int >= 0"):
    sharding.StateSharding(min_size=-1)


def test_logical_rules_read_back_from_json_and_refuse_a_bad_table():
  stored = json.loads(json.dumps(sharding.TRANSFORMER_RULES))  # config.json: lists, not tuples
  assert sharding.logical_rules(stored) == sharding.TRANSFORMER_RULES
  rules = list(sharding.TRANSFORMER_RULES)
  for table, message in [
      (rules + [("embd", "fsdp")], "'embd' is not a logical axis of the transformer"),
      ([("embed", ("fsdp", "model"))] + rules[2:] + rules[:1],
       r"'embed' maps to \('fsdp', 'model'\): write None \(replicated\), one of data, fsdp"),
      ([r for r in rules if r[0] not in ("mlp", "kv")],
       r"no rule for mlp, kv: add \('mlp', 'tensor'\), \('kv', None\)"),
      (rules + [("heads",)], r"\('heads',\) is not a \(logical name, mesh axes\) pair")]:
    with pytest.raises(ValueError, match=message):
      sharding.logical_rules(table)


@pytest.mark.parametrize("name", sorted(os.path.basename(p)[:-3]
                                        for p in glob.glob(os.path.join(CONFIGS, "*.py"))))
def test_every_config_says_how_it_shards(name):
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  if name.startswith("transformer"):
    assert sharding.logical_rules(config.sharding_rules) == sharding.TRANSFORMER_RULES
  else:
    assert sharding.StateSharding.from_config(config.sharding) == sharding.StateSharding()


def test_the_rules_parse_from_the_command_line():
  rules = tuple((name, None if name == "embed" else axes)
                for name, axes in sharding.TRANSFORMER_RULES)
  argv = ["prog", f"--config={CONFIGS}/transformer_tiny.py", f"--config.sharding_rules={rules}"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert sharding.logical_rules(flag_values.config.sharding_rules) == rules
