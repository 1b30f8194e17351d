"""The package's import graph: no cycles (a lazy import inside a function counts too).

A cycle makes the import order matter and hides which module owns what; `from x import y` inside a
function is the usual way one creeps in, so the walk reads every import statement of every module with
`ast` (no module is executed).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import pixelbert_jax

PACKAGE_DIR = pathlib.Path(pixelbert_jax.__file__).parent


def module_files() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    parts = ("pixelbert_jax",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imported_modules(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Modules of the package that `name` imports; `from pkg import sub` counts as importing pkg.sub."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return {m for m in found if m in known and m != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan, iteratively)."""
  index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], 0
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      v, children = work[-1]
      w = next(children, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = counter
          counter += 1
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(graph[w]))))
        elif w in on_stack:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        component = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          component.append(w)
          if w == v:
            break
        if len(component) > 1:
          cycles.append(sorted(component))
  return cycles


def test_the_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert import_cycles(graph) == [["a", "b", "c"]]
  assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_walk_sees_lazy_and_relative_imports(tmp_path):
  pkg = tmp_path / "p"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "m.py").write_text("def f():\n  from . import n\n  from p.o import x\n")
  known = {"p", "p.m", "p.n", "p.o"}
  assert imported_modules("p.m", pkg / "m.py", known) == {"p.n", "p.o"}


def test_no_import_cycle_inside_the_package():
  files = module_files()
  assert len(files) > 40, "the walk found too few modules: is the package layout what this test expects?"
  graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
  assert sum(map(len, graph.values())) > 100, "the walk found too few imports"
  assert import_cycles(graph) == [], "import cycles inside pixelbert_jax"


@pytest.mark.slow
def test_the_train_step_and_the_task_losses_import_without_the_data_pipeline():
  """What bench/ and a bare accelerator host import: the step and its context, the tasks' losses, the model,
  the configs."""
  import subprocess
  import sys

  code = (
      "import sys; import pixelbert_jax.train_step, pixelbert_jax.tasks.pretrain, pixelbert_jax.tasks.vqa, "
      "pixelbert_jax.tasks.nlvr2, pixelbert_jax.tasks.retrieval, pixelbert_jax.models.build; "
      "print(sorted(m for m in sys.modules if m in ('grain', 'tensorflow_datasets', 'transformers') "
      "or m.startswith('pixelbert_jax.data')))"
  )
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == "[]", run.stdout
  # The step's context (what the trainer and bench/ build) checks configs against the data's pure modules
  # (data.config, data.synthetic), but still opens no data.
  code = (
      "import sys; import pixelbert_jax.model_context, pixelbert_jax.accumulation, pixelbert_jax.config_files; "
      "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grain', 'tensorflow_datasets', 'tensorflow') "
      "or m in ('pixelbert_jax.data.pipeline', 'pixelbert_jax.data.task_data')))"
  )
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == "[]", run.stdout


def test_the_core_imports_no_demo_code():
  """pixelbert_jax/demo/ holds what only the synthetic world needs: the trainer reaches it only through the
  name in `config.init_hook` (init_hooks.py), and no other module imports it, directly or through another."""
  files = module_files()
  graph = {name: imported_modules(name, path, set(files)) for name, path in files.items()}
  demo = {m for m in files if m == "pixelbert_jax.demo" or m.startswith("pixelbert_jax.demo.")}
  assert "pixelbert_jax.demo.warm_start" in demo and "pixelbert_jax.demo.grounding" in demo
  direct = sorted(f"{name} -> {m}" for name, deps in graph.items() if name not in demo for m in deps & demo)
  assert direct == [], "core modules import pixelbert_jax.demo"
  reached, todo = set(), ["pixelbert_jax.train", "pixelbert_jax.main"]
  while todo:
    for m in graph[todo.pop()] - reached:
      reached.add(m)
      todo.append(m)
  assert not reached & demo, sorted(reached & demo)
