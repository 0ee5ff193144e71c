"""Pre-encode a dataset into (captions, dVAE codes) shards for stage 2 (argmax codes, no noise).

  python experiments/encode_dataset.py --dvae_workdir=runs/dvae --dataset=emoji --out_dir=runs/codes
  python experiments/encode_dataset.py --openai_dvae=~/dall_e --dataset=folder --path=~/photos \
      --out_dir=runs/codes

Each host encodes its share (split as in training) on its own devices and writes its own shards.
Resumable: a shard is written whole and then `progress-{host}.json` records the position of the
data iterator, so an interrupted run started again continues after its last complete shard.
"""

import json
import os

from absl import app, flags, logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm

from dalle_jax import convert, dvae, dvae_training, launch
from dalle_jax import data as data_lib
from dalle_jax.data import codes as codes_lib
from dalle_jax.data import pipeline

_DVAE_WORKDIR = flags.DEFINE_string("dvae_workdir", None, "A train_dvae.py run directory.")
_OPENAI_DVAE = flags.DEFINE_string(
    "openai_dvae", None, "Instead: a directory holding OpenAI's released encoder.pkl and "
    "decoder.pkl (read with a restricted unpickler; images at 256x256).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RAW_PARAMS = flags.DEFINE_bool("raw_params", False, "Use the raw parameters, not the EMA.")
_DATASET = flags.DEFINE_enum("dataset", "shapes", data_lib.DATASETS, "Dataset to encode.")
_PATH = flags.DEFINE_string("path", None, "Directory (folder) or tar shards (webdataset).")
_SPLIT = flags.DEFINE_string("split", "train", "shapes and emoji: train, heldout (emoji: all).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 10_000, "shapes: how many scenes.")
_SEED = flags.DEFINE_integer("seed", 0, "shapes: which scenes.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the shards go.", required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per encoder call.", lower_bound=1)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Examples per shard (multiple of batch).")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", None, "Stop after writing this many shards in "
                                   "this invocation (chunked jobs); run again to continue.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Decoding processes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, or auto.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _SHARD_SIZE.value % _BATCH_SIZE.value:
    raise ValueError(f"--shard_size {_SHARD_SIZE.value} must be a multiple of --batch_size "
                     f"{_BATCH_SIZE.value}, so that shards end on batch boundaries")
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if bool(_DVAE_WORKDIR.value) == bool(_OPENAI_DVAE.value):
    raise ValueError("give exactly one of --dvae_workdir and --openai_dvae")
  if _OPENAI_DVAE.value:
    model, params = convert.load_openai_dvae(os.path.join(_OPENAI_DVAE.value, "encoder.pkl"),
                                             os.path.join(_OPENAI_DVAE.value, "decoder.pkl"))
  else:
    model, params = dvae_training.load_trained(_DVAE_WORKDIR.value, _STEP.value,
                                               ema=not _RAW_PARAMS.value)
  host = jax.process_index()
  os.makedirs(_OUT_DIR.value, exist_ok=True)

  source = data_lib.make_source(_DATASET.value, resolution=model.resolution, path=_PATH.value,
                                split=_SPLIT.value, num_examples=_NUM_EXAMPLES.value,
                                seed=_SEED.value)
  loader = pipeline.Loader(source, pipeline.LoaderConfig(
      resolution=model.resolution, batch_size=_BATCH_SIZE.value, crop="center", shuffle=False,
      num_epochs=1, drop_remainder=False, num_workers=_NUM_WORKERS.value))
  progress_path = os.path.join(_OUT_DIR.value, f"progress-{host:03d}.json")
  shard_index = 0
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    if progress["done"]:
      print(f"host {host}: already encoded ({progress['counts']})")
      return
    shard_index = progress["shards"]
    loader.set_state(progress["loader"])
    print(f"host {host}: resuming after {shard_index} shards")

  # This host's devices share each batch; hosts never wait for each other.
  local = Mesh(np.array(jax.local_devices()), ("batch",))
  split = _BATCH_SIZE.value % len(jax.local_devices()) == 0
  images_sharding = NamedSharding(local, P("batch") if split else P())
  encode = jax.jit(lambda p, x: dvae.encode(model, p, x), in_shardings=(
      NamedSharding(local, P()), images_sharding))
  params = jax.device_put(params, NamedSharding(local, P()))

  def flush(buffer, done):
    nonlocal shard_index
    if buffer["codes"]:
      codes_lib.write_shard(codes_lib.shard_path(_OUT_DIR.value, host, shard_index),
                            np.concatenate(buffer["codes"]), buffer["captions"], buffer["keys"])
      shard_index += 1
    state = {"shards": shard_index, "loader": loader.get_state(), "done": done,
             "counts": dict(loader.counts)}
    with open(progress_path + ".tmp", "w") as f:
      json.dump(state, f)
    os.replace(progress_path + ".tmp", progress_path)  # after the shard: never ahead of it
    for items in buffer.values():
      items.clear()

  buffer = {"codes": [], "captions": [], "keys": []}
  stop_at = shard_index + _MAX_SHARDS.value if _MAX_SHARDS.value else None
  with tqdm.tqdm(unit="image", desc=f"encoding {_DATASET.value}") as bar:
    for batch in loader:
      n = len(batch["image"])
      images = batch["image"]
      if n < _BATCH_SIZE.value:  # pad the last batch: one compiled shape
        images = np.concatenate([images, np.repeat(images[-1:], _BATCH_SIZE.value - n, 0)])
      buffer["codes"].append(np.asarray(encode(params, images))[:n])
      buffer["captions"].extend(batch["captions"])
      buffer["keys"].extend(batch["key"])
      bar.update(n)
      if sum(len(c) for c in buffer["codes"]) >= _SHARD_SIZE.value:
        flush(buffer, done=False)
        if shard_index == stop_at:
          print(f"host {host}: stopped after {shard_index} shards (--max_shards)")
          return
  flush(buffer, done=True)
  print(f"host {host}: {shard_index} shards in {_OUT_DIR.value}; data: {loader.counts.summary()}")


if __name__ == "__main__":
  app.run(main)
