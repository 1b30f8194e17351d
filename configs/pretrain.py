"""Pre-training (MLM + ITM): `--config=configs/pretrain.py[:demo|demo_single|demo_hard|r50|x152]`.

`demo` (the default) pre-trains a CPU-sized model on the embedded synthetic world in minutes, and shows
that it reads words off the pixels and binds each word to its own object among 2-3; `demo_single` is the
first such demo, one object per image; `demo_hard` is a harder world for longer runs. `r50` and `x152` are the
paper's recipe: every published hyperparameter is a value below, and the README's table maps each to its
key. What the paper leaves open is marked "ours".
"""

import ml_collections

from pixelbert_jax.data.config import data_config, paper_sizes
from pixelbert_jax.models.presets import model_config

BERT_BASE_UNCASED_VOCAB = 30522
FROM_DATA = -1  # a size the trainer reads off the data it opens (pipeline.resolve_from_data)
DEMO_INIT_HOOK = "pixelbert_jax.demo.warm_start:warm_start_cnn"  # the CNN warm start (config_checks.WARM_START_HOOK)


def base_config() -> ml_collections.ConfigDict:
  """What every task shares: run length, logging, checkpoints, mesh, optimizer layout."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.batch_size = 4096  # global, per optimizer step (paper: 4096 on 64 V100s)
  c.eval_batch_size = 256
  c.num_epochs = 40.0  # paper
  c.total_steps = -1  # > 0 overrides num_epochs
  c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
  c.cpu_devices = 0  # CPU-only runs: N data-parallel CPU devices; 0: JAX's default (1)
  c.device_memory_gib = 0.0  # for optim.grad_accum_steps=-1: > 0 overrides the memory the device reports
  c.log_every_steps = 50
  c.eval_every_steps = 5000  # 0: evaluate only at the end
  c.eval_steps = -1  # batches per evaluation; -1 = the whole held-out split
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.profile_steps = 0  # > 0: a jax.profiler trace of that many steps into WORKDIR/profile (profiling.py)
  c.profile_start_step = 10  # the first traced step (step 1 compiles the step function)
  # a frozen CNN's features computed once per image at start-up and fed in place of the image
  # (pixelbert_jax/feature_cache.py): one process, one image bucket, pre-training
  c.cache_cnn_features = False
  c.init_from = ""  # a pre-training workdir / checkpoint (fine-tuning)
  c.init_from_torch = ""  # an INIT_DIR written by `pixelbert_jax.convert from-torch`
  c.loss = ml_collections.ConfigDict(dict(mlm_weight=1.0, itm_weight=1.0))
  # 'package.module:function' run once on a fresh start before step 1 (pixelbert_jax/init_hooks.py); '' = none
  c.init_hook = ""
  # the demo's init hook, which first trains the CNN to name each cell's colour and shape
  # (pixelbert_jax/demo/warm_start.py); read only when config.init_hook names it
  c.cnn_warm_start = ml_collections.ConfigDict(dict(steps=0, batch_size=64, lr=1e-3))
  c.optim = ml_collections.ConfigDict(
      dict(
          cnn=dict(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=5e-4),  # paper: SGD
          transformer=dict(
              lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-2
          ),  # paper: AdamW; betas/eps ours (BERT's)
          warmup_steps=1000,  # ours (SOHO, same authors: 1000 linear warm-up iterations)
          decay_epochs=(25.0, 35.0),  # paper: lr x0.1 at epochs 25 and 35
          decay_factor=0.1,
          grad_clip_norm=0.0,  # ours: off
          grad_accum_steps=1,  # micro-batches per step (batch_size is per step); -1: the fewest that fit
      )
  )
  return c


def _demo_single(c: ml_collections.ConfigDict) -> None:
  """The first demo that learns (`demo_single`): pre-training that reads words off the pixels within 10
  minutes on 2 CPU cores, in a world of one object per image, where a word never has to pick its object.

  The world: one large object per image (radius 0.3 / 0.45 of its cell), so a masked colour or shape word
  names what one feature pixel shows. Like the paper's ImageNet initialisation, the CNN first learns to
  name each cell's colour and shape (`cnn_warm_start`), then stays frozen with no backward pass through
  it, which doubles the examples per second. 8 of the 9 pixels are kept, so the named object is among
  them 8 times in 9. The transformer is the demo width with a third layer, an init scaled to its width and
  no dropout. docs/experiments/2026-11-30-demo-learns.md has the runs behind each choice.
  """
  s = c.data.synthetic
  s.min_objects, s.max_objects, s.radius_small, s.radius_large = 1, 1, 0.3, 0.45
  c.data.mlm_prob = 0.3
  c.data.max_text_len = 24  # the world's longest caption is 19 tokens: 40 would pad every sequence
  c.loss.itm_weight = 3.0  # ITM learns only once the words are grounded; more weight speeds it up
  c.model.cnn.frozen = True
  c.model.initializer_range = 0.08  # ~ 1/sqrt(hidden 128); BERT's 0.02 is for width 768
  c.model.num_layers = 3  # comparing caption words with the pixel (ITM) needs a layer more than MLM
  c.model.hidden_dropout = c.model.attention_dropout = 0.0
  c.model.pixel_sampling.num_pixels = 8
  c.cnn_warm_start.update(steps=200, batch_size=32, lr=3e-3)
  c.batch_size = 64
  c.total_steps = 1000
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 250
  c.optim.warmup_steps = 50
  c.optim.decay_epochs = (10.75,)  # step 666 (62 an epoch): lr x0.1 for the last third, which steadies ITM
  c.optim.transformer.lr = 1e-3
  c.optim.transformer.weight_decay = 1e-2


def _demo(c: ml_collections.ConfigDict) -> None:
  """The README demo: pre-training that reads words off the pixels and binds each word to its own object,
  within 10 minutes on 2 CPU cores.

  The world: 2-3 large objects per image, each in its own cell, with distinct colours and distinct shapes;
  every caption names one object and its cell ("there is a large red star in the top left"), so a masked
  colour is answered only by the pixel of the star (or of the top left cell). Captions that name every
  object of the image ("the picture shows ...", or a relation in a two-object image) are left out: they
  answer a masked word by "present, and not named", and a model trained on them learns that instead of
  binding. Otherwise `demo_single`'s recipe (CNN warm start then frozen, 3 layers, 8 of 9 pixels), with:
  - half the words masked (BERT's random masking at 0.5): grounding starts for every seed tried;
  - a learned 2D position on the pixel tokens (ours, docs/paper.md): the caption's cell is a second way to
    the object;
  - the frozen CNN's features computed once per image (`cache_cnn_features`): the steps go to the
    transformer alone, about 4x as many per minute;
  - 3600 steps at a constant learning rate: binding starts after about 1000 steps, and `demo_single`'s drop
    at two thirds would stop it. docs/experiments/2026-12-07-multi-object-binding.md has the runs behind
    each choice.
  """
  _demo_single(c)
  c.data.synthetic.update(min_objects=2, max_objects=3, caption_kinds=("there_is",))
  c.data.mlm_prob = 0.5
  c.model.pos_embed_2d = True
  c.cache_cnn_features = True
  c.total_steps = 3600  # 8:23 on 2 cores, start included (README); binding still rose from step 3000
  c.eval_every_steps = 600
  c.checkpoint_every_steps = 600
  c.optim.decay_epochs = ()  # none: constant after the warm-up


def _demo_hard(c: ml_collections.ConfigDict) -> None:
  """The first demo world: 1-3 smaller objects, a CNN trained from scratch through the transformer. It does
  not learn to ground within CPU minutes (docs/experiments/2026-11-27-first-demo-world.md); kept for GPUs
  and for comparison."""
  c.batch_size = 32
  c.num_epochs = 4.0
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.optim.warmup_steps = 50
  c.optim.decay_epochs = (3.0,)
  c.optim.cnn.lr = 5e-2
  c.optim.transformer.lr = 5e-4
  c.optim.transformer.weight_decay = 1e-2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  c = base_config()
  if variant in ("demo", "demo_single", "demo_hard"):
    c.data = data_config("synthetic")
    c.model = model_config("demo", "demo", FROM_DATA)  # the synthetic world's vocabulary
    c.model.cnn.norm = "bn"  # trained from scratch; on 2 CPU cores group norm costs 2x the step time
    c.cpu_devices = 2  # ours: XLA runs a CPU step mostly on one core; 2 devices use 2 cores
    c.eval_batch_size = 64
    c.log_every_steps = 10
    c.optim.grad_clip_norm = 1.0
    c.init_hook = DEMO_INIT_HOOK  # runs the CNN warm start when cnn_warm_start.steps > 0 (demo: 200)
    {"demo": _demo, "demo_single": _demo_single, "demo_hard": _demo_hard}[variant](c)
  elif variant in ("r50", "x152"):
    c.data = paper_sizes(data_config("coco_karpathy+visual_genome"), variant)  # paper
    c.data.vocab_path = ""  # set to BERT-base-uncased's vocab.txt
    c.model = model_config("base", variant, BERT_BASE_UNCASED_VOCAB)
    c.model.dtype = "bfloat16"  # ours: the paper trained in fp16 (SOHO); params stay float32
    c.model.remat = True
    c.model.pixel_sampling.num_pixels = 100  # paper
    c.init_from_torch = ""  # set to the `convert from-torch` output: ImageNet CNN + BERT-base
  else:
    raise ValueError(
        f"Unknown variant {variant!r} of configs/pretrain.py: use demo, demo_single, demo_hard, r50 or x152"
    )
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.itm_neg_prob = 0.5  # paper
  if variant not in ("demo", "demo_single"):  # the demos set their own
    c.data.mlm_prob = 0.15  # paper
  return c
