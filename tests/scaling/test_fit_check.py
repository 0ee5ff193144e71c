"""dalle_jax.scaling.fit_check: the launches' steps compiled for a TPU slice on this CPU host (libtpu from
the `tpu` extra, which `make setup` installs), and the refusal a launch prints."""

import os
import subprocess
import sys

import pytest

from dalle_jax import sharding
from dalle_jax.rerank import model as rerank, training as rerank_training
from dalle_jax.scaling import fit_check
from dalle_jax.transformer import model as transformer
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.training import TransformerTrainConfig

from conftest import REPO
from experiments.configs import reranker_tiny, transformer_tiny


def test_tiny_train_step_compiles_for_v5e_with_splash_kernels():
  config = transformer_tiny.get_config()
  model = TransformerConfig(**{**config.model, "attention": "block_sparse", "dtype": "bfloat16"})
  train = TransformerTrainConfig(**config.train)
  report = fit_check.transformer_train(model, train, dict(data=-1, fsdp=2, tensor=2),
                                       fit_check.Target.parse("v5e:2x2"))
  assert report.target.chips == 4 and report.mesh == {"data": 1, "fsdp": 2, "tensor": 2}
  # The block-sparse layers run as Pallas splash kernels in the TPU program (forward, dq, dkv),
  # although this host's own backend is the CPU.
  assert {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals",
          "splash_mha_dkv_no_residuals"} <= set(report.kernels)
  # Parameters, both Adam moments and the EMA, float32, split 4 ways (the small ones whole).
  count = transformer.count_params(model)
  assert 4 * 4 * count / 4 <= report.state_bytes <= 4 * 4 * count
  assert report.argument_bytes >= report.state_bytes
  assert report.temp_bytes > 0 and report.code_bytes > 0 and report.flops > 0
  assert report.fits and report.total_bytes < fit_check.CHIPS["v5e"].hbm_bytes
  assert report.items_per_call == train.batch_size * model.seq_len
  # The model's own count of matmul FLOPs, per chip; XLA's count (no scan here) adds the
  # elementwise work, the layer norms and the optimiser on top.
  assert report.model_flops == fit_check.transformer_flops(model, train.batch_size) / 4
  assert report.model_flops <= report.flops <= 1.5 * report.model_flops
  expected_s = report.model_flops / fit_check.CHIPS["v5e"].peak_flops
  assert report.items_per_s_bound == pytest.approx(report.items_per_call / expected_s)
  text = report.describe()
  assert "fits" in text and "splash_mha_fwd_residuals" in text and "upper bound" in text


def test_the_reranker_step_compiles_placed_as_its_config_says():
  config = reranker_tiny.get_config()
  model = rerank.RerankerConfig(**config.model)
  train = rerank_training.RerankerTrainConfig(**config.train)
  check = lambda placement: fit_check.reranker_train(
      model, train, dict(data=1, fsdp=4, tensor=1), fit_check.Target.parse("v5e:2x2"), placement)
  split = check(sharding.StateSharding(min_size=0))
  whole = check(sharding.StateSharding(mode="replicated"))
  assert whole.state_bytes > 2 * split.state_bytes  # most arrays split 4 ways


def test_launch_refuses_a_step_that_does_not_fit(tmp_path):
  """2.1B parameters with Adam and EMA on one 16 GiB chip (the tiny config, MLP 8192 wide)."""
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train_transformer.py"),
       f"--config={REPO}/experiments/configs/transformer_tiny.py", f"--workdir={workdir}",
       "--config.model.width=8192", "--fit_check=v5e:2x2", "--fit_check_only"],
      capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  message = result.stderr[result.stderr.index("FitError"):]
  assert "does not fit on v5e:2x2 (mesh data 4 x fsdp 1 x tensor 1)" in message
  assert "exceeds available HBM" in message  # the TPU compiler's own words
  state_gib = 16 * transformer.count_params(TransformerConfig(
      **{**transformer_tiny.get_config().model, "width": 8192})) / 2 ** 30
  assert f"stored state {state_gib:.1f} GiB a chip" in message
  for change in ("--config.mesh.fsdp (now 1)", "--config.model.remat=True",
                 "--config.train.grad_accum_steps", "a larger slice"):
    assert change in message
  assert not os.path.exists(workdir)  # refused before anything ran


def test_bad_target_is_refused_with_the_format():
  for spec in ("v5e", "v9:2x2", "v5p:4x4x", "v5e:0x2"):
    with pytest.raises(ValueError, match="expected <chip>:<topology>"):
      fit_check.Target.parse(spec)
  assert fit_check.Target.parse("v5p:4x4x4").chips == 64


def test_report_bounds_and_refusal_from_the_figures():
  """The arithmetic on a compiled program's figures: no compile here."""
  chip = fit_check.CHIPS["v5p"]
  report = fit_check.FitReport(
      what="sampler", target=fit_check.Target.parse("v5p:2x2x2"), mesh={"data": 1, "fsdp": 8,
                                                                         "tensor": 1},
      argument_bytes=60 * fit_check.GIB, state_bytes=59 * fit_check.GIB, output_bytes=0,
      temp_bytes=40 * fit_check.GIB, code_bytes=fit_check.GIB, flops=1e12, items_per_call=8,
      item_name="image tokens", compile_s=1.0, bound_bytes=59 * fit_check.GIB,
      hints=("raise --fsdp", "a larger slice"), model_flops=2e12, state_name="parameters")
  assert report.total_bytes == 101 * fit_check.GIB and not report.fits
  # Reading 59 GiB at 2.765 TB/s takes longer than 2 TFLOP at 459 TFLOP/s: HBM-bound.
  assert report.call_s_bound == pytest.approx(59 * fit_check.GIB / chip.hbm_bandwidth)
  assert report.items_per_s_bound == pytest.approx(8 / report.call_s_bound)
  assert "upper bound at HBM bandwidth" in report.describe()
  assert "DOES NOT FIT" in report.describe()
  with pytest.raises(fit_check.FitError, match=r"sampler needs 101.0 GiB per chip on v5p:2x2x2, "
                     r"more than its 95 GiB of HBM \(parameters 59.0 GiB, temporaries 40.0 "
                     r"GiB\). Change one of: raise --fsdp; a larger slice"):
    report.refuse_if_too_big()
