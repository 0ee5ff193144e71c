"""Train the contrastive reranker (CLIP-style) that picks the best of N samples per caption.

  python experiments/train_reranker.py --config=experiments/configs/reranker_small.py \
      --workdir=runs/reranker --config.data.tokenizer_dir=runs/tokenizer

It trains on the images and captions the dVAE sees (--config.data.dataset and friends). A killed
run started again with the same --workdir resumes from its last complete checkpoint; SIGTERM or
SIGINT saves one at the step reached and exits with status 75. The workdir
holds checkpoints/, metrics.jsonl (eval/top1: caption -> image retrieval within a held-out batch),
tokenizer/ (a copy of the tokenizer, so the run is self-contained), TensorBoard events
(tensorboard/: scalars and a retrieval figure per evaluation) and config.json;
`dalle_jax.rerank.training.load_trained(workdir)` reads it back. --config.init_from=<workdir> starts from
another run's parameters (fine-tuning).
"""

import os
import sys

from absl import flags, logging
import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import tqdm

from dalle_jax import data as data_lib
from dalle_jax import image_grid, sharding
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import pipeline
from dalle_jax.rerank import model as rerank, training as rerank_training
from dalle_jax.scaling import fit_check
from dalle_jax.train import finetune, launch, preemption, tensorboard_writer
from dalle_jax.train import train_state

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "reranker_small.py"),
    "Experiment config (a .py file with get_config()); override fields with --config.a.b=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, or auto.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_FIT_CHECK = fit_check.define_flags()


