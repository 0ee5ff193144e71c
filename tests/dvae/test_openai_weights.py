"""dalle_jax/dvae/openai_weights.py: OpenAI's dVAE weights give our dVAE the official outputs, read safely.

The reference is OpenAI's own `dall_e` package (PyPI `DALL-E==0.1`, installed `--no-deps` by
`make setup`) on PyTorch, with random weights: a small config for numbers, the full one for shapes.
"""

import copy
import io
import os
import pickle
import shlex
import sys

import dall_e  # OpenAI's reference; `make setup` installs it
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dalle_jax.dvae import model as dvae, openai_weights, safe_pickle

# The official validators' minimums (n_hid >= 64, vocab >= 512); 32x32 pixels -> 4x4 codes.
SMALL = dvae.DVAEConfig(resolution=32, group_count=4, n_hid=64, n_blk_per_group=1, n_init=32,
                        vocab_size=512)
_encoder_logits = jax.jit(dvae.encoder_logits, static_argnums=0)
_decoder_stats = jax.jit(dvae.decoder_stats, static_argnums=0)


def _nchw(x) -> "torch.Tensor":
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(x: "torch.Tensor") -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _assert_close_relative(ours, theirs):
  """Within 1e-4 of the reference's scale: rtol 1e-4 and atol 1e-4 * max |reference|."""
  theirs = np.asarray(theirs)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.fixture(scope="module")
def official():
  """OpenAI's Encoder and Decoder with random weights and (unlike their init) random biases."""
  torch.manual_seed(0)
  encoder = dall_e.Encoder(n_hid=SMALL.n_hid, n_blk_per_group=SMALL.n_blk_per_group,
                           vocab_size=SMALL.vocab_size)
  decoder = dall_e.Decoder(n_init=SMALL.n_init, n_hid=SMALL.n_hid,
                           n_blk_per_group=SMALL.n_blk_per_group, vocab_size=SMALL.vocab_size)
  with torch.no_grad():
    for name, tensor in [*encoder.named_parameters(), *decoder.named_parameters()]:
      if name.endswith(".b"):
        tensor.normal_(std=0.1)  # zero biases would hide a bias mix-up
  return encoder.eval(), decoder.eval()


@pytest.fixture(scope="module")
def converted(official):
  encoder, decoder = official
  config = openai_weights.dvae_config_from_state_dict(encoder.state_dict(), decoder.state_dict(), 32)
  params = {"encoder": openai_weights.openai_dvae_to_flax(encoder.state_dict(), "encoder"),
            "decoder": openai_weights.openai_dvae_to_flax(decoder.state_dict(), "decoder")}
  return config, params


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def test_config_is_read_off_the_tensors(converted):
  config, params = converted
  assert config == SMALL
  assert params["encoder"]["input"]["w"].shape == (7, 7, 3, 64)  # (n_out, n_in, k, k) -> HWIO
  assert params["encoder"]["group_2_block_1"]["id_path"]["w"].shape == (1, 1, 64, 128)
  assert params["decoder"]["input"]["w"].shape == (1, 1, 512, 32)
  assert params["decoder"]["input"]["w"].dtype == np.float32


def test_encoder_gives_the_official_logits_and_codes(official, converted, images):
  config, params = converted
  ours = np.asarray(_encoder_logits(config, params, jnp.asarray(images)))
  # Both sides see the same mapped pixels: the official Encoder expects map_pixels applied.
  pixels = dvae.map_pixels(jnp.asarray(images))
  with torch.no_grad():
    theirs = _nhwc(official[0](_nchw(pixels)))
  assert ours.shape == theirs.shape == (2, 4, 4, 512)
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
  _assert_close_relative(ours, theirs)


def test_decoder_gives_the_official_statistics(official, converted, images):
  config, params = converted
  codes = np.random.default_rng(1).integers(0, 512, (2, 4, 4), dtype=np.int32)
  soft = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 4, 4, 512)) * 3.0)
  with torch.no_grad():
    from_codes = _nhwc(official[1](_nchw(jax.nn.one_hot(codes, 512))))
    from_soft = _nhwc(official[1](_nchw(soft)))
  assert from_codes.shape == (2, 32, 32, 6)
  _assert_close_relative(_decoder_stats(config, params, jnp.asarray(codes)), from_codes)
  _assert_close_relative(_decoder_stats(config, params, soft), from_soft)


def test_export_is_the_exact_inverse(official, converted):
  _, params = converted
  for module, part in zip(official, openai_weights.PARTS):
    exported = openai_weights.flax_to_openai_state_dict(params, part)
    reference = module.state_dict()
    assert list(exported) == list(reference)  # same keys, in state_dict() order
    for key, value in reference.items():
      np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    fresh = copy.deepcopy(module)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  # One part's tree works too.
  part_only = openai_weights.flax_to_openai_state_dict(params["decoder"], "decoder")
  assert part_only.keys() == official[1].state_dict().keys()


def test_released_configuration_converts_structurally():
  """The full-size nets on torch's meta device: shapes only, no memory, nothing run."""
  meta = torch.device("meta")
  encoder_sd = dall_e.Encoder(device=meta).state_dict()
  decoder_sd = dall_e.Decoder(device=meta).state_dict()
  assert (len(encoder_sd), len(decoder_sd)) == (74, 76)
  config = openai_weights.dvae_config_from_state_dict(encoder_sd, decoder_sd)
  assert config == dvae.DVAEConfig()
  shapes = jax.eval_shape(lambda key: dvae.init(config, key), jax.random.key(0))
  for part, sd, count in (("encoder", encoder_sd, 53_786_240), ("decoder", decoder_sd, 43_829_766)):
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes[part])) == count
    # Zero-stride stand-ins for the tensors: the real conversion code, no 200 MB of zeros.
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}
    tree = openai_weights.openai_dvae_to_flax(fake, part)
    assert jax.tree.map(np.shape, tree) == jax.tree.map(lambda s: s.shape, shapes[part])


