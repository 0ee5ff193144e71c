"""experiments/sample.py end to end on a 2-step transformer, 2-step dVAEs and a 2-step reranker:
the files it writes, the same images whatever the batch size, truncation warnings, priming,
reranking, refusing a dVAE that does not fit, and one line naming the file (and line) or the flag
for each bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CACHE_ENV, REPO, train_tiny_stages
from dalle_jax import image_grid
from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import preprocess
from dalle_jax.dvae import model as dvae, training as dvae_training
from dalle_jax.rerank import model as rerank, training as rerank_training

SCRIPT = os.path.join(REPO, "experiments", "sample.py")
CONFIGS = os.path.join(REPO, "experiments", "configs")
LONG_PROMPT = "a small red circle above a large blue square " * 3
PROMPTS = ("a red circle", LONG_PROMPT)
HUGE_PROMPT = "two blue squares " * 199_999 + "two blue squares"  # 3.4 MB
ENV = {**os.environ, **CACHE_ENV, "JAX_PLATFORMS": "cpu"}


def _start(script: str, *flags: str, env: dict | None = None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.join(REPO, "experiments", script), *flags],
                          env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def _ok(process: subprocess.Popen) -> tuple[str, str]:
  code, out, err = _finish(process)
  assert code == 0, err[-3000:]
  return out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-step transformer (its config naming the dVAE), a matching 2-step dVAE, one with a
  16-code vocabulary and a 2-step reranker, trained side by side."""
  root = tmp_path_factory.mktemp("sample")
  return train_tiny_stages(str(root), dvae16=True)


def _sample(runs, out, *extra, env=None):
  return _start("sample.py", f"--checkpoint={runs['transformer']}",
                *(f"--prompt={p}" for p in PROMPTS), "--num_samples=3", "--seed=7",
                f"--out={out}", *extra, env=env)


@pytest.fixture(scope="module")
def sampled(runs, tmp_path_factory):
  """Four sample.py runs at once: batch 4, batch 2 (the dVAE from the run config), primed, and
  with the wrong dVAE."""
  root = tmp_path_factory.mktemp("out")
  prime = root / "prime.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8)).save(prime)
  Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "tiny.png")
  (root / "notes.png").write_text("not a picture")
  (root / "latin.txt").write_bytes("a red circle\ncaf\xe9\n".encode("latin-1"))
  (root / "empty.txt").write_bytes(b"\n \n")
  (root / "long.txt").write_text(HUGE_PROMPT + "\na red circle\n", encoding="utf-8")
  only = lambda *flags: _start("sample.py", f"--checkpoint={runs['transformer']}", *flags,
                               f"--out={root / 'unused'}")
  processes = {
      "batch4": _sample(runs, root / "batch4", "--batch_size=4", f"--dvae_workdir={runs['dvae']}"),
      "batch2": _sample(runs, root / "batch2", "--batch_size=2"),
      # The transformer split over 8 devices as training splits it (fsdp 2 x tensor 2).
      "sharded": _sample(runs, root / "sharded", "--batch_size=4", "--fsdp=2", "--tensor=2",
                         env={**ENV, "JAX_NUM_CPU_DEVICES": "8"}),
      "primed": _sample(runs, root / "primed", "--batch_size=4", f"--prime_image={prime}",
                        "--prime_rows=2"),
      "wrong_dvae": _sample(runs, root / "wrong", f"--dvae_workdir={runs['dvae16']}"),
      # Candidates g = 3 * prompt + j draw with the keys of batch4's samples: the same images.
      "reranked": _sample(runs, root / "reranked", "--batch_size=4", "--rerank=3", "--keep=2",
                          f"--reranker={runs['reranker']}"),
      "not_utf8": only(f"--prompts_file={root / 'latin.txt'}"),
      "empty_prompts": only(f"--prompts_file={root / 'empty.txt'}"),
      "not_an_image": only("--prompt=x", f"--prime_image={root / 'notes.png'}", "--prime_rows=1"),
      "tiny_prime": only("--prompt=x", f"--prime_image={root / 'tiny.png'}", "--prime_rows=1"),
      "long": _start("sample.py", f"--checkpoint={runs['transformer']}",
                     f"--prompts_file={root / 'long.txt'}", "--num_samples=1",
                     f"--out={root / 'long'}"),
  }
  results = {name: _finish(p) for name, p in processes.items()}
  return root, prime, results


def test_writes_the_grid_the_single_images_and_the_manifest(sampled):
  root, _, results = sampled
  code, out, err = results["batch4"]
  assert code == 0, err[-3000:]
  assert "image tokens/s" in out and "compiled" in out
  out_dir = root / "batch4"
  with open(out_dir / "samples.json") as f:
    manifest = json.load(f)
  assert [p["prompt"] for p in manifest["prompts"]] == list(PROMPTS)
  assert [p["truncated"] for p in manifest["prompts"]] == [False, True]
  assert manifest["seed"] == 7 and manifest["batch_size"] == 4 and manifest["num_samples"] == 3
  assert set(manifest["settings"]) >= {"temperature", "top_k", "top_p", "guidance", "prime_rows"}
  files = [s["file"] for p in manifest["prompts"] for s in p["samples"]]
  assert files == [f"prompt{i}_sample{j}.png" for i in range(2) for j in range(3)]
  assert [s["sample_index"] for p in manifest["prompts"] for s in p["samples"]] == list(range(6))
  for name in files:
    assert Image.open(out_dir / name).size == (16, 16)
  expected = image_grid.captioned_grid(np.zeros((6, 16, 16, 3), np.uint8), ["x"] * 6, columns=3)
  assert Image.open(out_dir / "grid.png").size == expected.size
  assert np.load(out_dir / "codes.npz")["codes"].shape == (2, 3, 4, 4)


