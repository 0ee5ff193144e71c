"""Stage 2: train the transformer on pre-encoded (caption, codes) shards.

  python experiments/train_transformer.py --config=experiments/configs/transformer_small.py \
      --workdir=runs/transformer --config.data.codes_dir=runs/codes \
      --config.data.tokenizer_dir=runs/tokenizer
  # 8 devices as 2 data x 2 fsdp x 2 tensor:
  python experiments/train_transformer.py ... --config.mesh.fsdp=2 --config.mesh.tensor=2

The codes come from experiments/encode_dataset.py, the tokenizer from train_tokenizer.py. A killed
run started again with the same --workdir resumes from its last complete checkpoint, on any mesh.
The workdir holds checkpoints/, metrics.jsonl, TensorBoard events (tensorboard/) and config.json.
"""

import os
import time

from absl import app, flags, logging
import jax
import jax.experimental.multihost_utils
import numpy as np
from ml_collections import config_flags
import tqdm

from dalle_jax import (dvae_training, image_grid, launch, sampling, sharding, tensorboard,
                       train_state, transformer_training)
from dalle_jax import fit_check
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import codes as codes_lib
from dalle_jax.transformer import TransformerConfig
from dalle_jax.transformer_training import TransformerTrainConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "transformer_small.py"),
    "Experiment config (a .py file with get_config()); override fields with --config.a.b=v.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, or auto.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "Checkpoint and exit at this step, the schedules still running to "
    "num_steps (time-limited jobs; run again to continue).")
_FIT_CHECK = fit_check.define_flags()


def check_data(model: TransformerConfig, tokenizer, arrays: dict[str, np.ndarray],
               where: str) -> None:
  """Refuses data that does not fit the model, before anything compiles."""
  if (tokenizer.vocab_size, tokenizer.text_len) != (model.text_vocab_size, model.text_len):
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} pieces and text_len {tokenizer.text_len}, the "
        f"model {model.text_vocab_size} and {model.text_len}: set --config.model.text_vocab_size="
        f"{tokenizer.vocab_size} --config.model.text_len={tokenizer.text_len}")
  grid = arrays["codes"].shape[1:]
  if grid != (model.image_size, model.image_size):
    raise ValueError(f"{where} holds {grid} code grids, the model expects "
                     f"{model.image_size}x{model.image_size}: set --config.model.image_size")
  if arrays["codes"].min() < 0 or arrays["codes"].max() >= model.image_vocab_size:
    raise ValueError(f"{where} holds codes up to {arrays['codes'].max()}, outside the model's "
                     f"image_vocab_size {model.image_vocab_size}: set it to the dVAE's vocabulary")


