"""The one registry of dataset names: what `config.data.name` and `prepare --dataset` accept.

Each entry says which schemas its builds follow (data/schemas.py), which TFDS builder class builds it, its
held-out split and the `config.data` keys its builder takes. `data/config.py` checks names and mixtures
against it, `data/builders` and `data/prepare.py` build from it. Light on purpose: configs import it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Dataset:
  """`schemas`: the data schemas its builds follow; with more than one, the schema a task reads picks the
  builder config of that name (jsonl). `builder`: the "module:Class" path of its TFDS builder, empty for the
  synthetic world, which is generated (data/builders/synthetic.py). `eval_split`: its default held-out
  split. `options`: `config.data` keys (and `prepare` flags) passed to its builder when set."""

  name: str
  schemas: tuple[str, ...]
  builder: str = ""
  eval_split: str = "val"
  options: tuple[str, ...] = ()

  @property
  def mixes(self) -> bool:
    """Whether it joins '+' mixtures: built from downloaded files, records of the captions schema."""
    return bool(self.builder) and "captions" in self.schemas


_BUILDERS = "pixelbert_jax.data.builders"
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset("synthetic", ("captions", "vqa", "nlvr2")),
        Dataset("coco_karpathy", ("captions",), f"{_BUILDERS}.coco_karpathy:CocoKarpathy"),
        Dataset("flickr30k", ("captions",), f"{_BUILDERS}.flickr30k:Flickr30kKarpathy"),
        Dataset(
            "visual_genome",
            ("captions",),
            f"{_BUILDERS}.visual_genome:VisualGenomeRegions",
            options=("exclude_coco_heldout",),
        ),
        Dataset("vqa2", ("vqa",), f"{_BUILDERS}.vqa2:Vqa2"),
        Dataset("nlvr2", ("nlvr2",), f"{_BUILDERS}.nlvr2:Nlvr2", eval_split="dev"),
        Dataset("jsonl", ("captions", "vqa"), f"{_BUILDERS}.jsonl:Jsonl"),
    )
}
REAL_DATASETS = tuple(name for name, d in DATASETS.items() if d.builder)  # built from downloaded files
CAPTION_DATASETS = tuple(name for name, d in DATASETS.items() if d.mixes)  # e.g. "coco_karpathy+visual_genome"
