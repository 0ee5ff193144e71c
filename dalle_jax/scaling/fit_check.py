"""Will it fit? A launch's real step compiled for a named TPU slice, from any host, before anything runs.

    target = fit_check.Target.parse("v5p:4x4x4")            # the chip and the 64 chips' devices
    report = fit_check.transformer_train(model, train, mesh_config, target)
    print(report.describe())
    report.refuse_if_too_big()                              # FitError: what to change

`jax.experimental.topologies` describes a slice's devices without the hardware (libtpu installed:
`pip install -e .[tpu]`); the launch scripts' own step functions are lowered with abstract inputs
placed on a mesh over those devices and compiled by the TPU compiler, whose `memory_analysis` and
`cost_analysis` say what each chip holds and computes. Every figure is per chip; the step time
and throughput are what the chip's peak bf16 rate (or, for decoding, its HBM bandwidth) allows:
upper bounds, never measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dalle_jax import sharding
from dalle_jax.dvae import training as dvae_training
from dalle_jax.rerank import training as rerank_training
from dalle_jax.train import checkpointing
from dalle_jax.transformer import sampling, model as transformer, training as transformer_training

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip as its vendor states it: HBM, peak dense bf16 FLOP/s, HBM bytes/s."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float


# Google Cloud's published per-chip figures (v4 and v5p: both TensorCores as one device).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1.2e12),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 8.19e11),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2.765e12),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1.64e12),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice named as `chip:topology`, e.g. v5e:2x2 or v5p:4x4x4."""
  chip: Chip
  topology: str

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{self.topology}"

  @classmethod
  def parse(cls, spec: str) -> "Target":
    chip, _, topology = spec.partition(":")
    dims = topology.split("x")
    if chip not in CHIPS or not all(d.isdigit() and int(d) > 0 for d in dims) or len(dims) < 2:
      raise ValueError(f"--fit_check={spec!r}: expected <chip>:<topology> with chip one of "
                       f"{', '.join(CHIPS)} and a topology such as 2x2 (v5e, v6e) or 4x4x4 "
                       "(v4, v5p)")
    return cls(CHIPS[chip], topology)

  @property
  def chips(self) -> int:
    return int(np.prod([int(d) for d in self.topology.split("x")]))

  def devices(self) -> list[jax.Device]:
    """The slice's devices as the TPU compiler sees them; nothing is allocated on them."""
    try:
      from jax.experimental import topologies
      # Off a TPU VM libtpu looks for its peers' hostnames; a described slice has none. Nor
      # does it own chips, so other processes may load libtpu beside it (its lockfile is moot).
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      return list(topologies.get_topology_desc(self.name, "tpu").devices)
    except Exception as error:  # no libtpu, or a topology this chip does not come in
      raise RuntimeError(f"cannot describe the TPU slice {self.name}: {error}. Install libtpu "
                         "(pip install -e '.[tpu]') and name a topology the chip comes in") \
          from error