def make_sample_grid(dvae_workdir: str, model: TransformerConfig, mesh, param_shardings,
                     tokenizer, captions: list[str], seed: int, workdir: str):
  """`grid(params, step)` draws one image per caption (fixed keys, so successive steps compare)
  and writes workdir/samples/step_N.png."""
  dvae_config, dvae_params = dvae_training.load_trained(dvae_workdir)
  if (dvae_config.vocab_size, dvae_config.code_resolution) != (model.image_vocab_size,
                                                               model.image_size):
    raise ValueError(f"the dVAE in {dvae_workdir} makes {dvae_config.code_resolution}^2 codes "
                     f"over {dvae_config.vocab_size}; the model expects {model.image_size}^2 "
                     f"over {model.image_vocab_size}")
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  count = -(-len(captions) // batch_devices) * batch_devices  # a whole number per device
  captions = (captions * count)[:count]
  # Every host holds the same values: each places the rows its devices hold.
  split = sharding.batch_sharding(mesh)
  on_mesh = lambda x: jax.make_array_from_callback(x.shape, split, lambda i: x[i])
  text = on_mesh(np.stack([tokenizer.encode(c)[0] for c in captions]))
  keys = jax.random.wrap_key_data(on_mesh(np.asarray(jax.random.key_data(
      jax.random.split(jax.random.key(seed), count)))))
  no_prime = on_mesh(np.zeros((count, model.image_size, model.image_size), np.int32))
  sampler = sampling.make_sampler(model, dvae_config, mesh=mesh, param_shardings=param_shardings)

  def grid(params, step):
    images, _ = sampler(params, dvae_params, text, keys, sampling.SampleSettings(), no_prime)
    images = jax.experimental.multihost_utils.process_allgather(images, tiled=True)
    if jax.process_index() == 0:
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      image_grid.captioned_grid(np.asarray(images), captions, tile_size=96).save(
          os.path.join(workdir, "samples", f"step_{step}.png"))

  return grid


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  # ---------------------------------------------------------------- config, refused before compiling
  model = TransformerConfig(**config.model)
  train = TransformerTrainConfig(**config.train)
  fit_check.at_launch(_FIT_CHECK, lambda target: fit_check.transformer_train(
      model, train, dict(config.mesh), target))
  if not config.data.codes_dir or not config.data.tokenizer_dir:
    raise ValueError("set --config.data.codes_dir (encode_dataset.py's output) and "
                     "--config.data.tokenizer_dir (train_tokenizer.py's output)")
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value
  launch.prepare_workdir(workdir, config.to_dict())

  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(**config.mesh)
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  micro_batch = train.batch_size // train.grad_accum_steps
  if micro_batch % batch_devices:
    raise ValueError(f"batch_size / grad_accum_steps = {micro_batch} must divide over the "
                     f"{batch_devices} devices of the data and fsdp axes")

  # ---------------------------------------------------------------- input
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer_dir)
  arrays = codes_lib.read_shards(config.data.codes_dir)
  check_data(model, tokenizer, arrays, config.data.codes_dir)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = codes_lib.CodeBatches(arrays, tokenizer, train.batch_size, seed=train.seed,
                                  **hosts)
  eval_batches = []
  if config.data.eval_codes_dir:
    eval_arrays = codes_lib.read_shards(config.data.eval_codes_dir)
    check_data(model, tokenizer, eval_arrays, config.data.eval_codes_dir)
    eval_iter = codes_lib.CodeBatches(eval_arrays, tokenizer, train.batch_size, training=False,
                                      **hosts)
    eval_batches = [b for b, _ in zip(eval_iter, range(config.data.eval_batches))]

  # ---------------------------------------------------------------- model, optimiser, sharding
  shardings = transformer_training.state_shardings(model, train, mesh)
  state, extras, checkpointer, log = launch.open_run(
      workdir, config, lambda rng: transformer_training.init_state(model, train, rng),
      lambda: transformer_training.create_sharded_state(model, train, mesh, shardings), shardings)
  if extras is not None:
    batches.set_state(extras["data"])
  start = int(state.step)
  train_step = transformer_training.make_train_step(model, train, mesh, shardings)
  eval_step = transformer_training.make_eval_step(model, mesh, shardings.params)
  events = (tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
            if jax.process_index() == 0 else None)
  to_global = lambda batch: sharding.host_batch_to_global(batch, sharding.batch_sharding(mesh))

  sample_grid = None
  if config.get("sample_every", 0) and config.data.dvae_workdir:
    captions = list(config.get("sample_captions", ())) or [
        str(c).split("\n")[0] for c in (eval_arrays if eval_batches else arrays)["captions"][:8]]
    sample_grid = make_sample_grid(config.data.dvae_workdir, model, mesh, shardings.params,
                                   tokenizer, captions, train.seed, workdir)

  def write(step, values):
    log.write(step, values)
    if events:
      events.scalars(step, {k: float(v) for k, v in values.items() if np.ndim(v) == 0})

  # ---------------------------------------------------------------- loop
  nonfinite = train_state.NonfiniteWatch(state, train.on_nonfinite)
  progress = tqdm.tqdm(total=train.num_steps, initial=start, unit="step",
                       disable=jax.process_index() != 0)
  last = min(train.num_steps, _STOP_AT.value or train.num_steps)
  logged_at = None  # (step, time) of the last log; the first interval holds the compile
  for step in range(start + 1, last + 1):
    state, metrics = train_step(state, to_global(next(batches)))

    due = lambda every: every > 0 and (step % every == 0 or step == train.num_steps)
    if due(config.log_every) or due(config.checkpoint_every):
      nonfinite_steps = nonfinite.check(state, step, checkpointer.latest_step())
    if due(config.log_every):
      values = jax.device_get(metrics)  # waits for the step
      now = time.perf_counter()
      if logged_at:  # wall clock, so evaluations and checkpoints in the interval count too
        values["perf/steps_per_s"] = (step - logged_at[0]) / (now - logged_at[1])
      logged_at = step, now
      write(step, {**values, "nonfinite_steps": nonfinite_steps,
                   "data/epoch": batches.epoch,
                   "data/truncated_captions": batches.truncated_captions})
      progress.set_postfix(loss=f"{values['loss']:.4f}", image=f"{values['image_loss']:.3f}")
    if eval_batches and due(config.eval_every):
      totals = [jax.device_get(eval_step(state.ema_params, to_global(b))) for b in eval_batches]
      write(step, {f"eval/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]})
    if sample_grid and due(config.sample_every):
      sample_grid(state.ema_params, step)
    checkpointer.save(step, state, {"data": batches.get_state()}, force=step == last)
    progress.update(1)
  progress.close()
  checkpointer.wait()
  checkpointer.close()
  if events:
    events.close()
  print(f"stopped at step {last} of {train.num_steps}")


if __name__ == "__main__":
  app.run(main)
