"""torchvision ResNet + HF BERT weights -> an Orbax initialisation for `config.init_from_torch`.

The model the config describes is initialised (the visual embedder and any head the PyTorch weights do
not provide stay at their fresh initialisation, from `--seed`), then the CNN and the transformer (with
BERT's MLM/ITM heads when the HF folder has them and the task uses them) are replaced by the imported
tensors, and the result is written as a step-0 checkpoint (items `params`, `meta`).
Weight files are memory-mapped (`.safetensors`) or read with `torch.load(weights_only=True)` (`.pth`).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import paths
from pixelbert_jax.config_files import load_config
from pixelbert_jax.convert.mapping import bert_from_hf, cnn_from_torchvision, merge_into
from pixelbert_jax.convert.safetensors_io import TensorFileError, read_safetensors, read_tensor_file
from pixelbert_jax.data import pipeline
from pixelbert_jax.models.build import build_model, init_variables

# HF config.json key -> model config key; each must agree.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}


def read_hf_folder(folder: str) -> tuple[dict, dict]:
  """(config.json, state dict) of an HF BERT folder: model.safetensors, a sharded index, or pytorch_model.bin."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"HF BERT folder {folder} does not exist")
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} does not exist (not a transformers folder)")
  with open(config_path) as f:
    hf_config = json.load(f)
  single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(single):
    return hf_config, read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(read_safetensors(os.path.join(folder, shard)))
    return hf_config, state
  if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
    return hf_config, read_tensor_file(os.path.join(folder, "pytorch_model.bin"))
  raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def check_hf_config(hf_config: dict, cfg, where: str) -> None:
  bad = [
      f"{k}={hf_config.get(k)!r} but config model.{m}={cfg[m]!r}"
      for k, m in _HF_KEYS.items()
      if k in hf_config and hf_config[k] != cfg[m]
  ]
  if hf_config.get("hidden_act", "gelu") != "gelu":
    bad.append(f"hidden_act={hf_config['hidden_act']!r} but the model uses exact GELU ('gelu')")
  if hf_config.get("model_type", "bert") != "bert":
    bad.append(f"model_type={hf_config['model_type']!r}, expected 'bert'")
  if bad:
    raise ValueError(f"{where} does not fit the config: " + "; ".join(bad))


def from_torch(
    cnn_path: str,
    bert_dir: str,
    out: str,
    config_spec: str = "configs/pretrain.py:r50",
    overrides: list[str] = (),
    seed: int = 0,
    verify: bool = True,
    log=print,
) -> dict:
  """Writes OUT (a step-0 checkpoint); returns the verification differences (empty with verify=False)."""
  # '~' and relative paths (paths.py); Orbax refuses to write a relative OUT.
  cnn_path, bert_dir, out = paths.resolve(cnn_path), paths.resolve(bert_dir), paths.resolve(out)
  config_file, sep, variant = config_spec.partition(":")
  config_spec = paths.resolve(config_file) + sep + variant
  config = load_config(config_spec, overrides)
  cfg, task = config.model, config.task
  cnn_sd = read_tensor_file(cnn_path)
  cnn = cnn_from_torchvision(cnn_sd, cfg.cnn)
  hf_config, bert_sd = read_hf_folder(bert_dir)
  # A config's -1 sizes come from its data, as in training, so that a BERT that does not fit the data's
  # tokenizer is refused here rather than when the checkpoint is trained.
  pipeline.resolve_from_data(config)
  check_hf_config(hf_config, cfg, os.path.join(bert_dir, "config.json"))
  bert = bert_from_hf(bert_sd, cfg)
  model = build_model(cfg, task)
  variables = jax.jit(lambda k: nn.unbox(init_variables(model, k, task)))(jax.random.key(seed))
  variables = jax.tree.map(np.asarray, dict(variables))
  variables.setdefault("batch_stats", {})
  used = sorted(k for k in bert if k in variables["params"])
  skipped = sorted(set(bert) - set(used))
  variables = merge_into(variables, cnn, ("encoder", "cnn"))
  variables = merge_into(variables, {"params": {k: bert[k] for k in used}})
  del cnn, bert
  diffs = {}
  if verify:
    from pixelbert_jax.convert import verify as verify_lib

    diffs = verify_lib.verify_imported_pieces(cfg, variables, cnn_sd, bert_dir)
    for name, d in diffs.items():
      log(f"  {name:<22} max|flax - torch| = {d:.3e}")
  fresh = sorted({"encoder/visual"} | {k for k in variables["params"] if k not in used and k != "encoder"})
  meta = {
      "task": task,
      "model": cfg.to_dict(),
      "data": config.data.get("name", ""),
      "vocab_size": int(cfg.vocab_size),
      "source": {
          "cnn": os.path.abspath(cnn_path),
          "bert": os.path.abspath(bert_dir),
          "config": config_spec,
          "overrides": list(overrides),
          "seed": seed,
          "fresh": fresh,
          "bert_heads_unused": skipped,
      },
  }
  ckpt_lib.save_model_variables(out, variables, meta)
  log(
      f"wrote {out}: CNN from {cnn_path}, transformer{' + ' + ', '.join(h for h in used if h != 'encoder') if len(used) > 1 else ''} "
      f"from {bert_dir}; fresh: {', '.join(fresh)}"
  )
  return diffs


__all__ = ["from_torch", "load_config", "read_hf_folder", "check_hf_config", "TensorFileError"]
