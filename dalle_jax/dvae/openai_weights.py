"""OpenAI's released dVAE weights (`encoder.pkl`, `decoder.pkl`) -> our Flax parameters, safely.

    encoder.pkl --restricted unpickler--> state dict {"blocks.input.w": (n_out, n_in, k, k), ...}
                --openai_dvae_to_flax--> {"input": {"w": (k, k, n_in, n_out), "b": (n_out,)}, ...}

Official keys and ours differ only in separators (`blocks.group_1.block_1.res_path.conv_1.w` is
`group_1_block_1/res_path_conv_1/w`) and in the weight layout (OIHW vs. HWIO); biases are copied.
The config is read off the tensors (`dvae_config_from_state_dict`), so no hand-written config.

The released files are whole pickled torch modules (`torch.save(module)`); `safe_pickle.py` reads
them without running any code but torch's tensor rebuilding.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.dvae import model as dvae, safe_pickle
from dalle_jax.dvae.safe_pickle import UnsafePickleError  # noqa: F401  (raised by the loaders)

PARTS = ("encoder", "decoder")
# The top-level class each released file holds.
OFFICIAL_ROOTS = {"encoder": "dall_e.encoder.Encoder", "decoder": "dall_e.decoder.Decoder"}

# blocks.input | blocks.output.conv | blocks.group_G.block_K.{id_path, res_path.conv_N}, then .w/.b
_OFFICIAL_KEY = re.compile(
    r"blocks\.(?:(?P<input>input)|(?P<output>output\.conv)"
    r"|group_(?P<g>[1-9]\d*)\.block_(?P<k>[1-9]\d*)"
    r"\.(?:(?P<id>id_path)|res_path\.conv_(?P<n>[1-4])))\.(?P<leaf>[wb])")
_FLAX_BLOCK = re.compile(r"group_(?P<g>[1-9]\d*)_block_(?P<k>[1-9]\d*)")
_FLAX_CONV = re.compile(r"id_path|res_path_conv_(?P<n>[1-4])")

Path = tuple[str, ...]  # a leaf of our tree, e.g. ("group_1_block_1", "res_path_conv_1", "w")


# ------------------------------------------------------------------------------------------------
# Key and layout mapping.
# ------------------------------------------------------------------------------------------------

def _flax_path(key: str) -> Path | None:
  """Official key -> our path (`blocks.output.conv.w` -> ("output_conv", "w")); None if unknown."""
  m = _OFFICIAL_KEY.fullmatch(key)
  if m is None:
    return None
  if m["input"]:
    return ("input", m["leaf"])
  if m["output"]:
    return ("output_conv", m["leaf"])
  conv = "id_path" if m["id"] else f"res_path_conv_{m['n']}"
  return (f"group_{m['g']}_block_{m['k']}", conv, m["leaf"])


def _official_key(path: Path) -> str | None:
  """Our path -> official key (inverse of `_flax_path`); None if the path is not one of ours."""
  if path in (("input", "w"), ("input", "b")):
    return f"blocks.input.{path[1]}"
  if path in (("output_conv", "w"), ("output_conv", "b")):
    return f"blocks.output.conv.{path[1]}"
  if len(path) != 3 or path[2] not in ("w", "b"):
    return None
  block, conv = _FLAX_BLOCK.fullmatch(path[0]), _FLAX_CONV.fullmatch(path[1])
  if block is None or conv is None:
    return None
  sub = "id_path" if conv["n"] is None else f"res_path.conv_{conv['n']}"
  return f"blocks.group_{block['g']}.block_{block['k']}.{sub}.{path[2]}"


def _key_order(key: str) -> tuple[int, ...]:
  """Sorts official keys the way `state_dict()` lists them: input, groups, blocks, convs, output."""
  m = _OFFICIAL_KEY.fullmatch(key)
  leaf = 0 if m["leaf"] == "w" else 1
  if m["input"]:
    return (0, 0, 0, 0, leaf)
  if m["output"]:
    return (2, 0, 0, 0, leaf)
  return (1, int(m["g"]), int(m["k"]), 0 if m["id"] else int(m["n"]), leaf)


def _map_keys(keys: Iterable[str], part: str) -> dict[str, Path]:
  """Official key -> our path for every key; unknown keys are one error listing all of them."""
  if part not in PARTS:
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
  paths, unknown = {}, []
  for key in keys:
    path = _flax_path(key) if isinstance(key, str) else None
    if path is None:
      unknown.append(key)
    else:
      paths[key] = path
  if unknown:
    raise ValueError(
        f"unknown keys in the {part} state dict: {sorted(map(str, unknown))}; expected only "
        "blocks.input.{w,b}, blocks.group_G.block_K.{id_path,res_path.conv_N}.{w,b} and "
        "blocks.output.conv.{w,b} (OpenAI's dall_e Encoder/Decoder state_dict keys)")
  return paths


def _to_flax_layout(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Official shape -> ours: w (n_out, n_in, kh, kw) -> (kh, kw, n_in, n_out); b unchanged."""
  if path[-1] == "w":
    if len(shape) != 4:
      raise ValueError(f"{_official_key(path)}: a conv weight must be 4-d, got shape {shape}")
    return (shape[2], shape[3], shape[1], shape[0])
  return shape


