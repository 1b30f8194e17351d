"""ResNet / ResNeXt trunk vs torchvision (eval mode, random weights and random BN statistics)."""

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from pixelbert_jax.convert import cnn_from_torchvision
from pixelbert_jax.models.build import build_model, dummy_inputs
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.models.presets import cnn_config
from pixelbert_jax.models.resnet import Conv, Norm, resnet_from_config

jax.config.update("jax_default_matmul_precision", "highest")


def _randomize_norms(model: "torch.nn.Module", seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _torch_c5(model, x_nhwc: np.ndarray) -> np.ndarray:
  m = model
  with torch.no_grad():
    x = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
  return x.permute(0, 2, 3, 1).numpy()


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _compare(tv_model, cnn_cfg, size=(64, 96), seed=0):
  torch.manual_seed(seed)
  _randomize_norms(tv_model, seed)
  tv_model.eval()
  x = np.random.default_rng(seed).standard_normal((2,) + size + (3,)).astype(np.float32)
  ref = _torch_c5(tv_model, x)
  variables = cnn_from_torchvision(_state_dict(tv_model), cnn_cfg)
  out = np.asarray(resnet_from_config(cnn_cfg).apply(variables, jnp.asarray(x), train=False))
  assert out.shape == ref.shape
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  print(f"C5 {out.shape}: max|diff| / max|ref| = {rel:.2e}")
  return rel


@pytest.mark.slow
def test_resnet50_matches_torchvision():
  cfg = cnn_config("r50")
  assert _compare(torchvision.models.resnet50(), cfg) <= 1e-4


@pytest.mark.slow
def test_small_resnext_matches_torchvision():
  from torchvision.models.resnet import Bottleneck, ResNet

  cfg = cnn_config("r50")
  cfg.stage_sizes, cfg.groups, cfg.width_per_group = [1, 2, 1, 1], 8, 4
  tv = ResNet(Bottleneck, [1, 2, 1, 1], groups=8, width_per_group=4)
  assert _compare(tv, cfg, size=(96, 64), seed=1) <= 1e-4


@pytest.mark.slow
def test_trainable_bn_matches_torchvision_in_train_mode_and_updates_stats():
  from torchvision.models.resnet import Bottleneck, ResNet

  cfg = cnn_config("r50")
  cfg.stage_sizes, cfg.norm = [1, 1, 1, 1], "bn"
  tv = ResNet(Bottleneck, [1, 1, 1, 1])
  _randomize_norms(tv, 2)
  variables = cnn_from_torchvision(_state_dict(tv), cfg)
  x = np.random.default_rng(2).standard_normal((4, 64, 64, 3)).astype(np.float32)
  tv.train()
  ref = _torch_c5(tv, x)  # also updates torchvision's running statistics
  out, updates = resnet_from_config(cfg).apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  new_stats = cnn_from_torchvision(_state_dict(tv), cfg)["batch_stats"]
  got = jax.tree.leaves(updates["batch_stats"])
  want = jax.tree.leaves(new_stats)
  assert len(got) == len(want) > 0
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_frozen_bn_is_constant():
  cfg = cnn_config("tiny")
  cfg.norm = "frozen_bn"
  model = resnet_from_config(cfg)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 64, 3)), jnp.float32)
  variables = nn.meta.unbox(model.init(jax.random.key(0), x))
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  grads = jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x, train=True).sum()))(variables["params"])
  assert float(jnp.abs(grads["bn1"]["scale"]).max()) == 0.0
  assert float(jnp.abs(grads["conv1"]["kernel"]).max()) > 0.0


def test_group_norm_matches_torch():
  norm = Norm("gn", gn_groups=4)
  x = np.random.default_rng(4).standard_normal((2, 5, 7, 16)).astype(np.float32)
  variables = norm.init(jax.random.key(0), x, False)
  params = nn.meta.unbox(variables)["params"]
  scale = np.random.default_rng(5).uniform(0.5, 1.5, 16).astype(np.float32)
  bias = np.random.default_rng(6).standard_normal(16).astype(np.float32)
  out = norm.apply({"params": {"scale": scale, "bias": bias}}, x, False)
  gn = torch.nn.GroupNorm(4, 16)
  with torch.no_grad():
    gn.weight.copy_(torch.from_numpy(scale))
    gn.bias.copy_(torch.from_numpy(bias))
    ref = gn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  assert params["scale"].shape == (16,)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.slow
