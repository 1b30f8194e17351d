"""NLVR2 evaluation: accuracy, consistency, and the result CSV of NLVR2's evaluation script.

Consistency (Suhr et al. 2019) is the fraction of image-pair groups whose statements are all right; a
statement's identifier is `split-set-pair-sentence`, so its group is the identifier without the last
`-sentence` part.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax

from pixelbert_jax.tasks import eval_loop, nlvr2


def _predict(apply, batch: dict) -> dict:
  logits = apply(**nlvr2.model_inputs(batch))["nlvr2_logits"].astype(jnp.float32)
  return {
      "prediction": jnp.argmax(logits, -1),
      "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
  }


def group_of(identifier: str) -> str:
  parts = identifier.rsplit("-", 1)
  if len(parts) != 2 or not parts[1].isdigit():
    raise ValueError(f"NLVR2 identifier {identifier!r} does not end in '-<sentence number>'")
  return parts[0]


def accuracy_and_consistency(
    identifiers: Sequence[str],
    predictions: Sequence[int],
    labels: Sequence[int],
) -> dict[str, float]:
  if not (len(identifiers) == len(predictions) == len(labels)) or not len(identifiers):
    raise ValueError(
        f"need equally many identifiers, predictions and labels, got {len(identifiers)}, "
        f"{len(predictions)}, {len(labels)}"
    )
  correct = np.asarray(predictions).astype(int) == np.asarray(labels).astype(int)
  groups: dict[str, bool] = {}
  for ident, ok in zip(identifiers, correct):
    g = group_of(ident)
    groups[g] = groups.get(g, True) and bool(ok)
  return {
      "acc": float(np.mean(correct)),
      "consistency": float(np.mean(list(groups.values()))),
      "num_groups": float(len(groups)),
  }


def result_csv(identifiers: Sequence[str], predictions: Sequence[int]) -> str:
  """`identifier,prediction` lines (True/False), no header: what NLVR2's evaluation script reads."""
  return "".join(f"{i},{'True' if int(p) else 'False'}\n" for i, p in zip(identifiers, predictions))


def evaluate(context, data, state, workdir) -> dict[str, float]:
  split = context.config.data.eval_split
  got = eval_loop.collect(
      context,
      data,
      state,
      split,
      _predict,
      device_keys=nlvr2.INPUT_KEYS + ("label",),
      host_keys=("example_index", "label"),
  )
  all_ids = data.nlvr2_identifiers(split)
  identifiers = [all_ids[int(i)] for i in got["example_index"]]
  metrics = accuracy_and_consistency(identifiers, got["prediction"], got["label"])
  metrics["loss"] = float(np.mean(got["loss"]))
  path = eval_loop.result_path(workdir, "nlvr2", split, eval_loop.step_of(state), "csv")
  eval_loop.write_text(path, result_csv(identifiers, got["prediction"]))
  return {f"eval/{k}": v for k, v in metrics.items()}
