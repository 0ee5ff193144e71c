"""Stage 2: train the transformer on pre-encoded (caption, codes) shards.

  python experiments/train_transformer.py --config=experiments/configs/transformer_small.py \
      --workdir=runs/transformer --config.data.codes_dir=runs/codes \
      --config.data.tokenizer_dir=runs/tokenizer
  # 8 devices as 2 data x 2 fsdp x 2 tensor:
  python experiments/train_transformer.py ... --config.mesh.fsdp=2 --config.mesh.tensor=2

The codes come from experiments/encode_dataset.py, the tokenizer from train_tokenizer.py. A killed
run started again with the same --workdir resumes from its last complete checkpoint, on any mesh.
The workdir holds checkpoints/, metrics.jsonl, TensorBoard events (tensorboard/: scalars and sample
grids) and config.json. --config.init_from=<workdir> starts from another run's parameters
(fine-tuning). SIGTERM or SIGINT saves a checkpoint at the step reached and exits with status 75.
"""

import os
import sys
import time

from absl import flags, logging
import jax
import numpy as np
from ml_collections import config_flags
import tqdm

from dalle_jax import generate, image_grid, sharding
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import code_batches, code_shards
from dalle_jax.scaling import fit_check
from dalle_jax.train import finetune, launch, preemption, tensorboard_writer, train_state
from dalle_jax.transformer import training as transformer_training
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.training import TransformerTrainConfig

# The repository root: configs are imported (and import each other) as experiments.configs.<name>.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def check_data(model: TransformerConfig, tokenizer, shards: code_shards.CodeShards,
               where: str, sample: int = 256) -> None:
  """Refuses data that does not fit the model, before anything compiles (the code range on
  `sample` examples spread over the data, which is all a large dataset allows)."""
  if (tokenizer.vocab_size, tokenizer.text_len) != (model.text_vocab_size, model.text_len):
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} pieces and text_len {tokenizer.text_len}, the "
        f"model {model.text_vocab_size} and {model.text_len}: set --config.model.text_vocab_size="
        f"{tokenizer.vocab_size} --config.model.text_len={tokenizer.text_len}")
  if shards.grid != (model.image_size, model.image_size):
    raise ValueError(f"{where} holds {shards.grid} code grids, the model expects "
                     f"{model.image_size}x{model.image_size}: set --config.model.image_size")
  indices = np.unique(np.linspace(0, len(shards) - 1, min(sample, len(shards))).astype(int))
  codes = np.stack([shards[int(i)]["codes"] for i in indices])
  if codes.min() < 0 or codes.max() >= model.image_vocab_size:
    raise ValueError(f"{where} holds codes up to {codes.max()}, outside the model's "
                     f"image_vocab_size {model.image_vocab_size}: set it to the dVAE's vocabulary")


def make_sample_grid(dvae_workdir: str, model: TransformerConfig, mesh, param_shardings,
                     tokenizer, captions: list[str], seed: int, workdir: str, keep: int):
  """`grid(params, step)` draws one image per caption (the same seed at every step, so
  successive steps compare), writes workdir/samples/step_N.png, keeping the newest `keep` (0: all),
  and returns it (on host 0; None elsewhere)."""
  dvae_config, dvae_params = generate.load_dvae(dvae_workdir, model)
  drawer = generate.Generator(model, None, tokenizer, dvae_config, dvae_params, mesh=mesh,
                              param_shardings=param_shardings)

  def grid(params, step):
    drawer.params = params
    images = drawer.generate(captions, seed=seed, progress=False,
                             batch_size=len(captions)).images[:, 0]
    if jax.process_index() != 0:
      return None
    figure = image_grid.captioned_grid(images, captions, tile_size=96)
    launch.save_snapshot(figure, os.path.join(workdir, "samples"), step, keep)
    return figure

  return grid


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  # ---------------------------------------------------------------- config, refused before compiling
  model = TransformerConfig(**config.model)
  train = TransformerTrainConfig(**config.train)
  rules = transformer_training.run_rules(config)  # the logical axes' placement
  fit_check.at_launch(_FIT_CHECK, lambda target: fit_check.transformer_train(
      model, train, dict(config.mesh), target, rules))
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
  # Codes stream from their shards (any epath: gs://...); memory does not grow with the data.
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer_dir)
  shards = code_shards.CodeShards(config.data.codes_dir)
  check_data(model, tokenizer, shards, config.data.codes_dir)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = code_batches.CodeBatches(shards, tokenizer, train.batch_size, seed=train.seed,
                                     **hosts)
  eval_batches = []
  if config.data.eval_codes_dir:
    eval_shards = code_shards.CodeShards(config.data.eval_codes_dir)
    check_data(model, tokenizer, eval_shards, config.data.eval_codes_dir)
    eval_iter = code_batches.CodeBatches(eval_shards, tokenizer, train.batch_size,
                                         training=False, **hosts)
    eval_batches = [b for b, _ in zip(eval_iter, range(config.data.eval_batches))]

  # ---------------------------------------------------------------- model, optimiser, sharding
  shardings = transformer_training.state_shardings(model, train, mesh, rules)
  state, extras, checkpointer, log = launch.open_run(
      workdir, config, lambda rng: transformer_training.init_state(model, train, rng),
      lambda: transformer_training.create_sharded_state(model, train, mesh, shardings), shardings)
  if extras is not None:
    batches.set_state(extras["data"])
  elif config.init_from:
    state = finetune.init_from(state, config.init_from)
  start = int(state.step)
  train_step = transformer_training.make_train_step(model, train, mesh, shardings, rules)
  eval_step = transformer_training.make_eval_step(model, mesh, shardings.params, rules)
  events = tensorboard_writer.EventLog(os.path.join(workdir, "tensorboard"),
                                resume_step=None if extras is None else start,
                                enabled=jax.process_index() == 0)
  to_global = lambda batch: sharding.host_batch_to_global(batch, sharding.batch_sharding(mesh))

  sample_grid = None
  if config.get("sample_every", 0) and config.data.dvae_workdir:
    first = eval_shards if eval_batches else shards
    captions = list(config.get("sample_captions", ())) or [
        first[i]["captions"][0] for i in range(min(8, len(first)))]
    sample_grid = make_sample_grid(config.data.dvae_workdir, model, mesh, shardings.params,
                                   tokenizer, captions, train.seed, workdir,
                                   launch.snapshots_to_keep(config))

  def write(step, values):
    log.write(step, values)
    events.scalars(step, values)

  # ---------------------------------------------------------------- loop
  preempted, stop = preemption.PreemptionWatch(), False
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
      events.image(step, "samples", sample_grid(state.ema_params, step))
    stop = preempted.reached(step)  # every host stops after the same step
    checkpointer.save(step, state, {"data": batches.get_state()}, force=step == last or stop)
    progress.update(1)
    if stop:
      break
  progress.close()
  checkpointer.wait()
  checkpointer.close()
  events.close()
  if stop:
    preempted.exit(step, train.num_steps)
  print(f"stopped at step {last} of {train.num_steps}")


if __name__ == "__main__":
  launch.run(main)
