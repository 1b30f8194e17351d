"""The synthetic world: deterministic, fast, balanced, and its grounded words are really marked."""

import collections
import time

import numpy as np
import pytest

from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data import text
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.builders import synthetic as builder
from pixelbert_jax.data.preprocess import decode_image

GROUNDED_VOCAB = set(world.COLOURS) | set(world.SHAPES)


def _scenes(split="train", n=300, seed=0, size=192):
  return [world.make_scene(seed, split, i, size) for i in range(n)]


def test_scenes_deterministic_and_seed_dependent():
  assert _scenes(n=20) == _scenes(n=20)
  assert _scenes(n=20) != _scenes(n=20, seed=1)
  a = world.render(0, "val", 3, world.make_scene(0, "val", 3, 192), 192)
  b = world.render(0, "val", 3, world.make_scene(0, "val", 3, 192), 192)
  np.testing.assert_array_equal(a, b)


def test_objects_unique_inside_own_cells_and_balanced():
  colours, shapes = collections.Counter(), collections.Counter()
  for objs in _scenes(n=2000):
    assert 1 <= len(objs) <= 3
    assert len({o.colour for o in objs}) == len(objs) and len({o.shape for o in objs}) == len(objs)
    assert len({o.cell for o in objs}) == len(objs)
    for o in objs:
      row, col = o.cell
      x, y = o.center
      assert col * 64 <= x - o.radius and x + o.radius <= (col + 1) * 64
      assert row * 64 <= y - o.radius and y + o.radius <= (row + 1) * 64
      colours[o.colour] += 1
      shapes[o.shape] += 1
  for counts in (colours, shapes):
    freq = np.array(list(counts.values())) / sum(counts.values())
    assert len(counts) == 8 and freq.max() < 0.145 and freq.min() > 0.105, counts


def test_object_pixels_have_their_colour():
  objs = world.make_scene(0, "train", 5, 192)
  img = decode_image(world.encode_jpeg(world.render(0, "train", 5, objs, 192)), name="scene")
  for o in objs:
    if o.shape in ("ring", "semicircle"):
      continue  # centre pixel is not painted for these
    x, y = (int(v) for v in o.center)
    assert np.abs(img[y, x].astype(int) - world.COLOURS[o.colour]).max() < 40, (o, img[y, x])


def test_grounded_words_are_exactly_the_colour_and_shape_words():
  marked = collections.Counter()
  for i, objs in enumerate(_scenes(n=300)):
    for caption, grounded in world.captions(0, "train", i, objs, 5):
      words = caption.split()
      assert {words[g] for g in grounded} <= GROUNDED_VOCAB
      assert sorted(grounded) == [k for k, w in enumerate(words) if w in GROUNDED_VOCAB]
      assert len(grounded) >= 2
      marked.update(words[g] for g in grounded)
  assert set(marked) == GROUNDED_VOCAB
  # balanced: no grounded word is a good guess from frequency alone
  assert max(marked.values()) / sum(marked.values()) < 0.09


def test_world_text_never_needs_unknown_tokens(tmp_path):
  tok = text.load_tokenizer(text.write_world_vocab(str(tmp_path), world.world_words()))
  sentences = []
  for i, objs in enumerate(_scenes(n=200)):
    sentences += [c for c, _ in world.captions(0, "train", i, objs, 5)]
    for q in world.questions(0, "train", i, objs, 3):
      sentences += [q["question"]] + q["answers"]
    right = world.make_scene(0, "train", world.nlvr2_partner(0, "train", i, 200), 192)
    sentences.append(world.nlvr2_statement(0, "train", i, objs, right)[0])
  for s in sentences:
    ids = tok(s)["input_ids"]
    assert tok.unk_token_id not in ids, s
    assert len(ids) == len(s.split()) + 2, s  # one token per world word


def test_vqa_answers_and_disagreement():
  types, disagreeing = collections.Counter(), 0
  yes_no = collections.Counter()
  for i, objs in enumerate(_scenes(n=500)):
    for q in world.questions(0, "train", i, objs, 3):
      assert len(q["answers"]) == 10
      types[q["question_type"]] += 1
      majority = collections.Counter(q["answers"]).most_common(1)[0]
      assert majority[1] >= 6
      disagreeing += majority[1] < 10
      if q["answer_type"] == "yes/no":
        yes_no[majority[0]] += 1
  assert len(types) == 5
  assert 0.2 < disagreeing / 1500 < 0.4
  assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_nlvr2_labels_balanced_and_true():
  labels = []
  for i in range(400):
    left = world.make_scene(0, "val", i, 192)
    j = world.nlvr2_partner(0, "val", i, 400)
    assert j != i
    right = world.make_scene(0, "val", j, 192)
    sentence, truth = world.nlvr2_statement(0, "val", i, left, right)
    labels.append(truth)
    if sentence.startswith("the left image contains a"):
      colour, shape = sentence.split()[-2:]
      assert truth == any(o.colour == colour and o.shape == shape for o in left)
  assert sum(labels) == 200