def test_bad_keys_and_shapes_are_listed(official):
  sd = dict(official[0].state_dict())
  with pytest.raises(ValueError, match=r"unknown keys .*blocks\.extra\.w.*blocks\.group_1\.bn\.w"):
    openai_weights.openai_dvae_to_flax({**sd, "blocks.extra.w": sd["blocks.input.w"],
                                 "blocks.group_1.bn.w": sd["blocks.input.b"]}, "encoder")
  missing = {k: v for k, v in sd.items() if "group_3.block_1.res_path.conv_2" not in k}
  with pytest.raises(ValueError, match=r"missing keys \['blocks\.group_3\.block_1\.res_path"
                                       r"\.conv_2\.b', 'blocks\.group_3\.block_1\.res_path"):
    openai_weights.openai_dvae_to_flax(missing, "encoder")
  wrong = {**sd, "blocks.group_1.block_1.res_path.conv_1.b": torch.zeros(3)}
  with pytest.raises(ValueError, match=r"wrong shapes .*res_path\.conv_1\.b: \(3,\)"):
    openai_weights.openai_dvae_to_flax(wrong, "encoder")
  with pytest.raises(ValueError, match="not an OpenAI dVAE decoder"):
    openai_weights.openai_dvae_to_flax(sd, "decoder")
  with pytest.raises(ValueError, match="part must be"):
    openai_weights.openai_dvae_to_flax(sd, "both")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_released_pickles_load_without_dall_e(official, converted, tmp_path, monkeypatch,
                                              zip_format):
  """`torch.save(module)` as OpenAI did; `dall_e` is made unimportable to prove the stand-ins."""
  paths = [tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"]
  for module, path in zip(official, paths):
    torch.save(module, path, _use_new_zipfile_serialization=zip_format)
  for name in ("dall_e", "dall_e.encoder", "dall_e.decoder", "dall_e.utils"):
    monkeypatch.setitem(sys.modules, name, None)
  config, params = openai_weights.load_openai_dvae(*paths, resolution=32)
  assert config == converted[0]
  jax.tree.map(np.testing.assert_array_equal, params, converted[1])
  with pytest.raises(ValueError, match="swapped"):
    openai_weights.load_openai_dvae(paths[1], paths[0])


def test_state_dict_files_load_too(official, tmp_path):
  path = tmp_path / "encoder_state.pt"
  torch.save(official[0].state_dict(), path)
  loaded = openai_weights.load_openai_state_dict(path)
  assert list(loaded) == list(official[0].state_dict())
  np.testing.assert_array_equal(loaded["blocks.input.w"], official[0].blocks.input.w.detach())


class _RunsCommand:
  """What a trojaned pickle carries: unpickling it calls os.system(command)."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _NestedPickle:
  """Hides a pickle inside `torch.storage._load_from_bytes`, which torch loads unrestricted."""

  def __init__(self, payload: bytes):
    self.payload = payload

  def __reduce__(self):
    return (torch.storage._load_from_bytes, (self.payload,))


def _write_payload(kind: str, path, command: str, official) -> None:
  if kind == "plain_pickle":
    with open(path, "wb") as f:
      pickle.dump(_RunsCommand(command), f)
  elif kind == "torch_save":
    torch.save(_RunsCommand(command), path)
  elif kind == "inside_the_encoder":
    trojaned = copy.deepcopy(official[0])
    trojaned.payload = _RunsCommand(command)  # a plain attribute: pickled in the module's state
    torch.save(trojaned, path)
  elif kind == "nested_load_from_bytes":
    inner = io.BytesIO()
    torch.save(_RunsCommand(command), inner)
    torch.save({"blocks.input.w": _NestedPickle(inner.getvalue())}, path)


def test_the_payload_is_live(tmp_path):
  """Control: an unrestricted unpickler does run it, so the refusals below mean something."""
  marker = tmp_path / "ran"
  pickle.loads(pickle.dumps(_RunsCommand(f"touch {shlex.quote(str(marker))}")))
  assert marker.exists()


@pytest.mark.parametrize("kind", ["plain_pickle", "torch_save", "inside_the_encoder",
                                  "nested_load_from_bytes"])
def test_pickles_with_other_callables_are_refused(kind, official, tmp_path):
  marker, path = tmp_path / "pwned", tmp_path / "encoder.pkl"
  _write_payload(kind, path, f"touch {shlex.quote(str(marker))}", official)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"refused to unpickle posix\.system: only "
                                                      r"OpenAI's dVAE pickles"):
    openai_weights.load_openai_dvae(path, path)
  assert not marker.exists()


def test_the_allow_list_is_exactly_what_the_released_files_need():
  allowed = {f"{module}.{name}" for module, name in safe_pickle._allowed_globals()}
  assert "posix.system" not in allowed and "builtins.eval" not in allowed
  assert safe_pickle._allowed_globals()[("torch.storage", "_load_from_bytes")] is not (
      torch.storage._load_from_bytes)
  latin1 = safe_pickle._allowed_globals()[("_codecs", "encode")]  # how protocol 2 spells bytes
  assert latin1("\xff", "latin1") == b"\xff"
  with pytest.raises(safe_pickle.UnsafePickleError, match="only latin1"):
    latin1("x", "zlib_codec")
  unpickler = safe_pickle.RestrictedUnpickler(io.BytesIO(b""))
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"builtins\.getattr"):
    unpickler.find_class("builtins", "getattr")
  assert unpickler.find_class("torch.nn.modules.upsampling", "Upsample").pickled_name == (
      "torch.nn.modules.upsampling.Upsample")
