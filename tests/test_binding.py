"""The binding metric (tasks/pretrain.py `binding`) on the synthetic world's real evaluation examples.

A reader that binds (it finds the object by the word beside the masked one, then reads the asked attribute
off that object's pixel token) scores 1; the same reader on the pixel tokens replaced by their mean (what is
in the image kept, which attribute belongs to which object lost) falls to the chance of a guess among the
image's objects, and picks another object's value about as often as chance says, while a "which colours are
present" probe on those same mean tokens stays exact. So the metric measures binding, not presence.
A reader that answers "present, and not named by the text" is exact wherever the text names every other
object, and no better than a guess among the rest on the words `mlm_acc_binding_unnamed` keeps.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data.task_data import TaskData
from pixelbert_jax.tasks import pretrain
from tests import train_helpers as th

NUM_COLOURS = len(world.COLOURS)


def _eval_examples(data_dir):
  config = th.tiny_config(data_dir, variant="demo")
  # every caption template, so that some asked words are answered by elimination and some are not
  config.data.synthetic.update(min_objects=2, max_objects=3, num_val=128, caption_kinds=world.CAPTION_KINDS)
  data = TaskData(config.data, "pretrain")
  examples = data.examples("val", seed=0, train=False)
  rows = [examples(i, i, 0) for i in range(data.num_examples("val"))]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0] if not k.startswith("_")}
  records = [data.split("val").source[i] for i in range(len(rows))]
  return data.tokenizer, batch, records


def _pixel_tokens(record) -> np.ndarray:
  """float [9, 16]: each cell's colour and shape, one-hot (what the demo's warm-started CNN names)."""
  out = np.zeros((world.GRID * world.GRID, 2 * NUM_COLOURS), np.float32)
  for cell, (colour, shape) in enumerate(record["cell_labels"]):
    if colour >= 0:
      out[cell, colour] = out[cell, NUM_COLOURS + shape] = 1
  return out


def _read(tokens: np.ndarray, key: int, value_offset: int) -> int:
  """The attribute (colours at offset 0, shapes at NUM_COLOURS) of the token that best matches `key`."""
  cell = int(np.argmax(tokens[:, key]))
  return value_offset + int(np.argmax(tokens[cell, value_offset : value_offset + NUM_COLOURS]))


def _binding_reader(tokenizer, ids, labels, weight, tokens_of) -> np.ndarray:
  """Predictions [B, L]: for the asked word, the object named by its neighbour ('a red [MASK]': the red
  one; 'a [MASK] star': the star), and that object's asked attribute."""
  vocab = [*world.COLOURS, *world.SHAPES]  # feature index -> word
  index = {int(tokenizer.convert_tokens_to_ids(w)): k for k, w in enumerate(vocab)}
  predictions = np.zeros(ids.shape, np.int64)
  for b, p in zip(*np.nonzero(weight)):
    tokens, asked_colour = tokens_of(b), index[int(labels[b, p])] < NUM_COLOURS
    neighbour = index[int(ids[b, p + 1] if asked_colour else ids[b, p - 1])]  # colour words precede shape words
    read = _read(tokens, neighbour, 0 if asked_colour else NUM_COLOURS)
    predictions[b, p] = tokenizer.convert_tokens_to_ids(vocab[read])
  return predictions


def _eliminating_reader(tokenizer, ids, labels, weight, records) -> np.ndarray:
  """Predictions [B, L]: the first of the image's values of the asked kind that the text does not name
  (presence and elimination, no binding)."""
  predictions = np.zeros(ids.shape, np.int64)
  for b, p in zip(*np.nonzero(weight)):
    colours, shapes = world.scene_words(records[b]["cell_labels"])
    asked = tokenizer.convert_ids_to_tokens(int(labels[b, p]))
    values = [tokenizer.convert_tokens_to_ids(v) for v in (colours if asked in world.COLOURS else shapes)]
    left = [v for v in values if v not in ids[b]]
    predictions[b, p] = left[0]
  return predictions


def _rate(metrics, name) -> float:
  total, count = metrics[name]
  return float(total / count)


