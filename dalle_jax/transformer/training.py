"""Training the transformer: the paper's optimiser and schedule, and the sharded train step.

    shardings = state_shardings(config, train, mesh)          # from the logical axis rules
    state = create_sharded_state(config, train, mesh, shardings)
    step = make_train_step(config, train, mesh, shardings)
    state, metrics = step(state, {"text": int32[B, T], "codes": int32[B, H, W]})

Parameters, optimiser state and EMA are placed by the config's logical axis rules (`rules`:
`config.sharding_rules`, by default `sharding.TRANSFORMER_RULES`: FSDP over `fsdp`, heads and MLP
over `tensor`); the batch is split over `data` x `fsdp`. Dropout and caption dropout
of step t use `fold_in(rng, t)`, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.train import checkpointing, train_state
from dalle_jax.transformer import model as transformer
from dalle_jax.transformer.model import TransformerConfig

TrainState = train_state.TrainState
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformerTrainConfig:
  """Optimisation of the transformer; the defaults are the paper's (Appendix B.2)."""
  batch_size: int = 1024
  num_steps: int = 430_000
  learning_rate: float = 4.5e-4
  warmup_steps: int = 5_000
  decay: str = "cosine"            # "cosine" to final_learning_rate, or "plateau" (halve, 5x)
  final_learning_rate: float = 4.5e-6
  plateau_patience: int = 1_000    # plateau: steps without improvement before halving
  adam_b1: float = 0.9
  adam_b2: float = 0.96
  adam_eps: float = 1e-8
  weight_decay: float = 4.5e-2
  clip_norm: float = 4.0
  ema_decay: float = 0.99
  grad_accum_steps: int = 1        # micro-batches per update (batch_size is the whole update)
  caption_dropout: float = 0.0     # probability of training an example with the empty caption
  on_nonfinite: str = "stop"
  seed: int = 0

  def __post_init__(self):
    problems = []
    if self.batch_size < 1 or self.num_steps < 0 or self.grad_accum_steps < 1:
      problems.append("batch_size and grad_accum_steps must be >= 1, num_steps >= 0")
    elif self.batch_size % self.grad_accum_steps:
      problems.append(f"batch_size {self.batch_size} is not a multiple of grad_accum_steps "
                      f"{self.grad_accum_steps}")
    if self.decay not in ("cosine", "plateau"):
      problems.append(f"decay must be 'cosine' or 'plateau', got {self.decay!r}")
    if not 0 <= self.caption_dropout < 1:
      problems.append(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
    if not 0 <= self.ema_decay < 1:
      problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.on_nonfinite not in ("stop", "skip"):
      problems.append(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      problems.append("learning_rate must be positive and warmup_steps >= 0")
    if problems:
      raise ValueError("bad transformer training config: " + "; ".join(problems))

  def lr_schedule(self) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay (or constant, under `plateau`)."""
    warmup = optax.linear_schedule(0.0, self.learning_rate, max(self.warmup_steps, 1))
    if self.decay == "plateau":
      after = optax.constant_schedule(self.learning_rate)
    else:
      after = optax.cosine_decay_schedule(
          self.learning_rate, max(self.num_steps - self.warmup_steps, 1),
          alpha=self.final_learning_rate / self.learning_rate)
    return optax.join_schedules([warmup, after], [self.warmup_steps])


def make_optimizer(train: TransformerTrainConfig) -> optax.GradientTransformationExtraArgs:
  """Clip at global norm 4, AdamW(0.9, 0.96, 1e-8, wd 4.5e-2 on matrices); under `plateau` the
  step is halved (at most 5 times, as in the paper) when the loss stops improving."""
  parts = [optax.clip_by_global_norm(train.clip_norm),
           optax.adamw(train.lr_schedule(), b1=train.adam_b1, b2=train.adam_b2,
                       eps=train.adam_eps, weight_decay=train.weight_decay,
                       mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))]
  if train.decay == "plateau":
    parts.append(optax.contrib.reduce_on_plateau(
        factor=0.5, patience=train.plateau_patience, cooldown=train.plateau_patience,
        accumulation_size=1, min_scale=0.5 ** 5))
  return optax.chain(*parts)


def init_state(config: TransformerConfig, train: TransformerTrainConfig,
               rng: jax.Array) -> TrainState:
  """A fresh train state of plain arrays."""
  init_rng, train_rng = jax.random.split(rng)
  params = nn.unbox(transformer.init(config, init_rng))
  return train_state.create(params, make_optimizer(train), train_rng)


def state_shardings(config: TransformerConfig, train: TransformerTrainConfig, mesh,
                    rules=sharding.TRANSFORMER_RULES) -> TrainState:
  """NamedSharding of every array of the state: parameters, EMA and the optimiser's moments by
  the parameters' logical axis names and `rules`; the rest replicated.

  Raises ValueError (before any compile) when an axis would not split evenly over the mesh.
  """
  rules = sharding.logical_rules(rules)
  param_specs = nn.get_partition_spec(transformer.abstract_params(config))
  abstract = jax.eval_shape(functools.partial(init_state, config, train), jax.random.key(0))
  opt_specs = optax.tree_map_params(make_optimizer(train), lambda _, spec: spec,
                                    abstract.opt_state, param_specs,
                                    transform_non_params=lambda _: P())
  specs = abstract.replace(params=param_specs, ema_params=param_specs, opt_state=opt_specs,
                           step=P(), rng=P(), nonfinite_steps=P())
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  sharding.check_divisible(abstract, shardings)
  return shardings


def param_shardings(config: TransformerConfig, mesh, rules=sharding.TRANSFORMER_RULES) -> Any:
  """NamedSharding of every parameter as training places it: by its logical names and `rules`.

  Raises ValueError (before any compile) when an axis would not split evenly over the mesh.
  """
  abstract = transformer.abstract_params(config)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                          sharding.logical_rules(rules))
  sharding.check_divisible(nn.unbox(abstract), shardings)
  return shardings


def create_sharded_state(config: TransformerConfig, train: TransformerTrainConfig, mesh,
                         shardings: TrainState) -> TrainState:
  """Initialises the state directly into its shards: no host ever holds the whole of it."""
  create = jax.jit(functools.partial(init_state, config, train), out_shardings=shardings)
  return create(jax.random.key(train.seed))


def drop_captions(config: TransformerConfig, text: jax.Array, rng: jax.Array,
                  rate: float) -> jax.Array:
  """Replaces each caption by the empty one (all pad ids) with probability `rate`."""
  empty = config.text_vocab_size + jnp.arange(config.text_len, dtype=text.dtype)
  dropped = jax.random.bernoulli(rng, rate, (text.shape[0], 1))
  return jnp.where(dropped, empty, text)


def loss_fn(config: TransformerConfig, params: Any, batch: Batch, rng: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted text/image cross-entropy of one batch; dropout on when `rng` is given."""
  rngs = {"dropout": rng} if rng is not None else {}
  text_logits, image_logits = transformer.Transformer(config).apply(
      {"params": params}, batch["text"], batch["codes"], deterministic=rng is None, rngs=rngs)
  return transformer.dalle_loss(config, text_logits, image_logits, batch["text"], batch["codes"])


def _accumulated_grads(config: TransformerConfig, train: TransformerTrainConfig, params: Any,
                       batch: Batch, rng: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
  """Mean gradient and metrics over `grad_accum_steps` micro-batches, one at a time."""
  grad_fn = jax.grad(lambda p, b, r: loss_fn(config, p, b, r), has_aux=True)
  n = train.grad_accum_steps
  if n == 1:
    return grad_fn(params, batch, rng)

  def split(x):
    # Micro-batch i takes every n-th example, so each device keeps an equal share of each.
    micro = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (x.ndim - 1))

  def accumulate(carry, inputs):
    micro_batch, i = inputs
    grads, metrics = grad_fn(params, micro_batch, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  zeros = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[:x.shape[0] // n], batch), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
  total, _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(n)))
  return jax.tree.map(lambda x: x / n, total)


def train_step(config: TransformerConfig, train: TransformerTrainConfig, state: TrainState,
               batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One clipped AdamW update; the pure function that `make_train_step` compiles."""
  dropout_rng, caption_rng = jax.random.split(train_state.step_rng(state))
  if train.caption_dropout > 0:
    batch = dict(batch, text=drop_captions(config, batch["text"], caption_rng,
                                           train.caption_dropout))
  grads, metrics = _accumulated_grads(config, train, state.params, batch, dropout_rng)
  extra = {"value": metrics["loss"]} if train.decay == "plateau" else {}
  new_state, update_metrics = train_state.apply_gradients(
      state, grads, metrics["loss"], make_optimizer(train), train.ema_decay, **extra)
  metrics.update(update_metrics, learning_rate=train.lr_schedule()(state.step))
  return new_state, metrics


def eval_step(config: TransformerConfig, params: Any, batch: Batch) -> dict[str, jax.Array]:
  """Validation loss (text and image apart) without dropout."""
  return loss_fn(config, params, batch)[1]


def batch_shardings(mesh) -> dict[str, NamedSharding]:
  return {"text": sharding.batch_sharding(mesh), "codes": sharding.batch_sharding(mesh)}


def _in_mesh_context(fn, mesh, rules):
  """Runs (and so traces) `fn` with the mesh and logical rules that the model's activation
  constraints read."""
  rules = sharding.logical_rules(rules)

  @functools.wraps(fn)
  def run(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  def lower(*args):
    """`fn.lower` in the same context: what the fit check compiles for a TPU slice."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return fn.lower(*args)

  run.lower = lower
  return run


def make_train_step(config: TransformerConfig, train: TransformerTrainConfig, mesh,
                    shardings: TrainState, rules=sharding.TRANSFORMER_RULES):
  """`train_step` compiled for the mesh: the state updated in place (donated), batch split."""
  step = jax.jit(functools.partial(train_step, config, train),
                 in_shardings=(shardings, batch_shardings(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return _in_mesh_context(step, mesh, rules)


def make_eval_step(config: TransformerConfig, mesh, param_shardings: Any,
                   rules=sharding.TRANSFORMER_RULES):
  """`eval_step` compiled for the mesh: (params, batch) -> metrics."""
  step = jax.jit(functools.partial(eval_step, config),
                 in_shardings=(param_shardings, batch_shardings(mesh)),
                 out_shardings=sharding.replicated(mesh))
  return _in_mesh_context(step, mesh, rules)


def run_rules(run_config: dict) -> tuple:
  """The logical axis rules of a run's config (`sharding_rules`; the default table where a config
  predates the field), checked."""
  return sharding.logical_rules(run_config.get("sharding_rules", sharding.TRANSFORMER_RULES))


def load_trained(workdir: str, step: int | None = None, ema: bool = True, mesh=None,
                 rules=None) -> tuple[TransformerConfig, Any, dict]:
  """The transformer of a `train_transformer.py` run: its config, parameters (EMA by default) and
  the run's whole config dict (which names the tokenizer and data).

  Only those parameters are read from the checkpoint (not the optimiser state nor the other
  copy). Without a `mesh` they land on one device; with one they are split as training splits
  them (`rules`, default: the run's own from its config.json), so a model too large for one
  device loads across several.

  Raises FileNotFoundError when `workdir` holds no config.json or no complete checkpoint, and
  ValueError when the checkpoint does not match the config.
  """
  run_config = checkpointing.read_run_config(workdir, "train_transformer.py")
  config = TransformerConfig(**run_config["model"])
  if mesh is None:
    placement = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: placement, nn.unbox(transformer.abstract_params(config)))
  else:
    shardings = param_shardings(config, mesh, run_rules(run_config) if rules is None else rules)
  abstract = checkpointing.abstract_like(nn.unbox(transformer.abstract_params(config)), shardings)
  name = "ema_params" if ema else "params"
  restored = checkpointing.restore_items(workdir, {name: abstract}, step)
  return config, restored[name], run_config
