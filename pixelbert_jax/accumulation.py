"""Micro-batches per optimizer step (`config.optim.grad_accum_steps`), and -1: the fewest that fit.

`config.batch_size` is the global batch of one optimizer step. With `grad_accum_steps` k the step cuts it
into k micro-batches and sums their gradients (train_step.py), so only one micro-batch's activations are
alive at a time: the paper's batch of 4096 on a slice where 4096 / devices does not fit.

k = -1 asks for the fewest k that fit, found at start-up without running anything: each candidate k (those
that leave a whole number of examples per device) is compiled for the largest bucket, smallest k first, and
XLA's own account of the compiled step's memory (`memory_analysis`) is compared with the device's memory.
An accelerator refuses a program that is too large while compiling it (RESOURCE_EXHAUSTED), which also
counts as "does not fit". The device's memory is `config.device_memory_gib` where it is > 0, else what the
device reports (`memory_stats()['bytes_limit']` on GPU and TPU). The CPU reports none, so there -1 means one
micro-batch unless `device_memory_gib` sets a budget.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections

from pixelbert_jax import config_checks, partitioning

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes of a compiled step, from XLA's memory analysis."""

  arguments: int
  outputs: int
  aliased: int  # outputs that reuse a donated argument's buffer (the train state)
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    """What the device must hold at once: every argument, the outputs that do not reuse one, the scratch
    space XLA planned, and the program."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def step_memory(compiled) -> StepMemory:
  m = compiled.memory_analysis()
  return StepMemory(
      arguments=int(m.argument_size_in_bytes),
      outputs=int(m.output_size_in_bytes),
      aliased=int(m.alias_size_in_bytes),
      temporaries=int(m.temp_size_in_bytes),
      code=int(m.generated_code_size_in_bytes),
  )


def out_of_memory(e: BaseException) -> bool:
  """XLA's refusal of a program larger than the device (raised while compiling on GPU and TPU)."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds available" in text


def candidates(batch_size: int, data_parallel: int) -> list[int]:
  """Every k, ascending, that leaves a whole number of examples per device in each micro-batch."""
  if batch_size % data_parallel:
    return []
  per_device = batch_size // data_parallel
  return [k for k in range(1, per_device + 1) if per_device % k == 0]


def device_memory_bytes(config: ml_collections.ConfigDict, device: jax.Device) -> int | None:
  budget = float(config.get("device_memory_gib", 0.0) or 0.0)
  if budget > 0:
    return int(budget * GIB)
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - a backend without memory statistics (CPU, a deviceless TPU topology)
    stats = None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, k: int) -> None:
  """A ConfigError naming the keys when `batch_size` does not split into k micro-batches on the devices."""
  dp = partitioning.data_parallel_size(mesh)
  if k < 1 or config.batch_size % (dp * k):
    raise config_checks.ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the data-parallel devices ({dp}) times "
        f"config.optim.grad_accum_steps={k}: each device takes a whole number of examples per micro-batch"
    )


def resolve(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, steps_per_epoch: int) -> int:
  """`config.optim.grad_accum_steps` as a number of micro-batches: as given, or the fewest that fit (-1)."""
  from pixelbert_jax import model_context  # the step context imports this module's users

  k = int(config.optim.grad_accum_steps)
  if k != -1:
    check(config, mesh, k)
    return k
  device = mesh.devices.flat[0]
  budget = device_memory_bytes(config, device)
  if budget is None:
    logging.info(
        "optim.grad_accum_steps=-1: %s reports no memory limit and config.device_memory_gib is 0, so one "
        "micro-batch per step",
        device.platform,
    )
    return 1
  dp = partitioning.data_parallel_size(mesh)
  bucket = model_context.largest_bucket(config)
  tried = []
  for k in candidates(config.batch_size, dp):
    context = model_context.StepContext(config, mesh, steps_per_epoch=steps_per_epoch, accum_steps=k)
    try:
      need = step_memory(context.compile_step(config.batch_size, bucket)).total
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error type
      if not out_of_memory(e):
        raise
      tried.append(f"{k}: refused by the compiler")
      continue
    per_device = config.batch_size // (dp * k)
    if need <= budget:
      logging.info(
          "optim.grad_accum_steps=-1 -> %d micro-batches of %d per device: the step needs %.2f GiB of %.2f GiB",
          k,
          per_device,
          need / GIB,
          budget / GIB,
      )
      return k
    tried.append(f"{k}: {need / GIB:.2f} GiB")
  raise ValueError(
      f"config.batch_size={config.batch_size} does not fit {budget / GIB:.2f} GiB per device with any "
      f"optim.grad_accum_steps (tried {'; '.join(tried) or 'none: the batch does not split over the devices'})"
  )