@dataclasses.dataclass(frozen=True)
class FitReport:
  """What one compiled program needs per chip of `target`, and the bound its chip allows."""
  what: str                  # e.g. "transformer train step"
  target: Target
  mesh: dict[str, int]
  argument_bytes: int        # inputs: parameters, optimiser state, EMA, the batch
  state_bytes: int           # of which the stored state (`state_name`), unpadded
  output_bytes: int          # outputs not written over donated inputs
  temp_bytes: int            # activations and every other temporary at the peak
  code_bytes: int
  flops: float               # per chip per call, as XLA counts them (a loop's body once)
  items_per_call: int        # tokens (or images, or decoded image tokens) per call, all chips
  item_name: str
  compile_s: float
  bound_bytes: int = 0       # bytes a call must read per chip (decode: HBM-bound), 0: compute
  hints: tuple[str, ...] = ()  # what to change when it does not fit
  kernels: tuple[str, ...] = ()  # the Pallas/Mosaic kernels in the compiled program
  model_flops: float = 0.0   # per chip per call by the model's own count; 0: XLA's count
  state_name: str = "parameters + optimiser state + EMA"

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.target.chip.hbm_bytes

  @property
  def step_flops(self) -> float:
    """FLOPs per chip per call: the model's count when given (XLA counts the body of a scan or
    loop once, however many times it runs), else XLA's."""
    return self.model_flops or self.flops

  @property
  def call_s_bound(self) -> float:
    """The fastest a call can run: FLOPs at peak, or its bytes at full HBM bandwidth."""
    chip = self.target.chip
    return max(self.step_flops / chip.peak_flops, self.bound_bytes / chip.hbm_bandwidth)

  @property
  def items_per_s_bound(self) -> float:
    return self.items_per_call / self.call_s_bound if self.call_s_bound else float("inf")

  def describe(self) -> str:
    g = lambda n: f"{n / GIB:.2f} GiB"
    mesh = _mesh_text(self.mesh)
    limit = "HBM bandwidth" if self.bound_bytes and self.bound_bytes / \
        self.target.chip.hbm_bandwidth > self.step_flops / self.target.chip.peak_flops \
        else "peak bf16"
    counted = (f" by the model's count (XLA counts {self.flops / 1e12:.2f}, loop bodies once)"
               if self.model_flops else "")
    return "\n".join([
        f"fit check: {self.what} on {self.target.name} ({self.target.chips} chips, mesh {mesh}),"
        f" compiled in {self.compile_s:.1f}s",
        f"  per chip: inputs {g(self.argument_bytes)} ({self.state_name} "
        f"{g(self.state_bytes)} unpadded), new outputs {g(self.output_bytes)}, "
        f"temporaries {g(self.temp_bytes)}, code {g(self.code_bytes)}",
        f"  total {g(self.total_bytes)} of {g(self.target.chip.hbm_bytes)} HBM: "
        + ("fits" if self.fits else "DOES NOT FIT"),
        f"  {self.step_flops / 1e12:.2f} TFLOP per chip per call{counted}; upper bound at "
        f"{limit}: "
        f"{self.call_s_bound * 1e3:.1f} ms a call, {self.items_per_s_bound:,.0f} "
        f"{self.item_name}/s on the slice",
        "  TPU kernels: " + (", ".join(self.kernels) or "none"),
    ])

  def refuse_if_too_big(self) -> None:
    if self.fits:
      return
    raise FitError(
        f"{self.what} needs {self.total_bytes / GIB:.1f} GiB per chip on {self.target.name}, "
        f"more than its {self.target.chip.hbm_bytes / GIB:.0f} GiB of HBM "
        f"({self.state_name} {self.state_bytes / GIB:.1f} GiB, temporaries "
        f"{self.temp_bytes / GIB:.1f} GiB). Change one of: " + "; ".join(self.hints))


def _mesh_text(mesh) -> str:
  return " x ".join(f"{k} {v}" for k, v in dict(mesh.shape if hasattr(mesh, "shape") else
                                                  mesh).items())


class FitError(ValueError):
  """The step would not fit in the chip's HBM: raised before anything runs."""


# ---------------------------------------------------------------- compiling and measuring
def _mesh(mesh_config: dict[str, int], target: Target):
  return sharding.make_mesh(devices=target.devices(), **mesh_config)


def _abstract(shapes: Any, shardings: Any) -> Any:
  return checkpointing.abstract_like(shapes, shardings)


def _per_chip_bytes(abstract: Any) -> int:
  """Bytes of one chip's shards of an abstract tree (ShapeDtypeStructs with shardings)."""
  return int(sum(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
                 for x in jax.tree.leaves(abstract)))


def measure(step, args: tuple, *, what: str, target: Target, mesh, state: Any,
            items_per_call: int, item_name: str, bound_bytes: int = 0,
            hints: tuple[str, ...] = ()) -> FitReport:
  """Lowers `step(*args)` (abstract args) and compiles it for the slice; its figures per chip."""
  began = time.perf_counter()
  lowered = step.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as error:  # the TPU compiler's own refusal: RESOURCE_EXHAUSTED
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    said = str(error).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
    raise FitError(f"{what} does not fit on {target.name} (mesh "
                   f"{_mesh_text(mesh)}): the TPU compiler says {said!r} (stored state "
                   f"{_per_chip_bytes(state) / GIB:.1f} GiB a chip). Change one "
                   "of: " + "; ".join(hints)) from None
  compile_s = time.perf_counter() - began
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return FitReport(
      what=what, target=target, mesh=dict(mesh.shape), argument_bytes=memory.argument_size_in_bytes,
      state_bytes=_per_chip_bytes(state),
      output_bytes=memory.output_size_in_bytes - memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
      flops=float(cost.get("flops", 0.0)), items_per_call=items_per_call, item_name=item_name,
      compile_s=compile_s, bound_bytes=bound_bytes, hints=hints,
      kernels=_kernels(compiled.as_text()))


