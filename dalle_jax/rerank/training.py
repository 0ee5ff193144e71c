"""Training the reranker: AdamW with CLIP's betas on the symmetric contrastive loss, sharded
like the other stages, and reading a finished `train_reranker.py` run back.

    train = RerankerTrainConfig(num_steps=2_000)
    shardings = state_shardings(config, train, mesh, sharding.StateSharding.from_config(...))
    state = create_sharded_state(config, train, mesh, shardings)
    step = make_train_step(config, train, mesh, shardings)       # (state, images, text) -> ...
    reranker = TrainedReranker(workdir)         # scores images against captions, its own tokenizer
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from etils import epath
import jax
import numpy as np
import optax

from dalle_jax import sharding
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import preprocess
from dalle_jax.rerank.model import RerankerConfig, check_tokenizer, contrastive_loss, init, score
from dalle_jax.train import checkpointing, train_state

TrainState = train_state.TrainState
TOKENIZER_DIR = "tokenizer"  # a copy of the run's tokenizer, inside its workdir


@dataclasses.dataclass(frozen=True)
class RerankerTrainConfig:
  """Optimisation of the reranker: AdamW with CLIP's betas, warm-up then cosine decay."""
  batch_size: int = 64
  num_steps: int = 2_000
  learning_rate: float = 2e-3
  warmup_steps: int = 100
  final_learning_rate: float = 1e-5
  adam_b1: float = 0.9
  adam_b2: float = 0.98
  adam_eps: float = 1e-6
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  ema_decay: float = 0.99
  on_nonfinite: str = "stop"
  seed: int = 0

  def __post_init__(self):
    problems = []
    if self.batch_size < 2:
      problems.append(f"batch_size must be >= 2 (a contrastive batch needs negatives), got "
                      f"{self.batch_size}")
    if self.num_steps < 0 or self.warmup_steps < 0:
      problems.append("num_steps and warmup_steps must be >= 0")
    if self.learning_rate <= 0 or self.final_learning_rate < 0:
      problems.append("learning_rate must be positive and final_learning_rate >= 0")
    if not 0 <= self.ema_decay < 1:
      problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.on_nonfinite not in ("stop", "skip"):
      problems.append(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
    if problems:
      raise ValueError("bad reranker training config: " + "; ".join(problems))

  def lr_schedule(self) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, self.learning_rate, max(self.warmup_steps, 1),
        max(self.num_steps, self.warmup_steps + 1), self.final_learning_rate)


def make_optimizer(train: RerankerTrainConfig) -> optax.GradientTransformation:
  """Clipped AdamW; weight decay on matrices only (not biases, norms or the logit scale)."""
  return optax.chain(
      optax.clip_by_global_norm(train.clip_norm),
      optax.adamw(train.lr_schedule(), b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                  weight_decay=train.weight_decay,
                  mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params)))


def init_state(config: RerankerConfig, train: RerankerTrainConfig, rng: jax.Array) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  return train_state.create(init(config, init_rng), make_optimizer(train), train_rng)


def state_shardings(config: RerankerConfig, train: RerankerTrainConfig, mesh,
                    placement: sharding.StateSharding = sharding.StateSharding()) -> TrainState:
  """Placement of the train state as the config's `sharding` section says (`placement`;
  shape-only trace)."""
  abstract = jax.eval_shape(functools.partial(init_state, config, train), jax.random.key(0))
  return placement.shardings(abstract, mesh)


def create_sharded_state(config: RerankerConfig, train: RerankerTrainConfig, mesh,
                         shardings: TrainState) -> TrainState:
  create = jax.jit(functools.partial(init_state, config, train), out_shardings=shardings)
  return create(jax.random.key(train.seed))


def train_step(config: RerankerConfig, train: RerankerTrainConfig, state: TrainState,
               images: jax.Array, text: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One clipped AdamW update on the contrastive loss of a batch."""
  grads, metrics = jax.grad(contrastive_loss, has_aux=True)(state.params, config, images, text)
  new_state, update_metrics = train_state.apply_gradients(
      state, grads, metrics["loss"], make_optimizer(train), train.ema_decay)
  metrics.update(update_metrics, learning_rate=train.lr_schedule()(state.step))
  return new_state, metrics


def make_train_step(config: RerankerConfig, train: RerankerTrainConfig, mesh,
                    shardings: TrainState):
  """`train_step` compiled for the mesh: state donated, images and text split over the batch."""
  batch = sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(train_step, config, train),
                 in_shardings=(shardings, batch, batch),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def load_trained(workdir: str, step: int | None = None, ema: bool = True
                 ) -> tuple[RerankerConfig, Any, str]:
  """The reranker of a `train_reranker.py` run on one device: its config, parameters (EMA by
  default) and the directory of its tokenizer (the copy the run saved in its workdir).

  Raises FileNotFoundError when `workdir` holds no config.json, tokenizer or complete checkpoint,
  and ValueError when the checkpoint does not match the config.
  """
  run_config = checkpointing.read_run_config(workdir, "train_reranker.py")
  config = RerankerConfig(**run_config["model"])
  train = RerankerTrainConfig(**run_config["train"])
  tokenizer_dir = epath.Path(workdir) / TOKENIZER_DIR
  if "://" not in os.fspath(tokenizer_dir):  # a local path; gs:// and the like stay as they are
    tokenizer_dir = tokenizer_dir.absolute()
  if not tokenizer_dir.is_dir():
    raise FileNotFoundError(f"{tokenizer_dir} not found: the run saves its tokenizer there")
  abstract = jax.eval_shape(lambda: init_state(config, train, jax.random.key(0)))
  state = checkpointing.restore_run(workdir, abstract, step)
  return config, state.ema_params if ema else state.params, os.fspath(tokenizer_dir)


class TrainedReranker:
  """A `train_reranker.py` run that scores images against captions read by its own tokenizer
  (the copy saved in its workdir)."""

  def __init__(self, workdir: str, step: int | None = None):
    self.config, self.params, tokenizer_dir = load_trained(workdir, step)
    self.tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_dir)
    check_tokenizer(self.config, self.tokenizer)

  def score(self, images: np.ndarray, text: np.ndarray) -> np.ndarray:
    """uint8[N, H, W, 3] at any resolution, int32[N, T] of `self.tokenizer` -> float32[N]."""
    side = self.config.resolution
    if images.shape[1:3] != (side, side):
      images = np.stack([preprocess.preprocess(image, side, "center") for image in images])
    return np.asarray(score(self.params, self.config, images, text))
