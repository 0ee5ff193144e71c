"""experiments/demo.py's per-dataset plans: configs that fit each other and give the stages'
lengths, an emoji tokenizer that holds every name, captions from the right splits, summaries that
read eval_zero_shot.py's keys, and a work directory that refuses another dataset's stages. (The demo end to end takes minutes:
`python experiments/demo.py --dataset=emoji --steps_scale=0.02` is its smoke run.)"""

import importlib.util
import os

from absl import app
import numpy as np
import pytest

from dalle_jax import tokenizer as tokenizer_lib
from dalle_jax.data import emoji, shapes
from dalle_jax.dvae import model as dvae
from dalle_jax.evaluation import judge, zero_shot
from dalle_jax.rerank import model as rerank
from dalle_jax.transformer import caption_contrast
from dalle_jax.transformer.model import TransformerConfig
from conftest import REPO

EXPERIMENTS = os.path.join(REPO,
                           "experiments")
HAVE_EMOJI = all(map(os.path.isfile, (emoji.DEFAULT_TEST_PATH, emoji.DEFAULT_FONT_PATH)))
needs_emoji = pytest.mark.skipif(not HAVE_EMOJI, reason=f"emoji data: {emoji.INSTALL_HINT}")


def _load(path: str):
  """A Python file as a module; demo.py defines no flags on import."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


demo = _load("demo.py")


def _flag(flags: list[str], name: str) -> str:
  return next(f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}="))


@pytest.mark.parametrize("dataset", ["shapes", "emoji"])
def test_plan_configs_fit_each_other(dataset, tmp_path):
  plan = demo.PLANS[dataset]
  flags = plan.tokenizer_flags(str(tmp_path))
  text = int(_flag(flags, "vocab_size")), int(_flag(flags, "text_len"))
  dvae_config, transformer_config = (plan.configs[s].get_config() for s in ("dvae", "transformer"))
  model = dvae.DVAEConfig(**dvae_config.model)
  transformer = TransformerConfig(**transformer_config.model)
  assert (transformer.text_vocab_size, transformer.text_len) == text
  assert (transformer.image_vocab_size, transformer.image_size) == (model.vocab_size,
                                                                    model.code_resolution)
  assert dvae_config.data.dataset == dataset
  # The held-out split is only ever evaluation data.
  assert dvae_config.data.split == "train"
  assert set(plan.encode_counts) == {"train", "heldout"}
  # Reranked either by a trained reranker or by near misses: exactly one.
  if plan.near_misses is None:
    assert set(plan.configs) == {"dvae", "reranker", "transformer"}
    reranker_config = plan.configs["reranker"].get_config()
    reranker = rerank.RerankerConfig(**reranker_config.model)
    assert (reranker.text_vocab_size, reranker.text_len) == text
    assert reranker_config.data.dataset == dataset and reranker_config.data.split == "train"
  else:
    assert set(plan.configs) == {"dvae", "transformer"}
    assert plan.near_misses in caption_contrast.NEAR_MISSES
  # Guidance mixes in the empty caption's logits: only a model trained on empty captions has them.
  assert plan.guidance == 1.0 or transformer_config.train.caption_dropout > 0


# The demo's stage lengths at --steps_scale=1: its configs' num_steps.
DEMO_STEPS = {"shapes": {"dvae": 2_500, "transformer": 4_000},
              "emoji": {"dvae": 3_000, "reranker": 600, "transformer": 2_000}}


@pytest.mark.parametrize("dataset", sorted(DEMO_STEPS))
def test_stage_lengths_are_the_configs_num_steps_times_the_scale(dataset):
  plan = demo.PLANS[dataset]
  num_steps = {stage: config.get_config().train.num_steps for stage, config in plan.configs.items()}
  assert num_steps == DEMO_STEPS[dataset]
  assert demo.stage_steps(plan, dict.fromkeys(num_steps, 1.0)) == num_steps
  scaled = demo.stage_steps(plan, {"dvae": 7.0, "reranker": 4.0, "transformer": 1e-9})
  assert scaled == {"dvae": 7 * num_steps["dvae"], "transformer": 1,
                    **({"reranker": 4 * num_steps["reranker"]} if "reranker" in num_steps else {})}


def test_shapes_captions_hold_out_first():
  captions, heldout = demo.PLANS["shapes"].captions()
  assert heldout == sorted(heldout, reverse=True) and any(heldout) and not all(heldout)
  for caption, held in zip(captions, heldout):
    assert shapes.scene_split(shapes.parse_caption(caption)) == ("heldout" if held else "train")
  # One caption for each held-out colour-shape pair.
  pairs = {shapes.parse_caption(c).objects[0][1:] for c, held in zip(captions, heldout) if held}
  assert len(pairs) == sum(heldout) == len(shapes.HELDOUT_PAIRS)


@needs_emoji
def test_emoji_captions_are_heldout_tones_then_trained_ones():
  captions, heldout = demo.PLANS["emoji"].captions()
  entries = {e.name: e for e in emoji.load_emoji_entries()}
  assert heldout == [True] * 5 + [False] * 3
  chosen = [entries[c] for c in captions]
  assert [e.heldout for e in chosen] == heldout
  assert all(e.variant in emoji.SKIN_TONES for e in chosen)
  assert len({e.family for e in chosen[:5]}) == 5
  # Each trained caption is another tone of a held-out caption's family, to compare with.
  assert [e.family for e in chosen[5:]] == [e.family for e in chosen[:3]]
  assert all(a.variant != b.variant for a, b in zip(chosen[:3], chosen[5:]))


@needs_emoji
def test_emoji_tokenizer_reads_training_names_and_holds_every_name(tmp_path):
  flags = demo.PLANS["emoji"].tokenizer_flags(str(tmp_path))
  with open(_flag(flags, "captions_file"), encoding="utf-8") as f:
    names = f.read().splitlines()
  entries = emoji.load_emoji_entries()
  assert names == [e.name for e in entries if not e.heldout]
  tokenizer = tokenizer_lib.train_tokenizer(names, int(_flag(flags, "vocab_size")),
                                            int(_flag(flags, "text_len")))
  # Held-out names too: the zero-shot captions must reach the model whole.
  _, truncated = tokenizer.encode_batch([e.name for e in entries])
  assert truncated == 0
  rng = np.random.default_rng(0)
  longest = max(entries, key=lambda e: len(tokenizer.pieces(e.name))).name
  assert not any(tokenizer.encode(longest, training=True, rng=rng)[1] for _ in range(50))


def test_shapes_summary_reads_what_eval_zero_shot_writes():
  results = {}
  for split, unreranked in (("heldout", 0.25), ("train", 0.5)):
    scenes = zero_shot.shapes_scenes(split, 2, seed=0)
    # True renders as the "samples", and a perfect dVAE.
    truths = np.stack([shapes.render_scene(s, 32) for s in scenes])[:, None]
    results[split], _ = zero_shot.judge_shapes_split(scenes, truths, 0, 1, lambda x: x)
    results[split]["without_reranking"] = {"accuracy": unreranked}
  results.update(heldout_accuracy=results["heldout"]["accuracy"],
                 train_accuracy=results["train"]["accuracy"],
                 chance_accuracy=results["heldout"]["chance"]["accuracy"])
  summary = demo.PLANS["shapes"].zero_shot_summary(results)
  assert summary["heldout_accuracy"] == summary["train_accuracy"] == 1.0
  assert summary["dvae_ceiling"] == 1.0 and summary["images_per_split"] == 2
  assert summary["heldout_accuracy_without_reranking"] == 0.25
  assert summary["train_accuracy_without_reranking"] == 0.5
  assert set(summary["heldout_attributes"]) == set(judge.ATTRIBUTES)


@needs_emoji
def test_emoji_summary_reads_what_eval_zero_shot_writes():
  entries = emoji.load_emoji_entries()
  families = emoji.group_by_family(entries)
  chosen = zero_shot.emoji_prompts(entries, 3, seed=0)
  results = {}
  for split, picked in chosen.items():
    # True renders as the "samples", and a perfect dVAE: every variant retrieves itself.
    truths = np.stack([emoji.render_emoji(e.sequence, 32) for e in picked])[:, None]
    results[split], _ = zero_shot.judge_emoji_split(picked, truths, families,
                                                         lambda images: images)
  results.update(heldout_accuracy=results["heldout"]["accuracy"],
                 train_accuracy=results["train"]["accuracy"],
                 chance_accuracy=results["heldout"]["chance"]["accuracy"])
  summary = demo.PLANS["emoji"].zero_shot_summary(results)
  assert summary["heldout_accuracy"] == summary["train_accuracy"] == 1.0
  assert summary["heldout_tone_accuracy"] == summary["dvae_ceiling"] == 1.0
  assert 0 < summary["chance_accuracy"] < 1 and 0 < summary["tone_chance_accuracy"] < 1
  assert summary["images_per_split"] == 3


def test_work_dir_refuses_another_datasets_stages(tmp_path):
  work = str(tmp_path / "work")
  demo.check_dataset(work, "emoji")
  demo.check_dataset(work, "emoji")  # resuming the same dataset is fine
  with pytest.raises(app.UsageError, match="holds the emoji demo"):
    demo.check_dataset(work, "shapes")