def test_the_transformer_split_over_devices_draws_the_same_images(sampled):
  root, _, results = sampled
  code, _, err = results["sharded"]
  assert code == 0, err[-3000:]
  codes = lambda name: np.load(root / name / "codes.npz")["codes"]
  np.testing.assert_array_equal(codes("sharded"), codes("batch4"))


def test_a_long_prompt_is_truncated_with_a_warning(sampled):
  _, _, results = sampled
  _, _, err = results["batch4"]
  assert "truncated" in err and repr(LONG_PROMPT) in err
  assert repr(PROMPTS[0]) not in err


def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(sampled):
  root, _, results = sampled
  code, _, err = results["batch2"]
  assert code == 0, err[-3000:]
  for i in range(2):
    for j in range(3):
      name = f"prompt{i}_sample{j}.png"
      assert (root / "batch2" / name).read_bytes() == (root / "batch4" / name).read_bytes(), name
  codes = np.load(root / "batch4" / "codes.npz")["codes"]
  assert len({c.tobytes() for c in codes.reshape(6, -1)}) > 1  # different keys, different draws


def test_priming_keeps_the_image_s_first_rows_of_codes(runs, sampled):
  root, prime, results = sampled
  code, _, err = results["primed"]
  assert code == 0, err[-3000:]
  config, params = dvae_training.load_trained(runs["dvae"])
  pixels = preprocess.preprocess(Image.open(prime), config.resolution, "center")
  expected = np.asarray(dvae.encode(config, params, pixels[None]))[0]
  codes = np.load(root / "primed" / "codes.npz")["codes"]
  np.testing.assert_array_equal(codes[:, :, :2], np.broadcast_to(expected[:2], (2, 3, 2, 4)))
  with open(root / "primed" / "samples.json") as f:
    assert json.load(f)["settings"]["prime_rows"] == 2


def test_a_dvae_that_does_not_fit_the_transformer_is_refused(sampled):
  _, _, results = sampled
  code, _, err = results["wrong_dvae"]
  assert code != 0
  assert "vocab_size 16" in err and "--dvae_workdir" in err


def test_reranking_keeps_the_best_scored_candidates_best_first(runs, sampled):
  root, _, results = sampled
  code, _, err = results["reranked"]
  assert code == 0, err[-3000:]
  config, params, tokenizer_dir = rerank_training.load_trained(runs["reranker"])
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_dir)
  with open(root / "reranked" / "samples.json") as f:
    manifest = json.load(f)
  for i, entry in enumerate(manifest["prompts"]):
    # Score the plain run's three samples of this prompt ourselves: the same candidates.
    names = [f"prompt{i}_sample{j}.png" for j in range(3)]
    images = np.stack([np.asarray(Image.open(root / "batch4" / name)) for name in names])
    text = np.stack([tokenizer.encode(PROMPTS[i])[0]] * 3)
    scores = np.asarray(rerank.score(params, config, images, text))
    best = np.argsort(-scores, kind="stable")[:2]
    assert [s["sample_index"] for s in entry["samples"]] == [3 * i + int(j) for j in best]
    np.testing.assert_allclose([s["score"] for s in entry["samples"]], scores[best], atol=1e-5)
    for sample, j in zip(entry["samples"], best):
      assert (root / "reranked" / sample["file"]).read_bytes() == \
          (root / "batch4" / names[j]).read_bytes()
  assert np.load(root / "reranked" / "codes.npz")["codes"].shape == (2, 2, 4, 4)


def test_bad_inputs_get_one_line_naming_the_file_line_or_flag(sampled):
  root, _, results = sampled
  expected = {
      "not_utf8": f"sample.py: line 2 of the prompts file {root / 'latin.txt'} is not UTF-8 "
                  "(byte 0xe9 at column 4): save the file as UTF-8",
      "empty_prompts": f"sample.py: the prompts file {root / 'empty.txt'} is empty: write one "
                       "caption per line",
      "not_an_image": f"sample.py: --prime_image {root / 'notes.png'} is not an image Pillow can "
                      "read",
      "tiny_prime": f"sample.py: --prime_image {root / 'tiny.png'} is 3x2 pixels, fewer than the "
                    "4x4 codes it becomes: pass an image of at least 16x16",
  }
  for name, message in expected.items():
    code, _, err = results[name]
    assert code == 1, (name, err[-3000:])
    assert err.strip().splitlines()[-1].startswith(message), (name, err[-3000:])
    assert "Traceback" not in err, name


def test_a_huge_prompt_is_shown_and_stored_as_a_prefix_with_its_length(sampled):
  root, _, results = sampled
  code, _, err = results["long"]
  assert code == 0, err[-3000:]
  assert "... (3,399,999 characters)" in err and len(err) < 20_000
  with open(root / "long" / "samples.json") as f:
    manifest = json.load(f)
  huge, short = manifest["prompts"]
  assert huge["prompt"] == HUGE_PROMPT[:200] + "... (3,399,999 characters)"
  assert huge["length"] == len(HUGE_PROMPT) and huge["truncated"]
  assert short["prompt"] == "a red circle" and short["length"] == 12 and not short["truncated"]
  assert os.path.getsize(root / "long" / "samples.json") < 10_000
