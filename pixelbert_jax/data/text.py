"""Text side: the world's vocab, tokenisation to fixed length, MLM masking, ITM and retrieval sampling."""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Callable, Sequence

import ml_collections
import numpy as np
from transformers import BertTokenizerFast

from pixelbert_jax.data import synthetic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = 0, so mlm_labels 0 = "no label"


def write_world_vocab(directory: str, words: Sequence[str]) -> str:
  """Writes vocab.txt (special tokens, then `words`) into `directory` unless an identical one is there."""
  text = "\n".join(list(SPECIAL_TOKENS) + list(words)) + "\n"
  path = os.path.join(directory, "vocab.txt")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)  # atomic: parallel processes never see half a vocab
  return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(vocab_path: str) -> BertTokenizerFast:
  """BertTokenizerFast from a local vocab.txt; rejects a vocab without BERT's special tokens."""
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"vocab file {vocab_path!r} does not exist")
  with open(vocab_path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):  # the tokenizer's own error names neither file nor line
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
            f"vocab file {vocab_path}: line {line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x}: {e.reason}); "
            "save the file as UTF-8"
        ) from None
  # Positional: `BertTokenizerFast(vocab_file=p)` silently ignores the file in transformers 5.
  tok = BertTokenizerFast(vocab_path, do_lower_case=True)
  vocab = tok.get_vocab()
  missing = [t for t in SPECIAL_TOKENS if t not in vocab]
  if missing:
    raise ValueError(f"vocab file {vocab_path!r} lacks special tokens {missing}")
  if len(vocab) < len(SPECIAL_TOKENS) + 1:
    raise ValueError(f"vocab file {vocab_path!r} has only {len(vocab)} entries")
  return tok


def vocab_path(data_cfg: ml_collections.ConfigDict) -> str:
  if data_cfg.vocab_path:
    return data_cfg.vocab_path
  if data_cfg.name != "synthetic":
    raise ValueError(f"dataset {data_cfg.name!r} needs a BERT vocab: set config.data.vocab_path")
  return write_world_vocab(os.path.join(data_cfg.data_dir, "synthetic_world_vocab"), synthetic.world_words())


def tokenizer(data_cfg: ml_collections.ConfigDict) -> BertTokenizerFast:
  return load_tokenizer(vocab_path(data_cfg))


def vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  return len(tokenizer(data_cfg))


def encode(
    tok: BertTokenizerFast, text: str, max_len: int, grounded_words: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`[CLS] text [SEP] [PAD]...` truncated to max_len: (input_ids int32, text_mask int32, grounded float32).

  `grounded_words` index `text.split()`; a token is grounded if it lies inside such a word.
  """
  enc = tok(text, max_length=max_len, truncation=True, padding="max_length", return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  mask = np.asarray(enc["attention_mask"], np.int32)
  if mask[-1]:  # filled to the last position: count the whole text once to tell a cut from an exact fit
    full = len(tok(text, truncation=False)["input_ids"])
    if full > max_len:
      _note_truncation(full, max_len)
  grounded = np.zeros(max_len, np.float32)
  if len(grounded_words):
    spans, pos = [], 0
    for word in text.split():
      start = text.index(word, pos)
      spans.append((start, start + len(word)))
      pos = start + len(word)
    chosen = [spans[i] for i in grounded_words if 0 <= i < len(spans)]
    for t, (s, e) in enumerate(enc["offset_mapping"]):
      if e > s and any(cs <= s and e <= ce for cs, ce in chosen):
        grounded[t] = 1.0
  return ids, mask, grounded


_truncated = {"count": 0}
_truncated_lock = threading.Lock()


def _note_truncation(length: int, max_len: int) -> None:
  """Says that texts are cut, with both lengths, on the 1st, 10th, 100th, ... cut text of the process: a
  dataset of long captions would otherwise log once per example."""
  with _truncated_lock:
    _truncated["count"] += 1
    count = _truncated["count"]
  if count == 10 ** (len(str(count)) - 1):
    logging.warning(
        "A text of %d tokens was cut to max_text_len=%d (%d text%s cut so far; raise "
        "config.data.max_text_len to keep more of them).",
        length,
        max_len,
        count,
        "s" * (count > 1),
    )


def mlm_mask(
    ids: np.ndarray,
    text_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT masking of one sequence: (masked ids, labels, weights).

  k = stochastic_round(prob * n) of the n non-special real tokens are chosen (so the expected rate is exactly
  `prob` wherever prob * n >= 1), at least one; chosen tokens become [MASK] 80%, a random non-special token
  10%, themselves 10%. labels hold the original id where chosen and 0 elsewhere.
  """
  special = np.isin(ids, np.asarray(special_ids)) | (text_mask == 0)
  candidates = np.flatnonzero(~special)
  labels = np.zeros_like(ids)
  weights = np.zeros(ids.shape, np.float32)
  if candidates.size == 0:
    return ids.copy(), labels, weights
  k = int(np.floor(prob * candidates.size + rng.uniform()))
  k = min(candidates.size, max(1, k))
  chosen = rng.choice(candidates, k, replace=False)
  out = ids.copy()
  labels[chosen] = ids[chosen]
  weights[chosen] = 1.0
  action = rng.uniform(size=k)
  out[chosen[action < 0.8]] = mask_id
  randomise = chosen[(action >= 0.8) & (action < 0.9)]
  if randomise.size:
    out[randomise] = rng.choice(_normal_ids(vocab_size, tuple(int(i) for i in special_ids)), randomise.size)
  return out, labels, weights


@functools.lru_cache(maxsize=8)
def _normal_ids(vocab_size: int, special_ids: tuple[int, ...]) -> np.ndarray:
  # Built once per vocabulary: at BERT's 30,522 entries it took 1.5 ms, longer than the rest of an
  # example's text side (bench/data_throughput.py).
  normal = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids))
  normal.flags.writeable = False
  return normal


def sample_other(
    rng: np.random.Generator, n: int, index: int, same_image: Callable[[int], bool], *, tries: int = 32
) -> int:
  """A random index in [0, n) != index whose example is not of the same image (ITM / retrieval negatives)."""
  if n < 2:
    raise ValueError(f"cannot draw a negative from a split of {n} example(s)")
  for _ in range(tries):
    j = (index + 1 + int(rng.integers(n - 1))) % n
    if not same_image(j):
      return j
  raise ValueError(f"no example of a different image found in {tries} draws around index {index} of {n}")


def sample_retrieval_negatives(
    rng: np.random.Generator, n: int, index: int, num: int, same_image: Callable[[int], bool]
) -> list[int]:
  """`num` distinct negatives for retrieval training (1 positive + `num` negatives per image)."""
  if n - 1 < num:
    raise ValueError(f"cannot draw {num} distinct negatives from a split of {n} examples")
  out: list[int] = []
  while len(out) < num:
    j = sample_other(rng, n, index, same_image)
    if j not in out:
      out.append(j)
  return out