def retrieval_figure(params, model: rerank.RerankerConfig, batch: dict, count: int = 16):
  """For each of the batch's first `count` captions, the batch image the reranker ranks first,
  framed red when it is not the caption's own."""
  image_emb, text_emb, _ = rerank.embed(params, model, jnp.asarray(batch["image"]),
                                        jnp.asarray(batch["text"]))
  best = np.asarray(jnp.argmax(image_emb @ text_emb.T, axis=0))[:count]  # an image per caption
  return image_grid.captioned_grid(np.asarray(batch["image"])[best],
                                   [str(c) for c in batch["caption"][:count]], tile_size=96,
                                   marked=best != np.arange(len(best)))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  # -------------------------------------------------------------- config, refused before compiling
  model = rerank.RerankerConfig(**config.model)
  train = rerank_training.RerankerTrainConfig(**config.train)
  placement = sharding.StateSharding.from_config(config.get("sharding"))
  fit_check.at_launch(_FIT_CHECK, lambda target: fit_check.reranker_train(
      model, train, dict(config.mesh), target, placement))
  if not config.data.tokenizer_dir:
    raise ValueError("set --config.data.tokenizer_dir (train_tokenizer.py's output)")
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer_dir)
  rerank.check_tokenizer(model, tokenizer)
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value
  launch.prepare_workdir(workdir, config.to_dict())
  if jax.process_index() == 0:
    tokenizer.save(os.path.join(workdir, rerank_training.TOKENIZER_DIR))

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(**config.mesh)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if train.batch_size % batch_devices or train.batch_size % jax.process_count():
    raise ValueError(f"batch_size {train.batch_size} must divide over {batch_devices} batch "
                     f"devices and {jax.process_count()} hosts")
  host_batch = train.batch_size // jax.process_count()

  # ---------------------------------------------------------------- input
  def loader_for(split, **overrides):
    source = data_lib.make_source(config.data.dataset, resolution=model.resolution,
                                  path=config.data.path or None, split=split,
                                  num_examples=config.data.num_examples or 10_000,
                                  seed=train.seed)
    settings = dict(resolution=model.resolution, batch_size=host_batch, crop=config.data.crop,
                    seed=train.seed, num_workers=config.data.num_workers,
                    bpe_dropout=config.data.bpe_dropout)
    return pipeline.Loader(source, pipeline.LoaderConfig(**{**settings, **overrides}),
                           tokenizer=tokenizer)

  loader = loader_for(config.data.split)
  eval_batches = []
  if config.data.eval_split:
    eval_loader = loader_for(config.data.eval_split, crop="center", num_epochs=1, shuffle=False,
                             bpe_dropout=False)
    eval_batches = [b for b, _ in zip(eval_loader, range(config.data.eval_batches))]

  # ---------------------------------------------------------------- model, optimiser, sharding
  shardings = rerank_training.state_shardings(model, train, mesh, placement)
  state, extras, checkpointer, log = launch.open_run(
      workdir, config, lambda rng: rerank_training.init_state(model, train, rng),
      lambda: rerank_training.create_sharded_state(model, train, mesh, shardings), shardings)
  if extras is not None:
    loader.set_state(extras["loader"])
  elif config.init_from:
    state = finetune.init_from(state, config.init_from)
  start = int(state.step)
  events = tensorboard_writer.EventLog(os.path.join(workdir, "tensorboard"),
                                resume_step=None if extras is None else start,
                                enabled=jax.process_index() == 0)
  train_step = rerank_training.make_train_step(model, train, mesh, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  to_global = lambda b: sharding.host_batch_to_global(
      {"image": b["image"], "text": b["text"]}, batch_sharding)
  # Sharded like training (fsdp may span hosts); the metrics come back replicated.
  evaluate = jax.jit(rerank.evaluate, static_argnums=1,
                     in_shardings=(shardings.ema_params, batch_sharding, batch_sharding),
                     out_shardings=sharding.replicated(mesh))

  # ---------------------------------------------------------------- loop
  preempted, stop = preemption.PreemptionWatch(), False
  nonfinite = train_state.NonfiniteWatch(state, train.on_nonfinite)
  progress = tqdm.tqdm(total=train.num_steps, initial=start, unit="step",
                       disable=jax.process_index() != 0)
  for step in range(start + 1, train.num_steps + 1):
    state, metrics = train_step(state, *to_global(next(loader)).values())

    due = lambda every: every > 0 and (step % every == 0 or step == train.num_steps)
    if due(config.log_every) or due(config.checkpoint_every):
      nonfinite_steps = nonfinite.check(state, step, checkpointer.latest_step())
    if due(config.log_every):
      values = jax.device_get(metrics)
      values = {**values, "nonfinite_steps": nonfinite_steps,
                **{f"data/{k}": v for k, v in loader.counts.items()}}
      log.write(step, values)
      events.scalars(step, values)
      progress.set_postfix(loss=f"{values['loss']:.3f}", top1=f"{values['top1']:.2f}")
    if eval_batches and due(config.eval_every):
      results = [jax.device_get(evaluate(state.ema_params, model, *to_global(b).values()))
                 for b in eval_batches]
      values = {k: float(np.mean([r[k] for r in results])) for k in results[0]}
      log.write(step, {f"eval/{k}": v for k, v in values.items()})
      events.scalars(step, {f"eval/{k}": v for k, v in values.items()})
      # Every host takes part in the gather (fsdp may span hosts); the first draws the figure.
      params = jax.experimental.multihost_utils.process_allgather(state.ema_params, tiled=True)
      if jax.process_index() == 0:
        events.image(step, "retrieval", retrieval_figure(params, model, eval_batches[0]))
      tqdm.tqdm.write(f"step {step}: eval top1 {values['top1']:.3f} (chance "
                      f"{1 / host_batch:.3f}), margin {values['margin']:.3f}")
    stop = preempted.reached(step)  # every host stops after the same step
    checkpointer.save(step, state, {"loader": loader.get_state()},
                      force=step == train.num_steps or stop)
    progress.update(1)
    if stop:
      break
  progress.close()
  checkpointer.wait()
  checkpointer.close()
  events.close()
  loader.close()
  if stop:
    preempted.exit(step, train.num_steps)
  print(f"done at step {train.num_steps}; data: {loader.counts.summary()}")


if __name__ == "__main__":
  launch.run(main)
