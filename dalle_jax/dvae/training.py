"""Training the dVAE: the paper's schedules and optimiser, the train state, and the sharded step.

    placement = sharding.StateSharding()      # FSDP (or .from_config(a config file's `sharding`))
    shardings = state_shardings(config, train, mesh, placement)
    state = create_sharded_state(config, train, mesh, shardings)
    step = make_train_step(config, train, mesh, shardings)
    state, metrics = step(state, images)          # images uint8[batch, H, W, 3], split over the batch

The Gumbel noise of step t comes from `fold_in(state.rng, t)`; non-finite steps are skipped and
counted (see `dalle_jax.train.train_state`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax

from dalle_jax import sharding
from dalle_jax.dvae import model as dvae, objective as dvae_objective
from dalle_jax.train import checkpointing, schedules, train_state


@dataclasses.dataclass(frozen=True)
class DVAETrainConfig:
  """Optimisation of the dVAE; the defaults are the paper's (Appendix A.2).

  `schedule_scale` multiplies every schedule length, so a short run keeps the paper's shape.
  """
  batch_size: int = 512
  num_steps: int = 3_000_000
  learning_rate: float = 1e-4
  final_learning_rate: float = 1.25e-6
  lr_decay_steps: int = 1_200_000
  lr_warmup_steps: int = 0  # not the paper's; short runs collapse onto one code without it
  beta: float = 6.6
  beta_warmup_steps: int = 5_000
  tau_start: float = 1.0
  tau_end: float = 1.0 / 16
  tau_steps: int = 150_000
  min_log_scale: float | None = None  # floor on the decoder's ln b; not the paper's (no floor)
  # Not the paper's: the last fraction of num_steps trains the decoder alone on the encoder's argmax
  # codes (`dvae_objective.relaxed_elb`'s decoder_only); 0 for none.
  decoder_finetune_fraction: float = 0.0
  schedule_scale: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  weight_decay: float = 1e-4
  ema_decay: float = 0.999
  on_nonfinite: str = "stop"
  seed: int = 0

  def __post_init__(self):
    if self.batch_size < 1 or self.num_steps < 0:
      raise ValueError("batch_size must be >= 1 and num_steps >= 0")
    if not 0 < self.tau_end <= self.tau_start:
      raise ValueError(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.on_nonfinite not in ("stop", "skip"):
      raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
    if self.schedule_scale <= 0:
      raise ValueError(f"schedule_scale must be positive, got {self.schedule_scale}")
    if not 0 <= self.decoder_finetune_fraction < 1:
      raise ValueError("decoder_finetune_fraction must be in [0, 1) (the encoder needs some "
                       f"steps), got {self.decoder_finetune_fraction}")

  def steps(self, n: int) -> int:
    return max(1, round(n * self.schedule_scale))

  def finetune_start(self) -> int:
    """The first step of the decoder-only phase (num_steps when there is none)."""
    return self.num_steps - round(self.decoder_finetune_fraction * self.num_steps)

  def beta_schedule(self) -> optax.Schedule:
    return schedules.cosine_anneal(0.0, self.beta, self.steps(self.beta_warmup_steps))

  def tau_schedule(self) -> optax.Schedule:
    return schedules.cosine_anneal(self.tau_start, self.tau_end, self.steps(self.tau_steps))

  def lr_schedule(self) -> optax.Schedule:
    decay = schedules.cosine_anneal(self.learning_rate, self.final_learning_rate,
                                    self.steps(self.lr_decay_steps))
    if self.lr_warmup_steps <= 0:
      return decay
    return schedules.warmup_then(self.learning_rate, self.lr_warmup_steps, decay)


TrainState = train_state.TrainState


def make_optimizer(train: DVAETrainConfig) -> optax.GradientTransformation:
  """AdamW with the cosine learning rate; weight decay on convolution kernels, not biases."""
  return optax.adamw(train.lr_schedule(), b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                     weight_decay=train.weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))


def init_state(config: dvae.DVAEConfig, train: DVAETrainConfig, rng: jax.Array,
               params: Any | None = None) -> TrainState:
  """A fresh state (new parameters unless `params` is given, e.g. converted OpenAI weights)."""
  init_rng, train_rng = jax.random.split(rng)
  if params is None:
    params = dvae.init(config, init_rng)
  return train_state.create(params, make_optimizer(train), train_rng)


def state_shardings(config: dvae.DVAEConfig, train: DVAETrainConfig, mesh,
                    placement: sharding.StateSharding = sharding.StateSharding()) -> TrainState:
  """Placement of every array of the train state as the config's `sharding` section says
  (`placement`; shape-only trace, nothing allocated)."""
  abstract = jax.eval_shape(functools.partial(init_state, config, train), jax.random.key(0))
  return placement.shardings(abstract, mesh)


def create_sharded_state(config: dvae.DVAEConfig, train: DVAETrainConfig, mesh,
                         shardings: TrainState) -> TrainState:
  """Initialises the state directly into its shards: no host ever holds the whole of it."""
  create = jax.jit(functools.partial(init_state, config, train), out_shardings=shardings)
  return create(jax.random.key(train.seed))


def train_step(config: dvae.DVAEConfig, train: DVAETrainConfig, state: TrainState,
               images: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on the relaxed ELB (or, in the decoder-only last phase, on the argmax codes'
  NLL with the encoder frozen); the pure function that `make_train_step` compiles."""
  step_rng = train_state.step_rng(state)
  tau = train.tau_schedule()(state.step)
  beta = train.beta_schedule()(state.step)

  decoder_only, frozen = None, None  # the paper's: no decoder-only phase, nothing extra computed
  if train.decoder_finetune_fraction:
    decoder_only = state.step >= train.finetune_start()
    # Without freezing, the encoder's Adam momentum and weight decay would still move it.
    frozen = {"encoder": jax.tree.map(lambda _: decoder_only, state.params["encoder"]),
              "decoder": jax.tree.map(lambda _: False, state.params["decoder"])}

  def loss_fn(params):
    return dvae_objective.relaxed_elb(config, params, images, step_rng, tau, beta,
                                      train.min_log_scale, decoder_only)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, update_metrics = train_state.apply_gradients(
      state, grads, loss, make_optimizer(train), train.ema_decay, frozen=frozen)
  metrics.update(update_metrics, tau=tau, beta=beta,
                 learning_rate=train.lr_schedule()(state.step))
  return new_state, metrics


def make_train_step(config: dvae.DVAEConfig, train: DVAETrainConfig, mesh,
                    shardings: TrainState):
  """`train_step` compiled for the mesh: state in place (donated), images split over the batch."""
  return jax.jit(functools.partial(train_step, config, train),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def load_trained(workdir: str, step: int | None = None, ema: bool = True
                 ) -> tuple[dvae.DVAEConfig, Any]:
  """The dVAE of a `train_dvae.py` run: its config and parameters (EMA by default) on one device.

  Raises FileNotFoundError when `workdir` holds no config.json or no complete checkpoint.
  """
  run_config = checkpointing.read_run_config(workdir, "train_dvae.py")
  config = dvae.DVAEConfig(**run_config["model"])
  train = DVAETrainConfig(**run_config["train"])
  abstract = jax.eval_shape(lambda: init_state(config, train, jax.random.key(0)))
  state = checkpointing.restore_run(workdir, abstract, step)
  return config, state.ema_params if ema else state.params
