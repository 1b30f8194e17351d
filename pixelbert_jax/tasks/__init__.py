"""One module per task for training (pure JAX: what the model is fed, the loss, the metrics) and one for its
evaluation (held-out splits, official metrics, result files). task_table.py names both for each task.

The training module must not import the data pipeline: `train_step.train_step` and the benchmarks use it on
machines that have no dataset. `Task` and `Evaluate` are the interfaces the trainer relies on; every task
provides all of it (docs/contracts.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

from pixelbert_jax import task_table

if TYPE_CHECKING:
  import jax
  from etils import epath

Metrics = dict[str, tuple[Any, Any]]  # name -> (sum, count), summed over batches and divided at the end


@runtime_checkable
class Task(Protocol):
  """A task's training module (a module satisfies it by defining these functions)."""

  def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
    """The keyword arguments of `model.apply` from a batch (may include `method`)."""

  def loss_and_metrics(
      self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], **loss_weights
  ) -> tuple[jax.Array, Metrics]:
    """The scalar loss (mean over real examples, weighted by example_mask) and (sum, count) metrics;
    `loss_weights` are `config.loss`, and a task takes the ones it knows."""

  def batch_spec(self, config: Any, batch_size: int, image_hw: tuple[int, int]) -> dict[str, Any]:
    """The keys, shapes and dtypes (jax.ShapeDtypeStruct) of a training batch as the data pipeline delivers
    it, from the config alone: what a compile-only plan (aot.py) feeds the step."""


# evaluate(context, data, state, workdir) -> {"eval/<name>": value}: runs the held-out split of `data` (the
# run's data/task_data.py TaskData) with the model of `context` (model_context.ModelContext), writes result
# files under WORKDIR/results/ (process 0), returns the metrics that train.py logs.
Evaluate = Callable[[Any, Any, dict, "epath.Path"], dict[str, float]]


def get_task(name: str) -> Task:
  """The training module of task `name` (task_table.py)."""
  module = task_table.resolve(task_table.spec(name).module)
  if not isinstance(module, Task):
    raise TypeError(
        f"{module.__name__} does not define the Task interface (model_inputs, loss_and_metrics, batch_spec)"
    )
  return module


def get_evaluate(name: str) -> Evaluate:
  """The evaluation function of task `name` (task_table.py)."""
  return task_table.resolve(task_table.spec(name).evaluate)
