"""`aot --screen`: a fit judged from XLA's buffer assignment, without generating code.

libtpu's HBM is capped (aot.main), so XLA refuses every larger program right after its buffer assignment and
names the temporaries it needs. A program's need is then those temporaries, plus the arguments counted from
their shapes and shardings, plus SLACK for what a full compile adds; FLOPs come from the lowered program.
"""

from __future__ import annotations

import math
import re

from pixelbert_jax.tpu_slices import PlanError

GIB = 1 << 30
# What a full compile adds to a screened program's need (the buffer assignment's temporaries plus the
# arguments counted from their shapes): later passes' buffers, the arguments' tile padding, and the code,
# which a screened compile never generates. Measured on r50 pre-training (bench/results/tpu_plan/): the
# temporaries grew by about 3% (32 x 1 per device on a v4-8) and 9% (16 x 16 on a v4-32), the code took
# 0.36 GiB. A screened program fits when temporaries x (1 + SLACK) + arguments + CODE_GIB fit the device.
SLACK = 0.10
CODE_GIB = 0.5


def temporaries_bytes(message: str) -> float | None:
  """XLA's 'the total memory required for HLO temporaries (20.73G) exceeds available HBM' -> bytes."""
  m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  return float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1) if m else None


def state_bytes_per_device(context) -> int:
  """Bytes of the train state one device holds, from the state's shardings (FSDP and tensor axes split it)."""
  import jax

  leaves = jax.tree.leaves(context.abstract_state)
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in leaves)


def batch_input_bytes(config, mesh, batch_size: int) -> int:
  """Bytes per device of one batch's inputs: an accumulated step holds all its micro-batches' inputs."""
  from pixelbert_jax import model_context, partitioning, tasks

  spec = tasks.get_task(config.task).batch_spec(config, batch_size, model_context.largest_bucket(config))
  return sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.values()) // partitioning.data_parallel_size(mesh)


def judge(refusal: str, arguments: int, usable: float) -> tuple[bool, dict, str]:
  """(fits, memory in GiB, why not) from a capped compile's refusal line and the arguments' bytes, against
  the chip's usable HBM."""
  temporaries = temporaries_bytes(refusal)
  if temporaries is None:
    raise PlanError(f"--screen: XLA's refusal names no HLO temporaries, so it cannot be judged: {refusal[:200]}")
  slack = SLACK * temporaries + CODE_GIB * GIB
  total = temporaries + slack + arguments
  mem = {"arguments": arguments / GIB, "temporaries": temporaries / GIB, "slack": slack / GIB, "total": total / GIB}
  fits = total <= usable
  return fits, mem, "" if fits else f"screened: {total / GIB:.2f} GiB needed of {usable / GIB:.2f}"


def lowered_flops(lowered) -> float:
  """FLOPs of the whole (global, unpartitioned) lowered program, by XLA's HLO cost analysis run on the CPU
  client: a deviceless TPU lowering has no cost analysis of its own (`Lowered.cost_analysis()` is None)."""
  import jax
  from jax._src.lib import xla_client  # the one entry point to XLA's HloCostAnalysis for a module

  cost = xla_client._xla.hlo_module_cost_analysis(
      jax.devices("cpu")[0].client, lowered.compiler_ir("hlo").get_hlo_module()
  )
  return float(cost["flops"])
