"""ResNet / ResNeXt backbone (NHWC) whose module tree mirrors torchvision's, returning the stride-32 C5 map.

Names follow torchvision (`conv1`, `bn1`, `layer1/0/conv1`, ..., `layer1/0/downsample/0`) so the weight
mapping in `pixelbert_jax.convert.mapping` is one rule per tensor. Normalisation is selectable:
`frozen_bn` (pretrained statistics and affine used as constants), `bn` (batch statistics in training,
running averages updated when `batch_stats` is mutable) or `gn` (group norm, no statistics).

`impl` picks how the same computation is written for XLA (parameters, outputs and gradients are the
same either way, up to float rounding): `generic` (every conv a `lax.conv_general_dilated`, the stem
max-pool `lax.reduce_window`, gradients by autodiff), `cpu` (1x1 convs as 2D matmuls; explicit backward
passes for the stem max-pool and for batch norm with batch statistics, from cpu_kernels.py), or `auto`
(`cpu` on the CPU backend, `generic` elsewhere). On XLA's CPU backend the weight gradient of a 1x1 convolution is a
layout-transposing convolution about 10x slower than the equivalent `[NHW, Cin]^T @ [NHW, Cout]`
matmul, the max-pool gradient (select-and-scatter, lowered with index iotas) costs 20x its forward, and
autodiff of batch norm makes more passes over the activations than its closed-form gradient; see
bench/HISTORY.md, items 11-14.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelbert_jax.models.cpu_kernels import batch_norm_train, max_pool_first_max

NORM_KINDS = ("frozen_bn", "bn", "gn")
CNN_IMPLS = ("auto", "generic", "cpu")
CONV_AXES = (None, None, "conv_in", "conv_out")
ACTIVATION_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")
EXPANSION = 4  # torchvision Bottleneck.expansion

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_impl(impl: str) -> str:
  """`auto` -> `cpu` when JAX's default backend is the CPU, else `generic` (GPU/TPU, where the CPU forms
  were not measured to help). Decided at trace time from the default backend, so a program placed on
  the CPU of a GPU machine gets `generic`: the same numbers, only the CPU-tuned form is missed.
  `generic` and `cpu` pass through; anything else is an error."""
  if impl not in CNN_IMPLS:
    raise ValueError(f"unknown cnn.impl {impl!r}; expected one of {CNN_IMPLS}")
  if impl == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "generic"
  return impl


class Conv(nn.Module):
  """torchvision-style conv: symmetric padding kernel // 2, no bias; kernel [k, k, Cin / groups, Cout]
  named `kernel`, as `nn.Conv` names it, so checkpoints do not depend on `impl`."""

  features: int
  kernel: int
  stride: int
  groups: int
  impl: str  # resolved: 'generic' | 'cpu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    if cin % self.groups:
      raise ValueError(f"{self.name}: {cin} input channels not divisible by groups={self.groups}")
    k = self.param(
        "kernel",
        nn.with_logical_partitioning(_conv_init, CONV_AXES),
        (self.kernel, self.kernel, cin // self.groups, self.features),
        jnp.float32,
    )
    x, k = x.astype(self.dtype), k.astype(self.dtype)
    s = self.stride
    if self.impl == "cpu" and self.kernel == 1 and self.groups == 1:
      # Autodiff of a 2D matmul gives the weight gradient as one [NHW, Cin]^T @ [NHW, Cout] matmul.
      x = x[:, ::s, ::s, :]
      n, h, w, _ = x.shape
      return (x.reshape(n * h * w, cin) @ k[0, 0]).reshape(n, h, w, self.features)
    pad = self.kernel // 2
    return jax.lax.conv_general_dilated(
        x,
        k,
        (s, s),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.groups,
    )


class Norm(nn.Module):
  """Batch norm (frozen or trainable) or group norm, computed in float32, torchvision semantics."""

  kind: str
  gn_groups: int = 32
  eps: float = 1e-5
  momentum: float = 0.1
  dtype: Any = jnp.float32
  impl: str = "generic"  # resolved: 'generic' | 'cpu' (closed-form batch-norm gradient)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind not in NORM_KINDS:
      raise ValueError(f"unknown norm {self.kind!r}; expected one of {NORM_KINDS}")
    c = x.shape[-1]
    vec = lambda init: nn.with_logical_partitioning(init, ("norm",))
    scale = self.param("scale", vec(nn.initializers.ones), (c,), jnp.float32)
    bias = self.param("bias", vec(nn.initializers.zeros), (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.kind == "gn":
      if c % self.gn_groups:
        raise ValueError(f"group norm: {c} channels not divisible by gn_groups={self.gn_groups}")
      g = xf.reshape(xf.shape[:-1] + (self.gn_groups, c // self.gn_groups))
      mean = g.mean(axis=(1, 2, 4), keepdims=True)
      var = g.var(axis=(1, 2, 4), keepdims=True)
      y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(xf.shape) * scale + bias
      return y.astype(self.dtype)
    ra_mean = self.variable("batch_stats", "mean", vec(nn.initializers.zeros), None, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", vec(nn.initializers.ones), None, (c,), jnp.float32)
    if self.kind == "frozen_bn":
      # Pretrained affine and statistics are constants: no gradient ever reaches them.
      scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)
      mean, var = ra_mean.value, ra_var.value
    elif train:
      if self.impl == "cpu":
        y, mean, var = batch_norm_train(xf, scale, bias, self.eps)
      else:
        mean = xf.mean(axis=(0, 1, 2))
        var = xf.var(axis=(0, 1, 2))
        y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        n = xf.size // c
        unbiased = var * n / max(n - 1, 1)  # torchvision keeps the unbiased variance
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
      return y.astype(self.dtype)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias
    return y.astype(self.dtype)


class Downsample(nn.Module):
  """torchvision's `downsample = Sequential(conv1x1, norm)`: children named `0` and `1`."""

  features: int
  stride: int
  norm: Any  # a functools.partial(Norm, ...) without name
  impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    x = Conv(self.features, 1, self.stride, 1, self.impl, self.dtype, name="0")(x)
    return self.norm(name="1")(x, train)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv)."""

  planes: int
  stride: int
  groups: int
  width_per_group: int
  downsample: bool
  norm: Any
  impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    if width <= 0:
      raise ValueError(
          f"bottleneck width is 0 (planes={self.planes}, width_per_group="
          f"{self.width_per_group}, groups={self.groups})"
      )
    out = Conv(width, 1, 1, 1, self.impl, self.dtype, name="conv1")(x)
    out = nn.relu(self.norm(name="bn1")(out, train))
    out = Conv(width, 3, self.stride, self.groups, self.impl, self.dtype, name="conv2")(out)
    out = nn.relu(self.norm(name="bn2")(out, train))
    out = Conv(self.planes * EXPANSION, 1, 1, 1, self.impl, self.dtype, name="conv3")(out)
    out = self.norm(name="bn3")(out, train)
    identity = x
    if self.downsample:
      identity = Downsample(self.planes * EXPANSION, self.stride, self.norm, self.impl, self.dtype, name="downsample")(
          x, train
      )
    return nn.relu(out + identity)


class ResStage(nn.Module):
  """torchvision's `layerN`: blocks named `0`, `1`, ..."""

  blocks: int
  planes: int
  stride: int
  in_channels: int
  groups: int
  width_per_group: int
  norm: Any
  impl: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    for i in range(self.blocks):
      first = i == 0
      needs_proj = first and (self.stride != 1 or self.in_channels != self.planes * EXPANSION)
      x = Bottleneck(
          self.planes,
          self.stride if first else 1,
          self.groups,
          self.width_per_group,
          needs_proj,
          self.norm,
          self.impl,
          self.dtype,
          name=str(i),
      )(x, train)
    return x


