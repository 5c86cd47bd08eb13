"""The LoRA lesson (repvideo_jax.demo.lesson), shortened: teaching the bundled demo model orange lowers
its loss on the orange clips while the base weights stay exactly as they were; and the new colour in
the demo domain (renders, captions, detection) without changing the base domain."""

import jax
import numpy as np
import pytest

from repvideo_jax import transformer_weights
from repvideo_jax.demo import demo_model_dir, lesson
from repvideo_jax.demo import domain as D
from repvideo_jax.training import trainer


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_new_colour_leaves_the_base_domain_as_it_was():
  assert len(D.all_specs()) == 90 and all(s.color in D.COLORS for s in D.all_specs())
  assert "orange" not in D.COLORS
  spec = D.Spec("square", "orange", "moving up")
  assert D.caption(spec) == "an orange square moving up on a black background"
  assert D.caption(D.Spec("square", "red", "moving up")).startswith("a red square")
  frames = D.render(spec, num_frames=9, seed=3)
  assert {tuple(c) for c in frames.reshape(-1, 3)} == {(0, 0, 0), (255, 128, 0)}
  palette = {**D.PALETTE, **D.NEW_PALETTE}
  assert D.detect(frames, palette) == {"color": "orange", "shape": "square", "motion": "moving up"}
  assert D.detect(frames)["color"] in ("red", "yellow")  # the base palette has no orange
  with pytest.raises(ValueError, match="color must be one of"):
    D.Spec("square", "purple", "moving up")


def test_lesson_recipe_errors():
  with pytest.raises(ValueError, match="never saw"):
    lesson.load_recipe("demo-lora-orange", ["concept.color=red"])
  with pytest.raises(ValueError, match="train.transformer comes from the base model"):
    lesson.load_recipe("demo-lora-orange", ["train.transformer.num_layers=2"])
  with pytest.raises(ValueError, match="unknown section"):
    lesson.load_recipe("demo-lora-orange", ["extra.x=1"])


def test_held_out_combinations_are_not_trained_and_cover_every_motion():
  concept = lesson.ConceptConfig()
  trained, held, prior = concept.specs(D.split_specs()[0])
  assert len(trained) == 12 and len(held) == 6 and len(prior) == 12
  assert not set(trained) & set(held)
  assert {s.motion for s in held} == set(D.MOTIONS) and {s.shape for s in held} == set(D.SHAPES)
  assert {s.shape for s in trained} == set(D.SHAPES) and {s.motion for s in trained} == set(D.MOTIONS)
  assert all(s.color in D.COLORS for s in prior) and set(prior) <= set(D.split_specs()[0])


def test_a_short_lesson_lowers_the_new_colours_loss_and_leaves_the_base_untouched(tmp_path):
  # 12 LoRA steps of batch 4 on 12 orange clips and 12 base clips, no generation (about a minute).
  overrides = [
    "train.run.steps=12",
    "train.run.global_batch=4",
    "train.run.save_every=12",
    "train.run.log_every=4",
    "train.optim.warmup_steps=0",
    "concept.per_spec=1",
    "concept.prior_specs=12",
    "evaluation.seeds=0",
  ]
  report = lesson.lesson(lesson.load_recipe("demo-lora-orange", overrides), tmp_path, progress=False)
  loss = report["loss"]
  # Fixed timesteps and noise: the LoRA fits the new colour's clips better than the base model. (What
  # it keeps of the old prompts is the full lesson's evaluation; 12 steps at the full learning rate
  # without warmup move the base clips' loss too, which the full run's 600 steps bring back down.)
  assert loss["new"]["lora"] < 0.9 * loss["new"]["base"], loss
  assert set(loss) == {"new", "prior"} and np.isfinite(loss["prior"]["lora"])

  # The run's frozen base params are the bundled model's, bit for bit; the LoRA's B factors moved.
  _, state, step = trainer.load_run(tmp_path / "run")
  assert step == 12
  _, bundled = transformer_weights.load(demo_model_dir())
  run_params, base_params = _flat(state["params"]), _flat(bundled)
  assert run_params.keys() == base_params.keys()
  for k in base_params:
    np.testing.assert_array_equal(run_params[k], base_params[k], err_msg=k)
  assert all(np.any(ab["b"] != 0) for ab in state["lora"]["blocks"].values())
  assert (tmp_path / "lora" / "adapter.safetensors").is_file()

  # Run again: every stage is complete, nothing is redone, the same LoRA is evaluated.
  again = lesson.lesson(lesson.load_recipe("demo-lora-orange", overrides), tmp_path, progress=False)
  assert again["loss"] == report["loss"]
  with pytest.raises(ValueError, match="different"):
    lesson.lesson(lesson.load_recipe("demo-lora-orange", [*overrides[1:], "train.run.steps=13"]), tmp_path)
