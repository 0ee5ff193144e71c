"""The dVAE part of `bench_accelerator.py`: our encode and decode against OpenAI's PyTorch
modules (`dall_e`) on the same device with the same weights, float32 and bfloat16."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from dalle_jax.dvae import model as dvae, openai_weights
import accelerator_parts  # experiments/: this script's folder is on sys.path
import bench_util
from accelerator_parts import Budget, Sizes, time_calls


@dataclasses.dataclass
class _Peer:
  """OpenAI's modules on a device, and our parameters converted from theirs."""
  torch: Any
  dall_e: Any
  encoder: Any
  decoder: Any
  params: dict
  device: Any

  def sync(self, _=None) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()


def _torch_peer(config: dvae.DVAEConfig) -> tuple[_Peer | None, str | None]:
  """OpenAI's Encoder and Decoder with random weights on JAX's device; or None and why not."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import dall_e  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"OpenAI's dall_e (PyTorch) not importable: {e}"
  backend = jax.default_backend()
  if backend == "gpu" and torch.cuda.is_available():
    device = torch.device("cuda")
  elif backend == "cpu":
    device = torch.device("cpu")
  else:
    return None, f"PyTorch not available on {backend}"
  torch.manual_seed(0)
  torch.backends.cudnn.benchmark = True  # what a PyTorch user sets for fixed shapes
  if device.type == "cpu":
    torch.set_num_threads(1)  # a smoke check on CPU: torch's threads stall behind XLA's
  fields = dict(n_hid=config.n_hid, n_blk_per_group=config.n_blk_per_group,
                vocab_size=config.vocab_size, use_mixed_precision=False)
  enc = dall_e.Encoder(**fields).eval()
  dec = dall_e.Decoder(n_init=config.n_init, **fields).eval()
  params = {part: openai_weights.openai_dvae_to_flax(m.state_dict(), part)
            for part, m in (("encoder", enc), ("decoder", dec))}
  return _Peer(torch, dall_e, enc.to(device), dec.to(device), jax.device_put(params), device), None


def _torch_steps(peer: _Peer, vocab: int, images: np.ndarray, codes: np.ndarray,
                 bf16: bool) -> dict:
  """Their encode (uint8 pixels on the device -> argmax codes) and decode (codes -> their one-hot
  input -> uint8 pixels), as `dvae.encode` and `dvae.decode` compute them."""
  torch, dall_e = peer.torch, peer.dall_e
  x = torch.from_numpy(images).to(peer.device)
  z = torch.from_numpy(codes.astype(np.int64)).to(peer.device)
  # Their modules cast to float32 between layers; autocast runs each convolution in bf16.
  autocast = lambda: torch.autocast(peer.device.type, dtype=torch.bfloat16, enabled=bf16)

  def encode():
    with torch.inference_mode(), autocast():
      pixels = x.permute(0, 3, 1, 2).float() / 255.0
      return torch.argmax(peer.encoder(dall_e.map_pixels(pixels)), dim=1)

  def decode():
    with torch.inference_mode(), autocast():
      one_hot = torch.nn.functional.one_hot(z, vocab).permute(0, 3, 1, 2).float()
      mu = peer.decoder(one_hot)[:, :3].float()
      pixels = dall_e.unmap_pixels(torch.sigmoid(mu))
      return torch.round(pixels * 255.0).to(torch.uint8).permute(0, 2, 3, 1)

  return {"encode": encode, "decode": decode}


def run(sizes: Sizes, results: dict, section: dict) -> None:
  """Encode and decode images/s, ours against OpenAI's modules, float32 and bfloat16."""
  budget, peak_rate = Budget(sizes.budgets_s["dvae"]), accelerator_parts.peak_flops(results)
  base = dvae.DVAEConfig(**sizes.dvae)
  peer, why_not = _torch_peer(base)
  params = peer.params if peer else dvae.init(base, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (sizes.dvae_batch, base.resolution, base.resolution, 3), np.uint8)
  section.update(batch=sizes.dvae_batch, resolution=base.resolution)
  if peer is None:
    section["torch"] = {"available": False, "reason": why_not}
  else:
    section["torch"] = {"version": peer.torch.__version__, "device": str(peer.device),
                        "cudnn_allow_tf32": bool(peer.torch.backends.cudnn.allow_tf32)}
  section["jax_default_matmul_precision"] = str(getattr(jax.config,
                                                        "jax_default_matmul_precision", None))
  left = 2 * 2 * (2 if peer else 1)
  for dtype in ("float32", "bfloat16"):
    config = dataclasses.replace(base, dtype=dtype)
    x = jax.device_put(images)
    encode = jax.jit(lambda p, x, c=config: dvae.encode(c, p, x)).lower(params, x).compile()
    codes = jax.block_until_ready(encode(params, x))
    decode = jax.jit(lambda p, z, c=config: dvae.decode(c, p, z)).lower(params, codes).compile()
    ours = {"encode": (encode, x), "decode": (decode, codes)}
    torch_steps = _torch_steps(peer, base.vocab_size, images, np.asarray(codes),
                               dtype == "bfloat16") if peer else {}
    for step in ("encode", "decode"):
      fn, arg = ours[step]
      entry = section[f"{step}_{dtype}"] = {}
      flops = bench_util.xla_flops(fn)
      timed = time_calls(lambda: fn(params, arg), jax.block_until_ready, sizes,
                         budget.share(left))
      left -= 1
      entry["jax"] = dict(timed, images_per_s=sizes.dvae_batch / timed["median_s"])
      if flops:
        entry.update(xla_flops=flops, bound_s=flops / peak_rate)
      if not peer:
        entry["torch"] = section["torch"]
        continue
      timed = time_calls(torch_steps[step], peer.sync, sizes, budget.share(left))
      left -= 1
      entry["torch"] = dict(timed, images_per_s=sizes.dvae_batch / timed["median_s"])
      entry["speedup_over_torch"] = entry["torch"]["median_s"] / entry["jax"]["median_s"]
      if step == "encode":
        theirs = torch_steps["encode"]().cpu().numpy()
        entry["codes_agree"] = float(np.mean(np.asarray(codes) == theirs))
  if peer and peer.device.type == "cuda":
    peer.torch.cuda.empty_cache()  # the sample part needs the device's memory