def _to_numpy(value: Any) -> np.ndarray:
  """torch tensor (duck-typed: no torch import), NumPy or JAX array -> float32 NumPy array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    # torch bfloat16 has no NumPy dtype; float32 is what we keep anyway.
    value = value.float().numpy()
  return np.asarray(value, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# The config, read off the tensor shapes and checked against our modules.
# ------------------------------------------------------------------------------------------------

def _part_fields(shapes: Mapping[Path, tuple[int, ...]], part: str) -> dict[str, int]:
  """Our-layout shapes of one part -> the DVAEConfig fields that part determines."""
  missing = [_official_key(p) for p in (("input", "w"), ("output_conv", "w")) if p not in shapes]
  if missing:
    raise ValueError(f"missing keys in the {part} state dict: {missing}")
  blocks = [_FLAX_BLOCK.fullmatch(path[0]) for path in shapes if len(path) == 3]
  fields = {"group_count": max((int(b["g"]) for b in blocks), default=0),
            "n_blk_per_group": max((int(b["k"]) for b in blocks), default=0)}
  w_in, w_out = shapes[("input", "w")], shapes[("output_conv", "w")]  # (kh, kw, n_in, n_out)
  if part == "encoder":
    fields.update(n_hid=w_in[3], vocab_size=w_out[3])
  else:
    fields.update(n_init=w_in[3], vocab_size=w_in[2], n_hid=w_out[2])
  return fields


@functools.lru_cache(maxsize=8)
def _model_shapes(part: str, config: dvae.DVAEConfig) -> dict[Path, tuple[int, ...]]:
  """Every parameter path of our Encoder or Decoder for `config` -> its shape (abstract, free)."""
  side = config.downsampling  # parameter shapes do not depend on the image size
  if part == "encoder":
    module, x = dvae.Encoder(config), jnp.zeros((1, side, side, 3), jnp.float32)
  else:
    module, x = dvae.Decoder(config), jnp.zeros((1, 1, 1), jnp.int32)
  tree = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _checked_part_config(shapes: Mapping[Path, tuple[int, ...]], part: str) -> dict[str, int]:
  """Infers one part's fields and requires the tensors to be exactly that model's parameters."""
  fields = _part_fields(shapes, part)
  try:
    config = dvae.DVAEConfig(resolution=2 ** max(fields["group_count"] - 1, 0), **fields)
  except ValueError as e:
    raise ValueError(f"the {part} tensors do not describe a dVAE we can build: {e}") from None
  expected = _model_shapes(part, config)
  missing = sorted(_official_key(p) for p in expected.keys() - shapes.keys())
  unexpected = sorted(_official_key(p) for p in shapes.keys() - expected.keys())
  wrong = sorted(f"{_official_key(p)}: {shapes[p]} (ours) != {expected[p]} expected"
                 for p in expected.keys() & shapes.keys() if shapes[p] != expected[p])
  if missing or unexpected or wrong:
    raise ValueError(
        f"the {part} state dict is not an OpenAI dVAE {part} with inferred config {fields}: "
        f"missing keys {missing}, unexpected keys {unexpected}, wrong shapes {wrong}")
  return fields


def _official_shapes(state_dict: Mapping[str, Any], paths: Mapping[str, Path]
                     ) -> dict[Path, tuple[int, ...]]:
  """Official state dict -> our path -> our-layout shape, reading only `.shape`."""
  return {path: _to_flax_layout(path, tuple(state_dict[key].shape)) for key, path in paths.items()}


def dvae_config_from_state_dict(encoder_sd: Mapping[str, Any], decoder_sd: Mapping[str, Any],
                                resolution: int = 256) -> dvae.DVAEConfig:
  """The DVAEConfig that official encoder and decoder state dicts describe (shapes only).

  Args:
    encoder_sd, decoder_sd: official key -> array-like with `.shape` (torch, NumPy, meta tensors).
    resolution: image side; the tensors do not fix it (the nets are fully convolutional).

  Returns:
    DVAEConfig with group_count, n_hid, n_blk_per_group, n_init and vocab_size read off the tensors.
  """
  enc, dec = (
      _checked_part_config(_official_shapes(sd, _map_keys(sd.keys(), part)), part)
      for sd, part in ((encoder_sd, "encoder"), (decoder_sd, "decoder")))
  conflicts = {k: (enc[k], dec[k]) for k in enc if enc[k] != dec[k]}
  if conflicts:
    raise ValueError(f"encoder and decoder disagree on {conflicts} (encoder, decoder); "
                     "one DVAEConfig describes both")
  return dvae.DVAEConfig(resolution=resolution, **enc, n_init=dec["n_init"])


def openai_dvae_to_flax(state_dict: Mapping[str, Any], part: str) -> dict:
  """Official `dall_e` Encoder/Decoder state dict -> our parameter tree for that part.

  Args:
    state_dict: official key (`blocks.group_1.block_1.res_path.conv_1.w`) -> torch tensor or array;
      weights (n_out, n_in, k, k), biases (n_out,).
    part: "encoder" or "decoder".

  Returns:
    Nested dict (`params["encoder"]` or `params["decoder"]` of `dvae.init`) of float32 NumPy
    arrays: w (k, k, n_in, n_out), b (n_out,).

  Raises:
    ValueError: listing unknown keys, missing keys or wrong shapes.
  """
  paths = _map_keys(state_dict.keys(), part)
  _checked_part_config(_official_shapes(state_dict, paths), part)
  tree: dict = {}
  for key, path in paths.items():
    value = _to_numpy(state_dict[key])
    if path[-1] == "w":
      value = value.transpose(2, 3, 1, 0)
    node = tree
    for name in path[:-2]:
      node = node.setdefault(name, {})
    # A copy: torch's `.numpy()` shares memory with the module, which may change later.
    node.setdefault(path[-2], {})[path[-1]] = np.array(value, dtype=np.float32, order="C")
  return tree


def flax_to_openai_state_dict(params: Mapping[str, Any], part: str) -> dict[str, np.ndarray]:
  """Our parameters -> official state dict (the inverse of `openai_dvae_to_flax`), for export.

  Args:
    params: `{"encoder": ..., "decoder": ...}` as `dvae.init` returns, or one part's tree.
    part: "encoder" or "decoder".

  Returns:
    Official key -> float32 NumPy array (w (n_out, n_in, k, k), b (n_out,)), in `state_dict()`
    order; `torch.from_numpy` each value for `module.load_state_dict`.
  """
  if part not in PARTS:
    raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
  if part in params:
    params = params[part]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  leaves = {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}
  unknown = sorted("/".join(p) for p in leaves if _official_key(p) is None)
  if unknown:
    raise ValueError(f"parameters with no official name in the {part}: {unknown}")
  shapes = {path: tuple(np.shape(leaf)) for path, leaf in leaves.items()}
  _checked_part_config(shapes, part)
  out = {}
  for path, leaf in leaves.items():
    value = np.asarray(leaf, dtype=np.float32)
    out[_official_key(path)] = value.transpose(3, 2, 0, 1) if path[-1] == "w" else value
  return {key: np.ascontiguousarray(out[key]) for key in sorted(out, key=_key_order)}


def load_openai_state_dict(path: str | os.PathLike, part: str | None = None
                           ) -> dict[str, np.ndarray]:
  """Reads a pickled `dall_e` module (or its state dict) with the restricted unpickler.

  Args:
    path: `encoder.pkl` / `decoder.pkl` as OpenAI released them (zip or legacy torch format), or
      a `torch.save(module.state_dict())` file.
    part: when given, a pickled module must be that part's class (catches swapped paths).

  Returns:
    Official key -> float32 NumPy array (w (n_out, n_in, k, k), b (n_out,)).

  Raises:
    UnsafePickleError: the file references a global outside the allow-list.
    ImportError: torch is not installed.
  """
  root = safe_pickle.load_torch_file(path)
  if isinstance(root, safe_pickle.PickledModule):
    if part is not None and root.pickled_name != OFFICIAL_ROOTS[part]:
      raise ValueError(f"{path} holds a {root.pickled_name}, but the {part} must be a "
                       f"{OFFICIAL_ROOTS[part]} (are the encoder and decoder paths swapped?)")
    tensors = safe_pickle.module_state_dict(root)
  elif isinstance(root, Mapping) and all(hasattr(v, "shape") for v in root.values()):
    tensors = dict(root)
  else:
    raise ValueError(f"{path} holds a {type(root).__name__}, not a dall_e module or state dict")
  return {key: _to_numpy(value) for key, value in tensors.items()}


def load_openai_dvae(encoder_path: str | os.PathLike, decoder_path: str | os.PathLike,
                     resolution: int = 256) -> tuple[dvae.DVAEConfig, dict]:
  """OpenAI's released `encoder.pkl` and `decoder.pkl` -> (config, params) for `dalle_jax.dvae.model`.

  Args:
    encoder_path, decoder_path: the released files (https://cdn.openai.com/dall-e/encoder.pkl).
    resolution: image side the config is for (256 in the paper).

  Returns:
    DVAEConfig read off the tensors, and `{"encoder": ..., "decoder": ...}` of float32 NumPy
    arrays, ready for `dvae.encode(config, params, images)`.
  """
  encoder_sd = load_openai_state_dict(encoder_path, "encoder")
  decoder_sd = load_openai_state_dict(decoder_path, "decoder")
  config = dvae_config_from_state_dict(encoder_sd, decoder_sd, resolution)
  params = {"encoder": openai_dvae_to_flax(encoder_sd, "encoder"),
            "decoder": openai_dvae_to_flax(decoder_sd, "decoder")}
  return config, params
