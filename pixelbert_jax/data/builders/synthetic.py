"""TFDS builder for the embedded synthetic world (captions, vqa and nlvr2 schemas), written as ArrayRecord.

Every generation parameter is part of the builder config's name, so changing a size or the seed builds a
new dataset beside the old one instead of silently reusing it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from pixelbert_jax.data import synthetic as world

_BYTES = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # original encoded bytes; no TF needed


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
) -> SyntheticConfig:
  if schema not in ("captions", "vqa", "nlvr2"):
    raise ValueError(f"synthetic schema must be captions, vqa or nlvr2, got {schema!r}")
  if image_size % world.GRID or image_size < 48:
    raise ValueError(f"synthetic image_size must be a multiple of {world.GRID} and >= 48, got {image_size}")
  name = (
      f"{schema}_s{seed}_i{image_size}_n{num_train}-{num_val}-{num_test}"
      f"_c{captions_per_image}_q{questions_per_image}"
      f"_o{scene.min_objects}-{scene.max_objects}_r{scene.radius_small:g}-{scene.radius_large:g}"
  )
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
  )


def _features(schema: str) -> tfds.features.FeaturesDict:
  f = tfds.features
  if schema == "captions":
    return f.FeaturesDict(
        {
            "image": _BYTES(),
            "image_id": f.Text(),
            "captions": f.Sequence(f.Text()),
            # per caption: indices into caption.split() of its grounded words, padded with -1
            "grounded_words": f.Sequence(f.Tensor(shape=(world.MAX_GROUNDED,), dtype=np.int32)),
            # per grid cell (row-major): (colour, shape) index of its object, -1 if empty (world.cell_labels)
            "cell_labels": f.Tensor(shape=(world.GRID * world.GRID, 2), dtype=np.int32),
            "height": np.int32,
            "width": np.int32,
        }
    )
  if schema == "vqa":
    return f.FeaturesDict(
        {
            "image": _BYTES(),
            "image_id": f.Text(),
            "question_id": np.int64,
            "question": f.Text(),
            "answers": f.Sequence(f.Text()),
            "question_type": f.Text(),
            "answer_type": f.Text(),
            "height": np.int32,
            "width": np.int32,
        }
    )
  return f.FeaturesDict(
      {
          "identifier": f.Text(),
          "sentence": f.Text(),
          "label": np.int32,
          "image0": _BYTES(),
          "image1": _BYTES(),
          "height0": np.int32,
          "width0": np.int32,
          "height1": np.int32,
          "width1": np.int32,
      }
  )


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on a 3x3 grid with captions, questions and pair statements; see data/synthetic.py."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Scene spec (objects per image, radii) in the config name; captions carry cell_labels."}
  BUILDER_CONFIGS = [synthetic_config("captions", seed=0, image_size=192, num_train=4000, num_val=500, num_test=500)]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default resolves the path through `importlib_resources`, a package it does not install.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features(self.builder_config.schema))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {
        "train": self._generate_examples("train", c.num_train),
        "val": self._generate_examples("val", c.num_val),
        "test": self._generate_examples("test", c.num_test),
    }

  def _scene(self, split: str, index: int):
    c = self.builder_config
    objs = world.make_scene(c.seed, split, index, c.image_size, c.scene)
    return objs, world.encode_jpeg(world.render(c.seed, split, index, objs, c.image_size))

  def _generate_examples(self, split: str, num: int):
    c, size = self.builder_config, self.builder_config.image_size
    for i in range(num):
      image_id = f"synthetic-{split}-{i:06d}"
      if c.schema == "nlvr2":
        j = world.nlvr2_partner(c.seed, split, i, num)
        (left, img0), (right, img1) = self._scene(split, i), self._scene(split, j)
        text, truth = world.nlvr2_statement(c.seed, split, i, left, right)
        ident = f"synthetic-{split}-{i}-0"
        yield ident, {
            "identifier": ident,
            "sentence": text,
            "label": int(truth),
            "image0": img0,
            "image1": img1,
            "height0": size,
            "width0": size,
            "height1": size,
            "width1": size,
        }
        continue
      objs, img = self._scene(split, i)
      if c.schema == "captions":
        caps = world.captions(c.seed, split, i, objs, c.captions_per_image)
        grounded = [np.array(g + [-1] * (world.MAX_GROUNDED - len(g)), np.int32) for _, g in caps]
        yield image_id, {
            "image": img,
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
          yield f"{image_id}-q{k}", dict(q, image=img, image_id=image_id, question_id=qid, height=size, width=size)


def prepare(config: SyntheticConfig, data_dir: str) -> SyntheticWorld:
  """The builder, generating the dataset into data_dir on first use and reusing it afterwards."""
  builtin = {c.name for c in SyntheticWorld.BUILDER_CONFIGS}
  builder = SyntheticWorld(
      config=config.name if config.name in builtin else config, data_dir=data_dir, file_format="array_record"
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          verify_ssl=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
      )
  )
  return builder