def test_r50_800x1344_gives_12x21_pixel_grid():
  cfg = model_config("base", "r50", vocab_size=30522)
  model = build_model(cfg, "pretrain")
  inputs = dummy_inputs("pretrain", batch_size=1, image_size=(800, 1344), text_len=16)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs, train=False))
  pixels, mask = jax.eval_shape(
      lambda v: model.apply(v, inputs["image"], inputs["image_mask"], method="encode_image"), variables
  )
  assert pixels.shape == (1, 12 * 21, 768) and mask.shape == (1, 252)


U = 2.0**-24  # float32 unit roundoff: half of float32's epsilon 1.19e-7


def _cnn_loss_and_grads(impl: str, x, norm: str):
  cfg = cnn_config("tiny")
  cfg.norm, cfg.impl = norm, impl
  model = resnet_from_config(cfg)
  variables = nn.meta.unbox(model.init(jax.random.key(0), x))
  w = jnp.asarray(np.random.default_rng(8).standard_normal((x.shape[0], 2, 2, model.out_channels)), jnp.float32)

  def loss(params, x):
    out, upd = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return (out * w).sum(), (upd, out)

  (_, (upd, out)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
  # The loss as the float64 sum of this impl's float32 outputs: the jitted float32 sum of 1536 terms would
  # add its own rounding (up to 1536u of sum|terms|) to what the impls are compared on.
  return float(np.sum(np.asarray(out, np.float64) * np.asarray(w, np.float64))), out, w, upd, grads


def _float32_bounds(impl: str, x, norm: str) -> tuple[float, float]:
  """(forward, gradient) bounds on how far the `cpu` and `generic` impls can differ, relative to the scale of
  the outputs and of each gradient, counted from the sums they evaluate differently (see the test)."""
  cfg = cnn_config("tiny")
  cfg.norm, cfg.impl = norm, impl
  model = resnet_from_config(cfg)
  variables = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), x)))
  _, captured = jax.eval_shape(
      lambda v: model.apply(
          v,
          x,
          train=True,
          mutable=["batch_stats", "intermediates"],
          capture_intermediates=lambda m, _: isinstance(m, (Conv, Norm)),
      ),
      variables,
  )
  fwd, bwd = 0, 2 * 4  # the stem max-pool backward: an input lies in up to 2x2 of the 3x3 stride-2 windows
  flat = traverse_util.flatten_dict(captured["intermediates"])
  kernels = traverse_util.flatten_dict(variables["params"])
  for path, (y,) in flat.items():
    module = path[:-1]
    positions = int(np.prod(y.shape[:-1]))
    kernel = kernels.get(module + ("kernel",))
    if kernel is not None and kernel.shape[:2] == (1, 1):
      fwd += 2 * kernel.shape[2]  # output: a sum over C_in, as a matmul or as a convolution
      bwd += 2 * (kernel.shape[3] + positions)  # input gradient over C_out; kernel gradient over positions
    elif kernel is None and norm == "bn":
      bwd += 2 * positions  # batch-norm backward: closed form (cpu) or autodiff, sums over the positions
  return fwd * U, (fwd + bwd) * U


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_cnn_impls_agree_in_training(norm):
  """`cpu` (1x1 convs as matmuls, explicit max-pool and batch-norm gradients) is a way of writing the
  model, not a different model: loss, batch-norm updates, parameter and input gradients match
  `generic`'s, on an input where many stem max-pool windows tie.

  Tolerances from float32 arithmetic, not from one machine. The impls sum the same terms in different
  orders: every 1x1 conv (forward over C_in; backward over C_out and, for the kernel, over the N*H*W
  positions), the stem max-pool backward (up to 4 windows add into an input) and, with `bn`, every
  batch-norm backward (over its positions). The batch-norm forward uses the same formulas and the max-pool
  forward picks values exactly, so they add nothing. XLA chooses the order per
  CPU (AVX2 and AVX-512 split a sum differently), so no two orders may be assumed equal: a K-term float32
  sum in any order is within K*u of the exact sum relative to sum|terms| (Higham, Accuracy and Stability of
  Numerical Algorithms, section 3.1; u = 2^-24), and two orders differ by at most 2*K*u. Batch-normalised,
  He-initialised layers keep activations and gradients at one scale, so these differences add along the
  path: `_float32_bounds` sums them (worst case, every rounding of one sign: a factor sqrt(K) above the
  typical error, which also covers a gradient sum that cancels below its terms' scale). The tiny ResNet:
  forward 600u = 3.6e-5; gradients, and the batch-norm statistics (a mean cancels like a gradient sum),
  1.5e-3 (bn), 5.6e-4 (gn) of each leaf's largest value. A wrong max-pool tie or a wrong term in the
  batch-norm gradient moves a leaf by 1e-2 or more of its scale.

  The loss, sum(out * w) over 1536 terms, cancels (|loss| is ~1/150 of S = sum|out * w|): its float32 error
  is bounded against S, not against the loss. An rtol of 1e-5 on the loss failed on an AMD EPYC (AVX2),
  a difference of about 2u S. The impls are bit-identical on no backend (their 1x1 convs are different XLA
  operations), so no exact comparison belongs here; the pooled values are compared exactly (a max does not
  round, on any backend) in test_first_max_pool_gradient_matches_torch.
  """
  rng = np.random.default_rng(7)
  # Half the image constant: many equal values reach the stem max-pool windows.
  x = rng.standard_normal((3, 64, 64, 3)).astype(np.float32)
  x[:, :32] = 0.25
  x = jnp.asarray(x)
  fwd_bound, grad_bound = _float32_bounds("cpu", x, norm)
  ref, ref_out, w, ref_upd, ref_grads = _cnn_loss_and_grads("generic", x, norm)
  got, _, _, got_upd, got_grads = _cnn_loss_and_grads("cpu", x, norm)
  scale = float(np.sum(np.abs(np.asarray(ref_out, np.float64) * np.asarray(w, np.float64))))
  assert abs(got - ref) <= fwd_bound * scale, (got, ref, scale, fwd_bound)
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path((got_upd, got_grads)), jax.tree.leaves((ref_upd, ref_grads))
  ):
    leaf_scale = float(np.abs(np.asarray(b)).max()) or 1.0
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=0, atol=grad_bound * leaf_scale, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.slow
def test_first_max_pool_gradient_matches_torch():
  """The explicit max-pool backward routes each window's gradient to its first maximum, as torch does:
  checked on integer-valued inputs where most windows tie."""
  from pixelbert_jax.models.cpu_kernels import max_pool_first_max

  rng = np.random.default_rng(9)
  x = rng.integers(0, 3, (2, 9, 10, 4)).astype(np.float32)
  g = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
  y, vjp = jax.vjp(lambda v: max_pool_first_max(v, 3, 2, 1), jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  yt.backward(torch.from_numpy(g).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
  ref = jax.vjp(lambda v: nn.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))), jnp.asarray(x))[1]
  np.testing.assert_allclose(np.asarray(dx), np.asarray(ref(jnp.asarray(g))[0]), rtol=0, atol=1e-6)


def test_cnn_impl_is_validated():
  from pixelbert_jax.models.resnet import resolve_impl

  assert resolve_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "generic")
  assert resolve_impl("generic") == "generic"
  with pytest.raises(ValueError, match="cnn.impl 'cudnn'"):
    resolve_impl("cudnn")


@pytest.mark.slow
def test_batch_norm_gradient_includes_the_statistics():
  """The closed-form backward also carries gradients that reach x through the returned mean and var."""
  from pixelbert_jax.models.cpu_kernels import batch_norm_train

  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 5)) * 2 + 1, jnp.float32)
  scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32), jnp.asarray(rng.standard_normal(5), jnp.float32)
  wy, wm, wv = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(2, 3, 4, 5), (5,), (5,)])

  def reference(x, scale, bias):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias, mean, var

  def objective(fn):
    return lambda *a: sum(jnp.sum(o * w) for o, w in zip(fn(*a), (wy, wm, wv)))

  got = jax.grad(objective(lambda *a: batch_norm_train(*a, 1e-5)), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(objective(reference), argnums=(0, 1, 2))(x, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