def test_binding_falls_to_chance_without_which_object_while_presence_stays(data_dir):
  tokenizer, batch, records = _eval_examples(data_dir)
  mask_id = tokenizer.mask_token_id
  probe, labels, weight = pretrain.grounded_probe(batch, mask_id)
  ids, labels, weight = (np.asarray(x) for x in (probe["input_ids"], labels, weight))
  tokens = [_pixel_tokens(r) for r in records]
  mean_tokens = [np.broadcast_to(t[t.any(-1)].mean(0), t.shape) for t in tokens]  # the sabotage

  bound, pooled = (
      pretrain.binding(
          jnp.asarray(labels),
          jnp.asarray(_binding_reader(tokenizer, ids, labels, weight, lambda b: per_image[b])),
          jnp.asarray(weight),
          batch["image_colours"],
          batch["image_shapes"],
          jnp.asarray(ids),
      )
      for per_image in (tokens, mean_tokens)
  )
  words = float(bound["mlm_acc_binding"][1])
  assert words >= 20, words  # matched captions of 2-3 object scenes: every asked word needs binding
  assert words == float(jnp.sum(weight))
  chance = _rate(bound, "mlm_binding_other_chance")
  assert 0.5 <= chance <= 2 / 3  # 2 or 3 objects: (n-1)/n
  assert _rate(bound, "mlm_acc_binding") == 1.0 and _rate(bound, "mlm_binding_other_rate") == 0.0
  # Without which-object, the reader is right for 1 object in n: 1 - chance, give or take the sample
  # (a binomial over `words` words: 3 standard deviations)
  slack = 3 * np.sqrt(chance * (1 - chance) / words)
  assert _rate(pooled, "mlm_acc_binding") == pytest.approx(1 - chance, abs=slack)
  assert _rate(pooled, "mlm_binding_other_rate") == pytest.approx(chance, abs=slack)

  # which colours are present, read off the same mean tokens: exact
  colour_ids = np.asarray([tokenizer.convert_tokens_to_ids(c) for c in world.COLOURS])
  for b, t in enumerate(mean_tokens):
    present = set(colour_ids[t[0, :NUM_COLOURS] > 0].tolist())
    assert present == set(np.asarray(batch["image_colours"][b])[np.asarray(batch["image_colours"][b]) >= 0].tolist())

  # presence and elimination: right wherever the text names every other object, a guess elsewhere
  args = (jnp.asarray(weight), batch["image_colours"], batch["image_shapes"], jnp.asarray(ids))
  eliminated = pretrain.binding(
      jnp.asarray(labels), jnp.asarray(_eliminating_reader(tokenizer, ids, labels, weight, records)), *args
  )
  unnamed_words = float(eliminated["mlm_acc_binding_unnamed"][1])
  assert 20 <= unnamed_words < words  # "there is" captions; relation captions of 3-object scenes
  assert _rate(bound, "mlm_acc_binding_unnamed") == 1.0
  named_right = float(eliminated["mlm_acc_binding"][0] - eliminated["mlm_acc_binding_unnamed"][0])
  assert named_right == words - unnamed_words  # every word the text leaves to elimination
  # on the rest it guesses among 2-3 unnamed values, right at most half the time (3 sd over the sample)
  assert _rate(eliminated, "mlm_acc_binding_unnamed") <= 0.5 + 3 * np.sqrt(0.25 / unnamed_words)


def test_binding_counts_only_words_with_another_object():
  """A one-object image has no other object to confuse: its words are not binding words."""
  labels = jnp.asarray([[0, 10, 0], [0, 20, 0]])  # colour 10 asked in image 0, shape 20 in image 1
  weight = jnp.asarray([[0, 1, 0], [0, 1, 0]], jnp.float32)
  colours = jnp.asarray([[10, 11, -1], [12, -1, -1]])
  shapes = jnp.asarray([[20, 21, -1], [20, -1, -1]])
  ids = jnp.asarray([[1, 2, 3], [1, 2, 3]])  # names no value
  m = pretrain.binding(labels, jnp.asarray([[0, 11, 0], [0, 20, 0]]), weight, colours, shapes, ids)
  assert [float(x) for x in m["mlm_acc_binding"]] == [0.0, 1.0]
  assert [float(x) for x in m["mlm_acc_binding_unnamed"]] == [0.0, 1.0]
  assert [float(x) for x in m["mlm_binding_other_rate"]] == [1.0, 1.0]
  assert [float(x) for x in m["mlm_binding_other_chance"]] == [0.5, 1.0]


def test_binding_unnamed_leaves_out_words_the_text_answers_by_elimination():
  """Colour 10 asked in an image of colours 10, 11, 12: it needs binding while the text leaves 11 or 12
  unnamed, and not once it names both."""
  labels, weight = jnp.asarray([[10, 0], [10, 0]]), jnp.asarray([[1, 0], [1, 0]], jnp.float32)
  colours, shapes = jnp.asarray([[10, 11, 12], [10, 11, 12]]), jnp.asarray([[20, 21, 22], [20, 21, 22]])
  ids = jnp.asarray([[11, 5], [11, 12]])  # image 0's text names 11; image 1's names 11 and 12
  m = pretrain.binding(labels, jnp.asarray([[10, 0], [10, 0]]), weight, colours, shapes, ids)
  assert [float(x) for x in m["mlm_acc_binding"]] == [2.0, 2.0]
  assert [float(x) for x in m["mlm_acc_binding_unnamed"]] == [1.0, 1.0]
