"""The peer the benchmarks time beside our transformer: Hugging Face transformers' GPT-2
(PyTorch, CPU) at the same geometry, randomly initialised, nothing downloaded.

  geometry = Geometry.of(model_config)          # width, depth, heads, S = T + H*W, vocab = T + V
  train = time_train(geometry, batch=8, steps=20, warmup=2, dtype="bfloat16")
  generate = time_generate(geometry, batch=8, repeats=3, warmup=1, dtype="float32")

The same geometry: GPT-2's blocks (pre-norm, GELU MLP 4x wide, learned positions) with our width,
depth, heads and sequence, one vocabulary of text then image ids and an untied output head (ours
has two heads over the same rows; GPT-2's default ties it to the input table). Where GPT-2
differs, it does more work: its head scores all T + V ids at every position, and its attention is
plain causal (ours applies the row, column and convolutional masks). The train step is the usual
PyTorch loop: forward with the language-model loss, backward, clip the gradient norm, AdamW.
`generate` continues the caption with H*W image tokens through its key/value cache. bfloat16:
the train step under `torch.autocast` (float32 weights and optimiser, as our `dtype` does), and
`generate` on the model cast to bfloat16 (how inference is usually run).

Imported by bench_train.py and bench_sample.py as `import bench_peers`; this module alone imports
torch, and it needs the `[bench]` extra (`pip install -e .[bench]`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import torch
import transformers

import bench_util  # experiments/bench_util.py

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A transformer's shape, as both models take it: text_vocab counts the text ids (pieces and
  pads), image_vocab the image codes."""
  width: int
  depth: int
  heads: int
  text_len: int
  image_len: int
  text_vocab: int
  image_vocab: int
  mlp_ratio: int = 4

  @classmethod
  def of(cls, model: Any) -> Geometry:
    """From a `TransformerConfig`; GPT-2 needs heads x head_dim = width."""
    if model.heads * model.head_dim != model.width:
      raise ValueError(f"GPT-2 needs heads x head_dim = width: {model.heads} x "
                       f"{model.head_dim} != {model.width}")
    return cls(width=model.width, depth=model.depth, heads=model.heads, text_len=model.text_len,
               image_len=model.image_len, text_vocab=model.num_text_tokens,
               image_vocab=model.image_vocab_size, mlp_ratio=model.mlp_ratio)

  @property
  def seq_len(self) -> int:
    return self.text_len + self.image_len


def gpt2(geometry: Geometry) -> transformers.GPT2LMHeadModel:
  """GPT-2 at `geometry`, random weights (seeded), no dropout; ids: text first, then image."""
  g = geometry
  config = transformers.GPT2Config(
      vocab_size=g.text_vocab + g.image_vocab, n_positions=g.seq_len, n_embd=g.width,
      n_layer=g.depth, n_head=g.heads, n_inner=g.mlp_ratio * g.width,
      activation_function="gelu_new",  # tanh GELU, as flax's nn.gelu
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config)
  model.loss_type = "ForCausalLM"  # what it falls back to anyway, with a warning
  return model


def count_params(model: torch.nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def random_tokens(geometry: Geometry, batch: int, length: int, seed: int = 0) -> torch.Tensor:
  """int64[batch, length]: text ids on the first text_len positions, image ids after."""
  rng = torch.Generator().manual_seed(seed)
  first_image = geometry.text_vocab
  text = torch.randint(0, first_image, (batch, min(length, geometry.text_len)), generator=rng)
  image = torch.randint(first_image, first_image + geometry.image_vocab,
                        (batch, max(length - geometry.text_len, 0)), generator=rng)
  return torch.cat([text, image], dim=1)


def _setup_threads() -> int:
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  return threads


def _machine(model: torch.nn.Module) -> dict[str, Any]:
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads(), "params": count_params(model),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels' ISA
          "attention": model.config._attn_implementation}  # pylint: disable=protected-access


def time_train(geometry: Geometry, batch: int, steps: int, warmup: int, dtype: str,
               learning_rate: float = 4.5e-4, betas: tuple[float, float] = (0.9, 0.96),
               weight_decay: float = 4.5e-2, clip_norm: float = 4.0) -> dict[str, Any]:
  """Seconds of each of `steps` AdamW train steps on one random batch[batch, S], after `warmup`
  untimed ones; the median step's tokens/s (batch x S a step) and the other processes' CPU."""
  _setup_threads()
  model = gpt2(geometry).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas,
                                weight_decay=weight_decay)
  tokens = random_tokens(geometry, batch, geometry.seq_len)

  def step() -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  for _ in range(warmup):
    step()
  seconds, before, wall = [], bench_util.cpu_seconds(), time.perf_counter()
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    seconds.append(time.perf_counter() - start)
  load = bench_util.foreign_load(before, time.perf_counter() - wall)
  median = statistics.median(seconds)
  return {"dtype": dtype, "batch": batch, "tokens_per_step": batch * geometry.seq_len,
          "step_s": seconds, "median_step_s": median,
          "tokens_per_s": batch * geometry.seq_len / median, "final_loss": loss,
          "foreign_load_cores": load, **_machine(model)}


def time_generate(geometry: Geometry, batch: int, repeats: int, warmup: int,
                  dtype: str) -> dict[str, Any]:
  """Median seconds of `repeats` `generate` calls (after `warmup`), each continuing a random
  caption[batch, text_len] with image_len sampled tokens through the key/value cache (full
  vocabulary, temperature 1, no top-k); image tokens/s of the median call."""
  _setup_threads()
  model = gpt2(geometry).eval().to(DTYPES[dtype])
  prompt = random_tokens(geometry, batch, geometry.text_len)
  settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=geometry.image_len,
                  min_new_tokens=geometry.image_len, do_sample=True, top_k=0, temperature=1.0,
                  use_cache=True, pad_token_id=0)

  def call() -> None:
    with torch.inference_mode():
      out = model.generate(prompt, **settings)
    assert out.shape == (batch, geometry.seq_len), out.shape

  torch.manual_seed(1)
  for _ in range(warmup):
    call()
  seconds, before, wall = [], bench_util.cpu_seconds(), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - start)
  load = bench_util.foreign_load(before, time.perf_counter() - wall)
  median = statistics.median(seconds)
  return {"dtype": dtype, "batch": batch, "times_s": seconds, "median_s": median,
          "image_tokens_per_s": batch * geometry.image_len / median,
          "foreign_load_cores": load, **_machine(model)}