@pytest.mark.slow
def test_builder_fast_deterministic_and_reused(tmp_path):
  cfg = builder.synthetic_config("captions", seed=3, image_size=192, num_train=300, num_val=40, num_test=40)
  start = time.time()
  b = builder.prepare(cfg, str(tmp_path))
  took = time.time() - start
  assert took < 10, took  # ~1300 images/s here: a few thousand is well under a minute
  src = layout.open_split(b, "train", dataset="synthetic")[1]
  assert len(src) == 300 and len(b.as_data_source("val")) == 40
  assert len(b.as_data_source(layout.IMAGES_SPLIT)) == 300 + 40 + 40  # each image once
  rec = src[0]
  assert set(rec) == {
      "image",
      "image_index",
      "image_id",
      "captions",
      "grounded_words",
      "cell_labels",
      "height",
      "width",
  }
  index = int(rec["image_id"].decode().rsplit("-", 1)[1])  # records keep version 1.1.0's shuffled order
  assert rec["image_index"] == index  # train's images are the table's first rows, in index order
  np.testing.assert_array_equal(rec["cell_labels"], world.cell_labels(world.make_scene(3, "train", index, 192)))
  assert rec["image"] == world.encode_jpeg(
      world.render(3, "train", index, world.make_scene(3, "train", index, 192), 192)
  )
  assert decode_image(rec["image"], name="r").shape == (192, 192, 3)
  start = time.time()
  b2 = builder.prepare(cfg, str(tmp_path))
  assert time.time() - start < 2
  assert layout.open_split(b2, "train", dataset="synthetic")[1][7]["image"] == src[7]["image"]
  other = builder.prepare(
      builder.synthetic_config("captions", seed=3, image_size=192, num_train=300, num_val=40, num_test=40),
      str(tmp_path / "again"),
  )
  assert other.as_data_source("train")[11]["captions"] == src[11]["captions"]


@pytest.mark.parametrize("schema", ["vqa", "nlvr2"])
def test_builder_other_schemas(tmp_path, schema):
  b = builder.prepare(
      builder.synthetic_config(schema, seed=0, image_size=96, num_train=20, num_val=4, num_test=4), str(tmp_path)
  )
  rec = layout.open_split(b, "train", dataset="synthetic")[1][0]
  assert len(b.as_data_source(layout.IMAGES_SPLIT)) == 20 + 4 + 4  # each image once, however many records
  if schema == "vqa":
    assert len(b.as_data_source("train")) == 60 and len(rec["answers"]) == 10
    assert decode_image(rec["image"], name="q").shape == (96, 96, 3)
  else:
    assert rec["label"] in (0, 1) and decode_image(rec["image1"], name="i1").shape == (96, 96, 3)


def test_scene_spec_sets_objects_and_size():
  one = world.SceneSpec(min_objects=1, max_objects=1, radius_small=0.3, radius_large=0.45)
  scenes = [world.make_scene(0, "train", i, 192, one) for i in range(200)]
  assert all(len(s) == 1 for s in scenes)
  radii = {round(s[0].radius / 64, 3) for s in scenes}
  assert radii == {0.3, 0.45}
  # the default spec is the first demo world (demo_hard): 1-3 objects, the same scenes as before the spec
  assert {len(world.make_scene(0, "train", i, 192)) for i in range(200)} == {1, 2, 3}
  for bad, key in (
      (dict(min_objects=0), "min_objects"),
      (dict(max_objects=10), "max_objects"),
      (dict(radius_large=0.6), "radius"),
  ):
    with pytest.raises(ValueError, match=key):
      world.SceneSpec(**bad)


def test_cell_labels_name_each_object_in_its_cell():
  for i in range(50):
    objs = world.make_scene(0, "val", i, 192)
    labels = world.cell_labels(objs)
    assert labels.shape == (9, 2) and (labels[:, 0] >= 0).sum() == len(objs)
    for o in objs:
      colour, shape = labels[o.cell[0] * 3 + o.cell[1]]
      assert (list(world.COLOURS)[colour], world.SHAPES[shape]) == (o.colour, o.shape)


def test_scene_spec_is_part_of_the_dataset_name():
  a = builder.synthetic_config("captions", seed=0, image_size=192, num_train=10, num_val=2, num_test=2)
  b = builder.synthetic_config(
      "captions", seed=0, image_size=192, num_train=10, num_val=2, num_test=2, scene=world.SceneSpec(1, 1, 0.3, 0.45)
  )
  assert a.name.endswith("_o1-3_r0.2-0.38") and b.name.endswith("_o1-1_r0.3-0.45")


def test_caption_kinds_choose_the_templates_and_name_the_dataset():
  objs = [world.make_scene(0, "train", i, 192, world.SceneSpec(2, 3)) for i in range(100)]

  def kinds_written(kinds):
    found = set()
    for i, o in enumerate(objs):
      for text, _ in world.captions(0, "train", i, o, 5, kinds):
        found.add(
            "shows" if text.startswith("the picture shows") else "there_is" if text.startswith("there") else "relation"
        )
    return found

  assert kinds_written(world.CAPTION_KINDS) == set(world.CAPTION_KINDS)
  assert kinds_written(("there_is", "relation")) == {"there_is", "relation"}
  assert kinds_written(("relation",)) == {"relation"}  # 2-3 objects: always two to relate
  # all three kinds, in their order, draw the captions the worlds before the option drew
  assert world.captions(0, "train", 7, objs[7], 5) == world.captions(0, "train", 7, objs[7], 5, world.CAPTION_KINDS)
  sizes = dict(seed=0, image_size=192, num_train=10, num_val=2, num_test=2)
  default = builder.synthetic_config("captions", **sizes)
  assert default.name.endswith("_r0.2-0.38")  # unchanged: the demo's data is not rebuilt
  two = builder.synthetic_config("captions", **sizes, caption_kinds=("there_is", "relation"))
  assert two.name.endswith("_r0.2-0.38_kthere_is-relation") and two.caption_kinds == ("there_is", "relation")
  # questions ignore caption kinds: one build whatever the captions
  assert (
      builder.synthetic_config("vqa", **sizes, caption_kinds=("relation",)).name
      == builder.synthetic_config("vqa", **sizes).name
  )
  for bad in (("there_is", "there_is"), ("list",), ()):
    with pytest.raises(ValueError, match="caption_kinds"):
      builder.synthetic_config("captions", **sizes, caption_kinds=bad)
