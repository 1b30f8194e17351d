"""Tokenisation, MLM masking statistics, ITM/retrieval negatives, VQA soft scores."""

import numpy as np
import pytest

from pixelbert_jax.data import synthetic, text, vqa_answers


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = text.write_world_vocab(str(tmp_path_factory.mktemp("vocab")), synthetic.world_words())
  return text.load_tokenizer(path)


def test_vocab_file_is_really_used(tok):
  # the trap: a tokenizer that ignored the file would have BERT's 30522 entries or none
  assert len(tok) == len(text.SPECIAL_TOKENS) + len(synthetic.world_words())
  assert tok.pad_token_id == 0 and tok.cls_token_id == 2 and tok.sep_token_id == 3 and tok.mask_token_id == 4


def test_encode_layout_and_grounded(tok):
  caption = "there is a small red circle in the top left"
  ids, mask, grounded = text.encode(tok, caption, 16, grounded_words=[4, 5])
  assert ids.dtype == np.int32 and ids.shape == (16,) and mask.dtype == np.int32
  n = len(caption.split()) + 2
  assert ids[0] == tok.cls_token_id and ids[n - 1] == tok.sep_token_id and (ids[n:] == 0).all()
  assert mask.tolist() == [1] * n + [0] * (16 - n)
  assert tok.convert_ids_to_tokens(ids[grounded == 1].tolist()) == ["red", "circle"]


def test_encode_truncates_keeping_sep(tok):
  ids, mask, _ = text.encode(tok, " ".join(["red"] * 100), 40)
  assert mask.sum() == 40 and ids[-1] == tok.sep_token_id


@pytest.mark.slow
def test_mlm_statistics(tok):
  rng = np.random.default_rng(0)
  special = tok.all_special_ids
  caption = "the picture shows a small red circle and a large blue star and a small green ring"
  ids, mask, _ = text.encode(tok, caption, 40)
  n_real = len(caption.split())
  chosen = replaced_mask = replaced_random = kept = 0
  draws = 4000
  for _ in range(draws):
    out, labels, weights = text.mlm_mask(
        ids, mask, rng, prob=0.15, mask_id=tok.mask_token_id, special_ids=special, vocab_size=len(tok)
    )
    sel = weights > 0
    assert sel.sum() >= 1
    assert not np.isin(ids[sel], special).any() and not sel[mask == 0].any()
    assert (labels[sel] == ids[sel]).all() and (labels[~sel] == 0).all() and (out[~sel] == ids[~sel]).all()
    chosen += sel.sum()
    replaced_mask += (out[sel] == tok.mask_token_id).sum()
    kept += (out[sel] == ids[sel]).sum()
    replaced_random += ((out[sel] != ids[sel]) & (out[sel] != tok.mask_token_id)).sum()
    assert not np.isin(out[sel & (out != tok.mask_token_id)], special).any()
  rate = chosen / (draws * n_real)
  assert abs(rate - 0.15) < 0.005, rate
  assert abs(replaced_mask / chosen - 0.8) < 0.02
  # "kept" also catches random replacements that drew the same token (1/64 of them)
  assert abs(kept / chosen - 0.1 - 0.1 / (len(tok) - len(special))) < 0.015
  assert abs(replaced_random / chosen - 0.1) < 0.015


def test_mlm_split_80_10_10(tok):
  """BERT's split of the chosen tokens, fast: one sequence of 2000 words with prob=1 chooses all of them,
  each an independent draw, so each share lies within 5 standard deviations, sqrt(p (1 - p) / 2000)
  (<= 0.045), of 0.8 [MASK], 0.1 a random word and 0.1 kept (plus the random draws of the same word,
  1 in the vocab's normal words). An 80/20/0 split is 0.1 off in two shares, 11 deviations and more."""
  words = [w for w in tok.get_vocab() if w not in text.SPECIAL_TOKENS]
  rng = np.random.default_rng(0)
  n = 2000
  ids, mask, _ = text.encode(tok, " ".join(rng.choice(words, n - 2)), n)
  special = tok.all_special_ids
  out, labels, weights = text.mlm_mask(
      ids, mask, rng, prob=1.0, mask_id=tok.mask_token_id, special_ids=special, vocab_size=len(tok)
  )
  chosen = weights > 0
  assert chosen.sum() == n - 2 and (labels[chosen] == ids[chosen]).all()
  k = chosen.sum()
  masked = (out[chosen] == tok.mask_token_id).mean()
  kept = (out[chosen] == ids[chosen]).mean()
  randomised = ((out[chosen] != ids[chosen]) & (out[chosen] != tok.mask_token_id)).mean()
  same_word = 0.1 / (len(tok) - len(special))
  for share, p in ((masked, 0.8), (kept, 0.1 + same_word), (randomised, 0.1 - same_word)):
    assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / k), (masked, kept, randomised)


def test_mlm_short_caption_masks_at_least_one(tok):
  ids, mask, _ = text.encode(tok, "red circle", 8)
  rng = np.random.default_rng(1)
  for _ in range(50):
    _, _, w = text.mlm_mask(ids, mask, rng, prob=0.15, mask_id=4, special_ids=tok.all_special_ids, vocab_size=len(tok))
    assert w.sum() == 1 and w[1:3].sum() == 1


def test_negatives_never_same_image():
  image_of = np.repeat(np.arange(20), 5)  # 5 captions per image, like COCO flattened
  rng = np.random.default_rng(0)
  for index in range(len(image_of)):
    for _ in range(20):
      j = text.sample_other(rng, len(image_of), index, lambda j: image_of[j] == image_of[index])
      assert image_of[j] != image_of[index]
  negs = text.sample_retrieval_negatives(rng, 100, 7, 20, lambda j: image_of[j] == image_of[7])
  assert len(set(negs)) == 20 and all(image_of[j] != image_of[7] for j in negs)
  with pytest.raises(ValueError, match="different image"):
    text.sample_other(rng, 5, 0, lambda j: True)


def test_vqa_soft_scores_published_mapping():
  assert [vqa_answers.soft_score(c) for c in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
  vocab = ["yes", "no", "2"]
  index = {a: i for i, a in enumerate(vocab)}
  answers = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
  np.testing.assert_allclose(vqa_answers.soft_targets(answers, index), [1.0, 0.6, 0.0])
  np.testing.assert_allclose(vqa_answers.soft_targets(["2"] * 3 + ["no"] + ["x"] * 6, index), [0, 0.3, 0.9])


def test_answer_vocab_min_count(tmp_path):
  lists = [["a"] * 9 + ["b"], ["b"] * 8 + ["c", "c"], ["d"] * 10]
  vocab = vqa_answers.build_answer_vocab(lists, min_count=9)
  assert vocab == ["d", "a", "b"]
  vqa_answers.save_answer_vocab(str(tmp_path / "v.json"), vocab)
  assert vqa_answers.load_answer_vocab(str(tmp_path / "v.json")) == vocab
  (tmp_path / "bad.json").write_text('{"a": 1}')
  with pytest.raises(ValueError, match="bad.json"):
    vqa_answers.load_answer_vocab(str(tmp_path / "bad.json"))
