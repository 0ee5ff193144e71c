"""Reading OpenAI's pickled torch modules without letting the pickle run code.

A pickle can call any importable function. These files need only a few globals, so they are read
with an unpickler whose `find_class` admits an explicit allow-list and raises `UnsafePickleError`
for anything else. Every module class (`dall_e.*`, `torch.nn.modules.*`) becomes an inert
attribute bag, so neither the `dall_e` package nor any torch module code is needed or run. That
also sidesteps the known breakage of these pickles on torch >= 1.11: their `nn.Upsample` objects
lack the `recompute_scale_factor` attribute that newer `Upsample.forward` reads (AttributeError in
`dall_e.load_model(...)(z)`); we never call forward. torch is imported only to read the storages.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import types
import warnings
import zipfile
from typing import Any


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle referenced a global outside the allow-list of OpenAI's dVAE pickles."""


class PickledModule:
  """Inert stand-in for a pickled torch module: unpickling only fills its `__dict__`.

  `_parameters`, `_buffers` and `_modules` are what we read; no torch module code ever runs.
  """
  pickled_name = "torch.nn.Module"
  # torch's legacy loader writes a source patch file when a class's `dump_patches` is true.
  dump_patches = False

  def __repr__(self) -> str:
    return f"<stand-in for {self.pickled_name}>"


_STAND_IN_NAMES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
# One stand-in class per pickled class, so the tree still says what each node was.
_STAND_INS = {
    tuple(name.rsplit(".", 1)): type(name.rsplit(".", 1)[1], (PickledModule,),
                                     {"pickled_name": name, "__module__": __name__})
    for name in _STAND_IN_NAMES
}
# Storage classes the tensors may be saved as; all are read as data and cast to float32.
_STORAGE_NAMES = ("FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage")


def _latin1_bytes(text: str, encoding: str) -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it for bytes; other codecs (zlib, ...) refused."""
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}: only latin1")
  return text.encode("latin1")


def _import_torch() -> types.ModuleType:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading OpenAI's pickled dVAE (encoder.pkl, decoder.pkl) needs PyTorch, "
                      "only to read its tensor storages: pip install torch") from e
  return torch


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) -> the object a pickle may reference by that name; nothing else resolves."""
  torch = _import_torch()
  allowed = dict(_STAND_INS)
  allowed.update({
      ("collections", "OrderedDict"): collections.OrderedDict,
      # Protocol-2 pickles name builtins `__builtin__` (Python 2 spelling).
      ("builtins", "set"): set, ("__builtin__", "set"): set,
      # ... and write bytes as `_codecs.encode(text, "latin1")`.
      ("_codecs", "encode"): _latin1_bytes,
      ("torch", "device"): torch.device,
      ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
      ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
      # torch's own version runs an unrestricted torch.load on the embedded bytes.
      ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
  })
  allowed.update({("torch", name): getattr(torch, name) for name in _STORAGE_NAMES})
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only the allow-listed globals of OpenAI's dVAE pickles.

  Every way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through
  `find_class`; refusing there means no other code can run during unpickling.
  """

  def find_class(self, module: str, name: str) -> Any:
    obj = _allowed_globals().get((module, name))
    if obj is None:
      raise UnsafePickleError(
          f"refused to unpickle {module}.{name}: only OpenAI's dVAE pickles (encoder.pkl, "
          "decoder.pkl, or state dicts of dall_e modules) are accepted, and they reference only "
          "dall_e/torch.nn module classes, OrderedDict, set, torch.device and torch's tensor "
          "rebuild functions; this file may run arbitrary code, so it was not loaded")
    return obj


def _restricted_load(file: Any, **kwargs: Any) -> Any:
  return RestrictedUnpickler(file, **kwargs).load()


# The `pickle_module` handed to torch.load: torch subclasses our Unpickler for the main pickle
# (adding storage handling) and calls our `load` for the legacy format's header pickles.
restricted_pickle = types.ModuleType(
    "dalle_jax.dvae.safe_pickle.restricted_pickle", "pickle restricted to OpenAI's dVAE globals")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def _torch_load_restricted(file: Any) -> Any:
  torch = _import_torch()
  with warnings.catch_warnings():
    # Legacy-format files carry class sources that torch compares with our stand-ins'.
    warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
    warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
    return torch.load(file, map_location="cpu", weights_only=False, mmap=False,
                      pickle_module=restricted_pickle)


def _load_storage_from_bytes(data: bytes) -> Any:
  """`torch.storage._load_from_bytes` with the nested pickle restricted like the outer one."""
  return _torch_load_restricted(io.BytesIO(data))


def module_state_dict(module: PickledModule, prefix: str = "") -> dict[str, Any]:
  """`module.state_dict()` of an unpickled stand-in tree: parameters and persistent buffers."""
  state = vars(module)
  out = {}
  skip = state.get("_non_persistent_buffers_set") or set()
  for kind in ("_parameters", "_buffers"):
    for name, tensor in (state.get(kind) or {}).items():
      if tensor is not None and name not in skip:
        out[prefix + name] = tensor
  for name, child in (state.get("_modules") or {}).items():
    if child is None:
      continue
    if not isinstance(child, PickledModule):
      raise ValueError(f"{prefix + name} is a {type(child).__name__}, not a pickled module")
    out.update(module_state_dict(child, prefix + name + "."))
  return out


def load_torch_file(path: str | os.PathLike) -> Any:
  """`torch.load` of a pickled module or state dict, through the restricted unpickler."""
  with open(path, "rb") as f:
    if zipfile.is_zipfile(f):
      with zipfile.ZipFile(f) as archive:
        # torch.load would hand a TorchScript archive to torch.jit.load, outside our unpickler.
        if any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
          raise ValueError(f"{path} is a TorchScript archive, not a pickled dall_e module")
    f.seek(0)
    return _torch_load_restricted(f)
