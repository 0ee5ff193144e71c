"""Stage 1: train the discrete VAE.

  python experiments/train_dvae.py --config=experiments/configs/dvae_emoji64.py --workdir=runs/dvae
  python experiments/train_dvae.py --config=experiments/configs/dvae_tiny.py --workdir=/tmp/t \
      --config.train.num_steps=100 --config.mesh.fsdp=2

A killed run started again with the same --workdir resumes from its last complete checkpoint.
The workdir holds checkpoints/, metrics.jsonl, TensorBoard events (tensorboard/: scalars and
reconstructions), reconstructions/step_N.png and config.json. --config.init_from=<workdir> starts
from another run's parameters (fine-tuning). SIGTERM or SIGINT saves a checkpoint at the step
reached and exits with status 75.
"""

import os
import sys

from absl import flags, logging
import jax
from ml_collections import config_flags
import tqdm

from dalle_jax import data as data_lib
from dalle_jax import image_grid, sharding
from dalle_jax.data import pipeline
from dalle_jax.dvae import model as dvae, evaluation as dvae_eval, training as dvae_training
from dalle_jax.scaling import fit_check
from dalle_jax.train import finetune, launch, preemption, tensorboard_writer, train_state

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "dvae_emoji64.py"),
    "Experiment config (a .py file with get_config()); override fields with --config.a.b=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, or auto.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_FIT_CHECK = fit_check.define_flags()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  # ---------------------------------------------------------------- config, refused before compiling
  model = dvae.DVAEConfig(**config.model)
  train = dvae_training.DVAETrainConfig(**config.train)
  placement = sharding.StateSharding.from_config(config.get("sharding"))
  fit_check.at_launch(_FIT_CHECK, lambda target: fit_check.dvae_train(
      model, train, dict(config.mesh), target, placement))
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value
  launch.prepare_workdir(workdir, config.to_dict())

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
                    seed=train.seed, num_workers=config.data.num_workers)
    loader_config = pipeline.LoaderConfig(**{**settings, **overrides})
    return pipeline.Loader(source, loader_config)

  loader = loader_for(config.data.split)
  eval_batches = []
  if config.data.eval_split:
    eval_loader = loader_for(config.data.eval_split, crop="center", num_epochs=1, shuffle=False)
    eval_batches = [b for b, _ in zip(eval_loader, range(config.data.eval_batches))]

  # ---------------------------------------------------------------- model, optimiser, sharding
  shardings = dvae_training.state_shardings(model, train, mesh, placement)
  state, extras, checkpointer, log = launch.open_run(
      workdir, config, lambda rng: dvae_training.init_state(model, train, rng),
      lambda: dvae_training.create_sharded_state(model, train, mesh, shardings), shardings)
  if extras is not None:
    loader.set_state(extras["loader"])
  elif config.init_from:
    state = finetune.init_from(state, config.init_from)
  start = int(state.step)
  events = tensorboard_writer.EventLog(os.path.join(workdir, "tensorboard"),
                                resume_step=None if extras is None else start,
                                enabled=jax.process_index() == 0)
  if train.decoder_finetune_fraction:
    print(f"steps {train.finetune_start() + 1}-{train.num_steps}: the decoder alone, on the "
          "encoder's argmax codes (decoder_finetune_fraction)")
  train_step = dvae_training.make_train_step(model, train, mesh, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  reconstruct = dvae_eval.make_sharded_reconstruct(model, mesh, shardings.ema_params)

  # ---------------------------------------------------------------- loop
  preempted, stop = preemption.PreemptionWatch(), False
  nonfinite = train_state.NonfiniteWatch(state, train.on_nonfinite)
  progress = tqdm.tqdm(total=train.num_steps, initial=start, unit="step",
                       disable=jax.process_index() != 0)
  for step in range(start + 1, train.num_steps + 1):
    images = sharding.host_batch_to_global({"image": next(loader)["image"]}, batch_sharding)
    state, metrics = train_step(state, images["image"])

    due = lambda every: every > 0 and (step % every == 0 or step == train.num_steps)
    if due(config.log_every) or due(config.checkpoint_every):
      nonfinite_steps = nonfinite.check(state, step, checkpointer.latest_step())
    if due(config.log_every):
      values = jax.device_get(metrics)
      values = {**values, "nonfinite_steps": nonfinite_steps,
                **{f"data/{k}": v for k, v in loader.counts.items()}}
      log.write(step, values)
      events.scalars(step, values)
      progress.set_postfix(loss=f"{values['loss']:.4f}", ppl=f"{values['perplexity']:.1f}")
    if eval_batches and (due(config.eval_every) or due(config.image_every)):
      if due(config.eval_every):
        values = {f"eval/{k}": v for k, v in dvae_eval.evaluate(
            model, state.ema_params, eval_batches, reconstruct).items()}
        log.write(step, values)
        events.scalars(step, values)
      if due(config.image_every):
        images, _, recon = reconstruct(state.ema_params, eval_batches[0]["image"])
        captions = list(eval_batches[0]["caption"][:16])  # host 0's rows come first
        grid = image_grid.captioned_grid(
            dvae_eval.side_by_side(images[:len(captions)], recon[:len(captions)]), captions,
            tile_size=192)
        launch.save_snapshot(grid, os.path.join(workdir, "reconstructions"), step,
                             launch.snapshots_to_keep(config))
        events.image(step, "reconstructions", grid)
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
