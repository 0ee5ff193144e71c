"""Sharding as configuration: one mesh with `data`, `fsdp` and `tensor` axes, and rules for placement.

The batch is split over `data` and `fsdp` together (FSDP is data parallel with sharded state);
parameters and optimiser state are split over `fsdp` (and, for the transformer, `tensor`).
The rules come from the run's config and are stored with it in config.json:
  the transformer: `config.sharding_rules`, a table of (logical axis name, mesh axes) pairs
      (default `TRANSFORMER_RULES`), checked by `logical_rules`, which refuses a bad table;
  the dVAE and the reranker: `config.sharding`, read as a `StateSharding` (FSDP of every array
      of at least `min_size` elements, or everything replicated).
Everything here returns `NamedSharding`s for `jax.jit(in_shardings=..., out_shardings=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated: splitting them costs more in collectives than it saves.
MIN_SHARDED_SIZE = 2 ** 14


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; -1 for `data` takes whatever is left."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    if fsdp < 1 or tensor < 1 or len(devices) % (fsdp * tensor):
      raise ValueError(f"fsdp={fsdp} x tensor={tensor} does not divide {len(devices)} devices")
    data = len(devices) // (fsdp * tensor)
  if min(data, fsdp, tensor) < 1 or data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} must use exactly the "
                     f"{len(devices)} devices; set --config.mesh.data=-1 to fill the rest "
                     "with data")
  # Auto axes: the compiler propagates shardings from the ones we declare on inputs and outputs.
  types = (AxisType.Auto,) * 3
  try:
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=types, devices=devices)
  except NotImplementedError:
    # A TPU torus whose sides the mesh's axes do not match (tensor 2 on v5p's 4x4x8): split
    # its sides, as jax.make_mesh does on v5e only.
    grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data` x `fsdp`; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """Shards the largest axis that `fsdp_size` divides; small or indivisible arrays replicate."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> Any:
  """`NamedSharding` for every array of `tree` (arrays or ShapeDtypeStructs) by `fsdp_spec`."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), tree)


@dataclasses.dataclass(frozen=True)
class StateSharding:
  """How a stage without logical axis names (the dVAE, the reranker) places its train state:
  `mode="fsdp"` splits each array of at least `min_size` elements over `fsdp` (`fsdp_spec`),
  `mode="replicated"` keeps a whole copy of every array on every device."""
  mode: str = "fsdp"
  min_size: int = MIN_SHARDED_SIZE

  def __post_init__(self):
    if self.mode not in ("fsdp", "replicated"):
      raise ValueError(f"config.sharding.mode must be 'fsdp' or 'replicated', got {self.mode!r}")
    if not isinstance(self.min_size, int) or self.min_size < 0:
      raise ValueError(f"config.sharding.min_size must be an int >= 0 (arrays with fewer "
                       f"elements replicate), got {self.min_size!r}")

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | None) -> StateSharding:
    """A config's `sharding` section (None or absent fields: the defaults)."""
    section = dict(section or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - fields)
    if unknown:
      raise ValueError(f"config.sharding has no field {unknown}: write "
                       f"config.sharding = dict(mode='fsdp' or 'replicated', min_size=N)")
    return cls(**section)

  def shardings(self, tree: Any, mesh: Mesh) -> Any:
    """`NamedSharding` for every array of `tree` (arrays or ShapeDtypeStructs)."""
    if self.mode == "replicated":
      return jax.tree.map(lambda _: replicated(mesh), tree)
    return fsdp_shardings(tree, mesh, self.min_size)


def host_batch_to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This host's share of a batch -> global arrays split over the mesh (multi-host safe)."""
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items()}


# ---------------------------------------------------------------- logical axes (the transformer)
# Logical axis names on parameters and activations -> mesh axes. Parameters: the model dimension
# (`embed`) is split over `fsdp`, heads, MLP width and vocabularies over `tensor`. Activations:
# the batch over `data` x `fsdp`, heads and MLP width over `tensor`, the residual stream whole.
TRANSFORMER_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # the stacked groups of `scan_layers`
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
)
LOGICAL_NAMES = tuple(name for name, _ in TRANSFORMER_RULES)  # every name the transformer uses


def logical_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """A config's `sharding_rules` (as written, or read back from config.json with lists for
  tuples) as the table of tuples that Flax reads; raises ValueError saying what to write when it
  names an unknown logical axis or mesh axis, or leaves out a name the transformer uses.

  As in Flax, a name may stand twice: the first rule whose mesh axes are still free applies.
  """
  table, problems = [], []
  for rule in rules:
    if isinstance(rule, str) or len(rule) != 2:
      problems.append(f"{rule!r} is not a (logical name, mesh axes) pair")
      continue
    name, axes = rule
    if name not in LOGICAL_NAMES:
      problems.append(f"{name!r} is not a logical axis of the transformer; its names: "
                      f"{', '.join(LOGICAL_NAMES)}")
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes)
    named = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if any(a not in MESH_AXES for a in named):
      problems.append(f"{name!r} maps to {axes!r}: write None (replicated), one of "
                      f"{', '.join(MESH_AXES)}, or a tuple of them")
    table.append((name, axes))
  missing = [name for name in LOGICAL_NAMES if name not in {n for n, _ in table}]
  if missing:
    default = dict(TRANSFORMER_RULES)
    problems.append("no rule for " + ", ".join(missing) + ": add " + ", ".join(
        f"({name!r}, {default[name]!r})" for name in missing) + " (the default placement)")
  if problems:
    raise ValueError("bad config.sharding_rules:\n  " + "\n  ".join(problems))
  return tuple(table)


def check_divisible(abstract: Any, shardings: Any) -> None:
  """Refuses, before anything compiles, a placement that splits an axis unevenly.

  `abstract` holds arrays or ShapeDtypeStructs, `shardings` the matching NamedShardings.
  """
  problems = []
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
  for (path, leaf), named in zip(flat, jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, named.spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      parts = int(np.prod([named.mesh.shape[a] for a in axes], dtype=np.int64))
      if dim % parts:
        problems.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: {dim} over "
                        f"{' x '.join(axes)} = {parts}")
  if problems:
    raise ValueError("these arrays do not split evenly over the mesh; change the model's widths "
                     "or the mesh sizes (--config.mesh.*):\n  " + "\n  ".join(problems[:10]))
