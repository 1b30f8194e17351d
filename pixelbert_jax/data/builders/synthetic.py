"""TFDS builder for the embedded synthetic world (captions, vqa and nlvr2 schemas), written as ArrayRecord.

Every generation parameter is part of the builder config's name, so changing a size or the seed builds a
new dataset beside the old one instead of silently reusing it. The layout is every build's (layout.py):
each image once in split `images`, records pointing at it. Records keep the order version 1.1.0 stored
them in (TFDS's hash of the old keys), so the demo reads the same records at the same indices as before.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.schemas import SCHEMAS

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  schema: str = "captions"  # captions | vqa | nlvr2
  seed: int = 0
  image_size: int = 192
  num_train: int = 4000
  num_val: int = 500
  num_test: int = 500
  captions_per_image: int = 5
  questions_per_image: int = 3
  scene: world.SceneSpec = world.SceneSpec()
  caption_kinds: tuple[str, ...] = world.CAPTION_KINDS


def synthetic_config(
    schema: str,
    *,
    seed: int,
    image_size: int,
    num_train: int,
    num_val: int,
    num_test: int,
    captions_per_image: int = 5,
    questions_per_image: int = 3,
    scene: world.SceneSpec = world.SceneSpec(),
    caption_kinds: tuple[str, ...] = world.CAPTION_KINDS,
) -> SyntheticConfig:
  if schema not in SCHEMAS:
    raise ValueError(f"synthetic schema must be {', '.join(SCHEMAS)}, got {schema!r}")
  if image_size % world.GRID or image_size < 48:
    raise ValueError(f"synthetic image_size must be a multiple of {world.GRID} and >= 48, got {image_size}")
  name = (
      f"{schema}_s{seed}_i{image_size}_n{num_train}-{num_val}-{num_test}"
      f"_c{captions_per_image}_q{questions_per_image}"
      f"_o{scene.min_objects}-{scene.max_objects}_r{scene.radius_small:g}-{scene.radius_large:g}"
  )
  caption_kinds = world.check_caption_kinds(caption_kinds)
  if schema != "captions":  # only captions use them: questions and statements stay one build
    caption_kinds = world.CAPTION_KINDS
  if caption_kinds != world.CAPTION_KINDS:  # the default leaves the name, and so the built data, as it was
    name += "_k" + "-".join(caption_kinds)
  return SyntheticConfig(
      name=name,
      schema=schema,
      seed=seed,
      image_size=image_size,
      num_train=num_train,
      num_val=num_val,
      num_test=num_test,
      captions_per_image=captions_per_image,
      questions_per_image=questions_per_image,
      scene=scene,
      caption_kinds=caption_kinds,
  )


def _features(schema: str) -> tfds.features.FeaturesDict:
  if schema != "captions":
    return SCHEMAS[schema].features()
  f = tfds.features
  return SCHEMAS[schema].features(
      # per caption: indices into caption.split() of its grounded words, padded with -1
      grounded_words=f.Sequence(f.Tensor(shape=(world.MAX_GROUNDED,), dtype=np.int32)),
      # per grid cell (row-major): (colour, shape) index of its object, -1 if empty (world.cell_labels)
      cell_labels=f.Tensor(shape=(world.GRID * world.GRID, 2), dtype=np.int32),
  )


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on a 3x3 grid with captions, questions and pair statements; see data/synthetic.py."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.1.0": "Scene spec (objects per image, radii) in the config name; captions carry cell_labels.",
      "2.0.0": "Layout 2: each image stored once (split 'images'), records point at it, in 1.1.0's order.",
  }
  BUILDER_CONFIGS = [synthetic_config("captions", seed=0, image_size=192, num_train=4000, num_val=500, num_test=500)]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default resolves the path through `importlib_resources`, a package it does not install.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=_features(self.builder_config.schema),
        disable_shuffling=True,  # written in the order generated: image rows are known to the records
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.num_train, "val": c.num_val, "test": c.num_test}
    rows, start = {}, 0  # image (split, index) -> row of the image table: every split's images in order
    for split in SPLITS:
      rows[split], start = start, start + sizes[split]
    self.info.metadata.update(layout.metadata())
    records = {split: self._generate_examples(split, sizes[split], rows[split]) for split in SPLITS}
    return {layout.IMAGES_SPLIT: self._generate_images(sizes), **records}

  def _scene(self, split: str, index: int):
    c = self.builder_config
    return world.make_scene(c.seed, split, index, c.image_size, c.scene)

  def _generate_images(self, sizes: dict[str, int]):
    c = self.builder_config
    total = sum(sizes.values())
    blank = layout.blank_example(
        self.info.features, [k for k in self.info.features.keys() if k not in layout.TABLE_FIELDS]
    )
    row = 0
    for split in SPLITS:
      for i in range(sizes[split]):
        image = world.encode_jpeg(world.render(c.seed, split, i, self._scene(split, i), c.image_size))
        yield layout.ordered_key(row, total), {
            **blank,
            "image_bytes": image,
            "image_file": f"synthetic-{split}-{i:06d}.jpg",
        }
        row += 1

  def _records(self, split: str, num: int, first_row: int):
    """(1.1.0's key, record) of every record of the split, in generation order."""
    c, size = self.builder_config, self.builder_config.image_size
    for i in range(num):
      image_id = f"synthetic-{split}-{i:06d}"
      if c.schema == "nlvr2":
        j = world.nlvr2_partner(c.seed, split, i, num)
        left, right = self._scene(split, i), self._scene(split, j)
        text, truth = world.nlvr2_statement(c.seed, split, i, left, right)
        ident = f"synthetic-{split}-{i}-0"
        yield ident, {
            "identifier": ident,
            "sentence": text,
            "label": int(truth),
            "image0_index": first_row + i,
            "image1_index": first_row + j,
            "height0": size,
            "width0": size,
            "height1": size,
            "width1": size,
        }
        continue
      objs = self._scene(split, i)
      if c.schema == "captions":
        caps = world.captions(c.seed, split, i, objs, c.captions_per_image, c.caption_kinds)
        grounded = [np.array(g + [-1] * (world.MAX_GROUNDED - len(g)), np.int32) for _, g in caps]
        yield image_id, {
            "image_index": first_row + i,
            "image_id": image_id,
            "captions": [t for t, _ in caps],
            "grounded_words": grounded,
            "cell_labels": world.cell_labels(objs),
            "height": size,
            "width": size,
        }
      else:
        for k, q in enumerate(world.questions(c.seed, split, i, objs, c.questions_per_image)):
          qid = i * 1000 + k
          yield f"{image_id}-q{k}", dict(
              q, image_index=first_row + i, image_id=image_id, question_id=qid, height=size, width=size
          )

  def _generate_examples(self, split: str, num: int, first_row: int):
    # Version 1.1.0 let TFDS order each split by the hash of these keys (salted with the split name); the
    # same order here keeps every record at the index it had, so the demo's batches do not change.
    hasher = hashing.Hasher(split)
    made = sorted(self._records(split, num, first_row), key=lambda kv: hasher.hash_key(kv[0]))
    blank = layout.blank_example(self.info.features, layout.TABLE_FIELDS)
    for position, (_, record) in enumerate(made):
      yield layout.ordered_key(position, len(made)), {**blank, **record}


def prepare(config: SyntheticConfig, data_dir: str) -> SyntheticWorld:
  """The builder, generating the dataset into data_dir on first use and reusing it afterwards."""
  builtin = {c.name for c in SyntheticWorld.BUILDER_CONFIGS}
  builder = SyntheticWorld(
      config=config.name if config.name in builtin else config, data_dir=data_dir, file_format="array_record"
  )
  if not builder.data_path.exists():
    layout.warn_unfinished_builds(builder)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      )
  )
  return builder
