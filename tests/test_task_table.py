"""Every row of the task table names things that exist: a misspelt path would otherwise surface only when a
run (or a conversion) of that task reaches it."""

import pytest

from pixelbert_jax import task_table
from pixelbert_jax.data import schemas
from pixelbert_jax.data.task_data import TaskData


@pytest.mark.parametrize("name", tuple(task_table.TASKS))
def test_every_hook_of_a_row_resolves(name):
  spec = task_table.spec(name)
  assert spec.name == name and spec.schema in schemas.SCHEMAS
  for path in (spec.model, spec.examples, spec.evaluate, spec.head_rules):
    assert callable(task_table.resolve(path)), path
  assert task_table.resolve(spec.module).__name__ == spec.module
  assert spec.images[0] == "image" and all(key.startswith("image") for key in spec.images)
  assert all(isinstance(getattr(TaskData, key, None), property) for key in spec.data_sizes), spec.data_sizes


@pytest.mark.slow  # importing torch and transformers
@pytest.mark.parametrize("name", tuple(task_table.TASKS))
def test_every_row_has_torch_heads(name):
  pytest.importorskip("torch")
  from pixelbert_jax.convert.torch_model import TorchHeads

  assert isinstance(task_table.resolve(task_table.spec(name).torch_heads), TorchHeads)


def test_an_unknown_task_is_one_line_naming_the_known_ones():
  with pytest.raises(ValueError, match=r"^unknown task 'vqa3'; known: pretrain, vqa, nlvr2, retrieval$"):
    task_table.spec("vqa3")