def _kernels(hlo: str) -> tuple[str, ...]:
  """The names of the Mosaic custom calls (Pallas kernels) in compiled HLO text."""
  names = re.findall(r'%([\w.-]+) = [^\n]*custom_call_target="tpu_custom_call"', hlo)
  return tuple(sorted({re.sub(r"\.\d+$", "", name) for name in names}))


def transformer_flops(config, batch: int, train: bool = True) -> float:
  """FLOPs of one step over `batch` examples, all chips: every matmul (2 per multiply-add) with
  attention over exactly the pairs each layer's mask admits; training is forward + backward
  (3x), plus the blocks' forward again under remat."""
  c = config
  qkv_out = 4 * c.width * c.heads * c.head_dim            # q, k, v and the output projection
  block = 2 * c.seq_len * (qkv_out + 2 * c.mlp_ratio * c.width ** 2)
  kinds = c.kinds()
  attention = sum(4 * c.heads * c.head_dim * int(c.mask(kind).sum()) * kinds.count(kind)
                  for kind in set(kinds))
  heads = 2 * c.width * ((c.text_len - 1) * c.num_text_tokens + c.image_len * c.image_vocab_size)
  blocks = c.depth * block + attention
  if not train:
    return batch * (blocks + heads)
  return batch * ((4 if c.remat else 3) * blocks + 3 * heads)


def _hints(mesh, state_gib: float, batch_flag: str, remat: bool | None) -> tuple[str, ...]:
  hints = [f"split the state ({state_gib:.1f} GiB a chip) over more chips: raise "
           f"--config.mesh.fsdp (now {mesh.shape['fsdp']}) and lower --config.mesh.data"]
  if remat is False:
    hints.append("recompute activations in the backward pass: --config.model.remat=True")
  hints.append(f"fewer examples a step per chip: raise --config.train.grad_accum_steps or lower "
               f"{batch_flag}")
  hints.append("a larger slice")
  return tuple(hints)


# ---------------------------------------------------------------- the launches' programs
def _train_step(stage, config, train, mesh, shardings, step, target: Target, inputs: tuple, *,
                what: str, items_per_call: int, item_name: str,
                remat: bool | None = None) -> FitReport:
  """A stage's own train `step` (its `make_train_step`, with the state placed by `shardings`:
  `stage` is its module, with `init_state`) on abstract inputs placed on the slice's mesh."""
  state = _abstract(jax.eval_shape(functools.partial(stage.init_state, config, train),
                                   jax.random.key(0)), shardings)
  stored = (state.params, state.opt_state, state.ema_params)
  hints = _hints(mesh, _per_chip_bytes(stored) / GIB, "--config.train.batch_size", remat)
  return measure(step, (state, *inputs), what=what, target=target, mesh=mesh, state=stored,
                 items_per_call=items_per_call, item_name=item_name, hints=hints)


