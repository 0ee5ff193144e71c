"""Pre-encode a dataset into (captions, dVAE codes) shards for stage 2 (argmax codes, no noise).

  python experiments/encode_dataset.py --dvae_workdir=runs/dvae --dataset=emoji --out_dir=runs/codes
  python experiments/encode_dataset.py --openai_dvae=~/dall_e --dataset=folder --path=~/photos \
      --out_dir=gs://bucket/codes --augmentations=8
  python experiments/encode_dataset.py --convert_npz=runs/old_codes --out_dir=runs/codes

Shards are `dalle_jax/data/code_shards.py`'s format. With `--augmentations=K` > 1 every image is
encoded K times, each a different draw of the paper's transformer crop (Listing 2,
`preprocess.transformer_augment`: a short-side square near the centre, area resize to [1, 9/8] x
resolution, random crop, no flip), and stage 2 reads encoding `epoch % K` in epoch `epoch`; with
K = 1 it is the centre crop. Each of the K crops decodes the image again.

Each host encodes its share (split as in training) on its own devices and writes its own shards.
Resumable: a shard is written whole and then `progress-{host}.json` records the position of the
data iterators, so an interrupted run started again continues after its last complete shard.
`--convert_npz` rewrites a directory of the older `.npz` shards in this format.
"""

import json
import os

from absl import app, flags, logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm
from etils import epath

from dalle_jax import data as data_lib
from dalle_jax.data import code_shards
from dalle_jax.data import pipeline
from dalle_jax.dvae import model as dvae, openai_weights, training as dvae_training
from dalle_jax.train import launch

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
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the shards go (any epath: gs://...).",
                                required=True)
_AUGMENTATIONS = flags.DEFINE_integer(
    "augmentations", 1, "Encodings per image: 1 is the centre crop, K > 1 are K draws of the "
    "paper's transformer crop (stage 2 reads one per epoch).", lower_bound=1)
_CONVERT_NPZ = flags.DEFINE_string(
    "convert_npz", None, "Instead of encoding: rewrite this directory of .npz code shards "
    "into --out_dir.")
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
  if _CONVERT_NPZ.value:
    count = code_shards.convert_npz(_CONVERT_NPZ.value, _OUT_DIR.value)
    print(f"converted {count} examples from {_CONVERT_NPZ.value} into {_OUT_DIR.value}")
    return
  if _SHARD_SIZE.value % _BATCH_SIZE.value:
    raise ValueError(f"--shard_size {_SHARD_SIZE.value} must be a multiple of --batch_size "
                     f"{_BATCH_SIZE.value}, so that shards end on batch boundaries")
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if bool(_DVAE_WORKDIR.value) == bool(_OPENAI_DVAE.value):
    raise ValueError("give exactly one of --dvae_workdir and --openai_dvae")
  if _OPENAI_DVAE.value:
    model, params = openai_weights.load_openai_dvae(os.path.join(_OPENAI_DVAE.value, "encoder.pkl"),
                                             os.path.join(_OPENAI_DVAE.value, "decoder.pkl"))
  else:
    model, params = dvae_training.load_trained(_DVAE_WORKDIR.value, _STEP.value,
                                               ema=not _RAW_PARAMS.value)
  host = jax.process_index()
  out_dir = epath.Path(_OUT_DIR.value)
  out_dir.mkdir(parents=True, exist_ok=True)

  source = data_lib.make_source(_DATASET.value, resolution=model.resolution, path=_PATH.value,
                                split=_SPLIT.value, num_examples=_NUM_EXAMPLES.value,
                                seed=_SEED.value)
  augmentations = _AUGMENTATIONS.value
  # One loader per encoding, in lockstep (no shuffle): seed k draws the k-th crop of every image.
  loaders = [pipeline.Loader(source, pipeline.LoaderConfig(
      resolution=model.resolution, batch_size=_BATCH_SIZE.value, seed=k,
      crop="center" if augmentations == 1 else "transformer", shuffle=False, num_epochs=1,
      drop_remainder=False, num_workers=_NUM_WORKERS.value)) for k in range(augmentations)]
  progress_path = out_dir / f"progress-{host:03d}.json"
  shard_index = 0
  if progress_path.exists():
    progress = json.loads(progress_path.read_text())
    if progress.get("augmentations", 1) != augmentations:
      raise ValueError(f"{out_dir} holds {progress.get('augmentations', 1)} encodings per image, "
                       f"not --augmentations={augmentations}: use that value or a new --out_dir")
    if progress["done"]:
      print(f"host {host}: already encoded ({progress['counts']})")
      return
    shard_index = progress["shards"]
    for loader, state in zip(loaders, progress.get("loaders") or [progress["loader"]]):
      loader.set_state(state)
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
      code_shards.write_shard(code_shards.shard_path(out_dir, host, shard_index),
                              np.concatenate(buffer["codes"]), buffer["captions"], buffer["keys"])
      shard_index += 1
    state = {"shards": shard_index, "loaders": [loader.get_state() for loader in loaders],
             "augmentations": augmentations, "done": done, "counts": dict(loaders[0].counts)}
    temporary = out_dir / (progress_path.name + ".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(progress_path)  # after the shard: never ahead of it
    for items in buffer.values():
      items.clear()

  def encode_padded(images):
    n = len(images)
    if n < _BATCH_SIZE.value:  # pad the last batch: one compiled shape
      images = np.concatenate([images, np.repeat(images[-1:], _BATCH_SIZE.value - n, 0)])
    return np.asarray(encode(params, images))[:n]

  buffer = {"codes": [], "captions": [], "keys": []}
  stop_at = shard_index + _MAX_SHARDS.value if _MAX_SHARDS.value else None
  with tqdm.tqdm(unit="image", desc=f"encoding {_DATASET.value}") as bar:
    for batches in zip(*loaders):
      batch = batches[0]
      n = len(batch["image"])
      if any(list(b["key"]) != list(batch["key"]) for b in batches[1:]):
        raise RuntimeError("the crop loaders fell out of step; report this with the dataset")
      buffer["codes"].append(np.stack([encode_padded(b["image"]) for b in batches], axis=1))
      buffer["captions"].extend(batch["captions"])
      buffer["keys"].extend(batch["key"])
      bar.update(n)
      if sum(len(c) for c in buffer["codes"]) >= _SHARD_SIZE.value:
        flush(buffer, done=False)
        if shard_index == stop_at:
          print(f"host {host}: stopped after {shard_index} shards (--max_shards)")
          return
  flush(buffer, done=True)
  print(f"host {host}: {shard_index} shards in {out_dir}; data: {loaders[0].counts.summary()}")


if __name__ == "__main__":
  app.run(main)