class ResNet(nn.Module):
  """Bottleneck ResNet / ResNeXt trunk up to C5 (stride 32), NHWC in, NHWC out."""

  stage_sizes: Sequence[int]
  groups: int = 1
  width_per_group: int = 64
  stem_width: int = 64
  base_planes: int = 64
  norm: str = "frozen_bn"
  gn_groups: int = 32
  norm_eps: float = 1e-5
  bn_momentum: float = 0.1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @property
  def out_channels(self) -> int:
    return self.base_planes * 2 ** (len(self.stage_sizes) - 1) * EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    impl = resolve_impl(self.impl)
    norms = _NormFactory(self.norm, self.gn_groups, self.norm_eps, self.bn_momentum, self.dtype, impl)
    x = x.astype(self.dtype)
    x = Conv(self.stem_width, 7, 2, 1, impl, self.dtype, name="conv1")(x)
    x = nn.relu(norms("bn1")(x, train))
    if impl == "cpu":
      x = max_pool_first_max(x, 3, 2, 1)
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = self.stem_width
    for i, blocks in enumerate(self.stage_sizes):
      planes = self.base_planes * 2**i
      x = ResStage(
          blocks,
          planes,
          1 if i == 0 else 2,
          in_channels,
          self.groups,
          self.width_per_group,
          norms,
          impl,
          self.dtype,
          name=f"layer{i + 1}",
      )(x, train)
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
      in_channels = planes * EXPANSION
    return x


class _NormFactory:
  """A hashable `Norm` constructor passed down to blocks (module attributes must be hashable)."""

  def __init__(self, kind, gn_groups, eps, momentum, dtype, impl):
    self._args = (kind, gn_groups, eps, momentum, dtype, impl)

  def __call__(self, name: str) -> Norm:
    return Norm(*self._args, name=name)

  def __hash__(self):
    return hash(self._args)

  def __eq__(self, other):
    return isinstance(other, _NormFactory) and self._args == other._args


def resnet_from_config(cnn_cfg, dtype: Any = jnp.float32) -> ResNet:
  """The backbone described by `model_config(...).cnn`."""
  return ResNet(
      stage_sizes=tuple(cnn_cfg.stage_sizes),
      groups=cnn_cfg.groups,
      width_per_group=cnn_cfg.width_per_group,
      stem_width=cnn_cfg.stem_width,
      base_planes=cnn_cfg.base_planes,
      norm=cnn_cfg.norm,
      gn_groups=cnn_cfg.gn_groups,
      norm_eps=cnn_cfg.get("norm_eps", 1e-5),
      bn_momentum=cnn_cfg.get("bn_momentum", 0.1),
      impl=cnn_cfg.get("impl", "auto"),
      dtype=dtype,
  )