def _batch(mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


def transformer_train(config, train, mesh_config: dict[str, int], target: Target,
                      rules=sharding.TRANSFORMER_RULES) -> FitReport:
  """`train_transformer.py`'s step (the same `make_train_step`, placed by the config's `rules`)
  on the slice."""
  mesh = _mesh(mesh_config, target)
  shardings = transformer_training.state_shardings(config, train, mesh, rules)
  step = transformer_training.make_train_step(config, train, mesh, shardings, rules)
  b = train.batch_size
  batch = {"text": _batch(mesh, (b, config.text_len), jnp.int32),
           "codes": _batch(mesh, (b, config.image_size, config.image_size), jnp.int32)}
  report = _train_step(transformer_training, config, train, mesh, shardings, step, target, (batch,),
                       what="transformer train step", items_per_call=b * config.seq_len,
                       item_name="tokens", remat=config.remat)
  return dataclasses.replace(report, model_flops=transformer_flops(config, b) / target.chips)


def dvae_train(config, train, mesh_config: dict[str, int], target: Target,
               placement: sharding.StateSharding = sharding.StateSharding()) -> FitReport:
  """`train_dvae.py`'s step on the slice, its state placed as the config's `placement` says."""
  mesh = _mesh(mesh_config, target)
  shardings = dvae_training.state_shardings(config, train, mesh, placement)
  step = dvae_training.make_train_step(config, train, mesh, shardings)
  images = _batch(mesh, (train.batch_size, config.resolution, config.resolution, 3), jnp.uint8)
  return _train_step(dvae_training, config, train, mesh, shardings, step, target, (images,),
                     what="dVAE train step", items_per_call=train.batch_size,
                     item_name="images")


def reranker_train(config, train, mesh_config: dict[str, int], target: Target,
                   placement: sharding.StateSharding = sharding.StateSharding()) -> FitReport:
  """`train_reranker.py`'s step on the slice, its state placed as the config's `placement` says."""
  mesh = _mesh(mesh_config, target)
  shardings = rerank_training.state_shardings(config, train, mesh, placement)
  step = rerank_training.make_train_step(config, train, mesh, shardings)
  b = train.batch_size
  inputs = (_batch(mesh, (b, config.resolution, config.resolution, 3), jnp.uint8),
            _batch(mesh, (b, config.text_len), jnp.int32))
  return _train_step(rerank_training, config, train, mesh, shardings, step, target, inputs,
                     what="reranker train step", items_per_call=b, item_name="images")


def transformer_sampling(config, mesh_config: dict[str, int], target: Target, batch: int,
                         guided: bool = False, rules=sharding.TRANSFORMER_RULES) -> FitReport:
  """`sample.py`'s sampler (codes only) with the parameters placed by the run's training `rules`.

  Its bound: every decode step reads each chip's share of the parameters at least once, so a
  step takes at least those bytes over the chip's HBM bandwidth; image tokens/s = batch / that.
  """
  mesh = _mesh(mesh_config, target)
  param_shardings = transformer_training.param_shardings(config, mesh, rules)
  params = _abstract(nn.unbox(transformer.abstract_params(config)), param_shardings)
  sample = sampling.make_sampler(config, None, mesh, guided=guided,
                                 param_shardings=param_shardings)
  split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  sds = lambda shape, dtype, where: jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
  settings = sampling.SampleSettings(*(sds((), d, whole) for d in (
      jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.int32)))
  args = (params, None, sds((batch, config.text_len), jnp.int32, split),
          sds(keys.shape, keys.dtype, split), settings,
          sds((batch, config.image_size, config.image_size), jnp.int32, split))
  param_bytes = _per_chip_bytes(params)
  report = measure(sample, args, what=f"transformer sampler, batch {batch}", target=target,
                   mesh=mesh, state=params, items_per_call=batch * config.image_len,
                   item_name="image tokens", bound_bytes=param_bytes * config.image_len,
                   hints=(f"split the parameters ({param_bytes / GIB:.1f} GiB a chip) over more "
                          "chips: raise --fsdp or --tensor", "a smaller --batch_size",
                          "a larger slice"))
  # Decoding every position with the cache is one forward pass over the sequence, in FLOPs.
  rows = batch * (2 if guided else 1)
  return dataclasses.replace(
      report, model_flops=transformer_flops(config, rows, train=False) / target.chips,
      state_name="parameters")


# ---------------------------------------------------------------- the launch scripts' flags
def define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """`--fit_check=<chip>:<topology>` and `--fit_check_only`, for a launch script."""
  target = flags.DEFINE_string(
      "fit_check", None, "Before anything runs, compile the step for this TPU slice (e.g. "
      "v5p:4x4x4; chips: " + ", ".join(CHIPS) + ") over the config's mesh, print per-chip "
      "memory, FLOPs and the throughput bound, and refuse to start if it would not fit.")
  only = flags.DEFINE_bool("fit_check_only", False, "Stop after --fit_check.")
  return target, only


def at_launch(holders: tuple[flags.FlagHolder, flags.FlagHolder],
              check: Callable[[Target], FitReport]) -> None:
  """A launch script's fit check: nothing without --fit_check; refuses (FitError) a step that
  would not fit; exits after printing with --fit_check_only."""
  target, only = (h.value for h in holders)
  if not target:
    if only:
      raise ValueError("--fit_check_only needs --fit_check=<chip>:<topology>, e.g. v5p:4x4x4")
    return
  report = check(Target.parse(target))
  print(report.describe(), flush=True)
  report.refuse_if_too_big()
  if only:
    sys.exit(0)
