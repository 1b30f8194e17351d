"""The model context: what training, evaluation, prediction and compile-only planning share, with no data.

`ModelContext` holds the config, the mesh, the task module, the Flax model, the XLA options and the
abstract variables with their shardings; `evaluate` restores a checkpoint into it and builds no optimizer.
`StepContext` adds the optimizer, the abstract train state and its shardings, and the jitted step:
`train.Trainer` and `aot.py` (compiling for a TPU that is not attached) build exactly this object, so
the program that is planned is the one that trains. Neither opens a dataset: the config's sizes must be
resolved already (`-1` vocabulary or answer counts are read off the run's data by
`data.task_data.TaskData.resolve_sizes`, or set by the caller, as aot.py does from its flags).
"""

from __future__ import annotations

import functools
import flax.linen as nn
import jax
import ml_collections
import optax

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import optim, partitioning, tasks, xla_options
from pixelbert_jax import train_step as train_step_lib
from pixelbert_jax.models.build import build_model
from pixelbert_jax.train_step import State


class ModelContext:
  """The model of `config` on `mesh`: module, task, abstract variables and their shardings."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.task = tasks.get_task(config.task)
    self.model = build_model(config.model, config.task)
    self.compiler_options = xla_options.compiler_options(mesh.devices.flat[0].platform)
    self._init = functools.partial(
        train_step_lib.init_state, model=self.model, task_name=config.task, text_len=config.data.max_text_len
    )
    # Variables alone (no optimizer): what evaluation, prediction and conversion restore.
    boxed = jax.eval_shape(lambda r: self._init(r, tx=optax.identity()), jax.random.PRNGKey(0))
    variables = {k: boxed[k] for k in ("params", "batch_stats")}
    self.abstract_variables = nn.unbox(variables)
    self.variable_shardings = partitioning.logical_to_shardings(
        self.abstract_variables, nn.get_partition_spec(variables), mesh
    )

  def restore_variables(self, checkpoint: str, step: int | None = None) -> tuple[State, int]:
    """{'step', 'params', 'batch_stats'} of a checkpoint (its newest step, or `step`), placed with this
    context's shardings after their shapes are compared with the model's (one line naming the first
    mismatch). Only the model's variables are read: no optimizer state."""
    variables, _, found = ckpt_lib.load_model_variables(checkpoint, step)
    return {"step": found, **self.place_variables(variables, f"checkpoint {checkpoint}")}, found

  def place_variables(self, variables: dict, what: str) -> dict:
    """{'params', 'batch_stats'} read elsewhere (host arrays), placed with this context's shardings after
    their shapes are compared with the model's; `what` names their source in the one-line mismatch."""
    placed = {}
    for collection in ("params", "batch_stats"):
      ckpt_lib.compare_shapes(
          self.abstract_variables[collection], variables.get(collection, {}), what=f"{what} ({collection})"
      )
      placed[collection] = jax.device_put(variables.get(collection, {}), self.variable_shardings[collection])
    return placed


class StepContext(ModelContext):
  """A ModelContext with the optimizer, the train state's abstract shapes and shardings, and the jitted
  step. `steps_per_epoch` (optimizer steps) places the epoch-based learning-rate decay; it changes no
  shape, so a compile-only plan may pass any value. `accum_steps`: micro-batches per optimizer step
  (resolved, >= 1; train_step.py explains how they are summed)."""

  def __init__(
      self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, steps_per_epoch: int, accum_steps: int
  ):
    super().__init__(config, mesh)
    self.accum_steps = int(accum_steps)
    self.tx, self.schedules = optim.make_optimizer(
        config, self.abstract_variables["params"], steps_per_epoch=max(1, steps_per_epoch)
    )
    init = functools.partial(self._init, tx=self.tx)
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    abstract_state = nn.unbox(abstract_boxed)
    self.state_shardings = partitioning.logical_to_shardings(
        abstract_state, nn.get_partition_spec(abstract_boxed), mesh
    )
    self._init_state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=self.state_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings
    )
    step = functools.partial(
        train_step_lib.train_step,
        model=self.model,
        task=self.task,
        tx=self.tx,
        loss_weights=dict(config.get("loss", {})),
        update_batch_stats=config.model.cnn.norm == "bn",
        accum_steps=self.accum_steps,
    )
    self.train_step = jax.jit(
        step,
        in_shardings=(self.state_shardings, None),
        out_shardings=(self.state_shardings, partitioning.replicated(mesh)),
        donate_argnums=0,
        compiler_options=self.compiler_options,
    )

  def init_state(self, seed: int) -> State:
    with partitioning.activate(self.mesh):
      return self._init_state(jax.random.PRNGKey(seed))

  def abstract_batch(self, batch_size: int, image_hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of one global training batch of `batch_size` images of `image_hw`
    (a bucket): the task's `batch_spec`, as the data pipeline delivers it."""
    spec = self.task.batch_spec(self.config, batch_size, image_hw)
    return {
        k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=partitioning.batch_sharding(self.mesh, len(s.shape)))
        for k, s in spec.items()
    }

  def lower_step(self, batch_size: int, image_hw: tuple[int, int]):
    """The step lowered for one batch shape (StableHLO, not yet compiled): its `cost_analysis()` counts the
    FLOPs before XLA's optimisations."""
    with partitioning.activate(self.mesh):
      return self.train_step.lower(self.abstract_state, self.abstract_batch(batch_size, image_hw))

  def compile_step(self, batch_size: int, image_hw: tuple[int, int]):
    """The step compiled ahead of time for one batch shape: `memory_analysis()` and `cost_analysis()` of
    what would run. Raises XLA's RESOURCE_EXHAUSTED error when it does not fit the device."""
    lowered = self.lower_step(batch_size, image_hw)
    with partitioning.activate(self.mesh):
      return lowered.compile()


def largest_bucket(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The bucket with the most pixels: the batch shape that needs the most memory."""
  return tuple(max((tuple(int(v) for v in b) for b in config.data.buckets), key=lambda hw: hw[0] * hw[1]))
