"""Orbax checkpoints of a training run: save, resume, partial restore for fine-tuning.

One checkpoint step holds four items, so that each reader takes only what it needs:
  `params` — {'params', 'batch_stats'}: the model (what fine-tuning and PyTorch export read),
  `train`  — {'step', 'opt_state', 'rng'}: the rest of the train state,
  `data`   — the input pipeline's iterator state (JSON), so a resumed run sees exactly the next batch,
  `meta`   — task, model config and vocabulary size (JSON), so a checkpoint describes itself.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

ITEMS = ("params", "train", "data", "meta")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    # Registered up front so that a fresh process can read item metadata before any save or restore.
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not fit the model the config builds."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
    return {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in flat.items()}


def compare_shapes(expected: Any, found: Any, *, what: str, allow_missing: bool = False,
                   allow_extra: bool = False) -> None:
    """Raises CheckpointMismatchError naming every parameter whose presence or shape differs."""
    exp, got = _flat_shapes(expected), _flat_shapes(found)
    problems = [f"{k}: config expects {exp[k]}, checkpoint has {got[k]}"
                for k in sorted(exp.keys() & got.keys()) if exp[k] != got[k]]
    if not allow_missing:
        problems += [f"{k}: missing from the checkpoint" for k in sorted(exp.keys() - got.keys())]
    if not allow_extra:
        problems += [f"{k}: in the checkpoint but not in the model" for k in sorted(got.keys() - exp.keys())]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointMismatchError(f"{what} does not match the model built from the config:\n  {shown}{more}")


class Checkpointer:
    """A CheckpointManager that saves every `every_steps`, keeps `keep`, and resumes from the newest
    readable step (a corrupted newest step is reported by name and skipped)."""

    def __init__(self, directory: str | epath.Path, *, every_steps: int, keep: int, use_async: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every_steps)), max_to_keep=keep, create=True,
            enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def save(self, step: int, state: dict[str, Any], data_state: dict | None, meta: dict,
             *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave({"params": state["params"], "batch_stats": state["batch_stats"]}),
            train=ocp.args.StandardSave({k: state[k] for k in ("step", "opt_state", "rng")}),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # No preemption service outside jax.distributed: SIGTERM is handled by train.py.
            return False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[dict, dict, int] | None:
        """Restores the newest good step into `abstract_state`'s shapes and shardings, or None if there
        is none. Shape mismatches are config errors and raise; unreadable steps fall back to older ones."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            step_dir = self.directory / str(step)
            try:
                found = self.manager.item_metadata(step)["params"]
            except Exception as e:  # noqa: BLE001 - any unreadable metadata means a bad step
                logging.error("Checkpoint %s is unreadable (%s: %s); trying the previous step.",
                              step_dir, type(e).__name__, e)
                continue
            if found is None:
                logging.error("Checkpoint %s has no 'params' item; trying the previous step.", step_dir)
                continue
            expected = {"params": abstract_state["params"], "batch_stats": abstract_state["batch_stats"]}
            compare_shapes(expected, dict(found), what=f"Checkpoint {step_dir}")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(expected),
                    train=ocp.args.StandardRestore({k: abstract_state[k] for k in ("step", "opt_state", "rng")}),
                    data=ocp.args.JsonRestore(),
                ))
            except Exception as e:  # noqa: BLE001
                logging.error("Checkpoint %s could not be restored (%s: %s); trying the previous step.",
                              step_dir, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            state = {**restored["params"], **restored["train"]}
            return state, dict(restored["data"] or {}), step
        if steps:
            raise RuntimeError(f"No readable checkpoint in {self.directory} (tried steps {steps}); "
                               "move the directory away to start from scratch.")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_checkpoint_dir(path: str | epath.Path) -> tuple[epath.Path, int]:
    """Accepts a workdir, its `checkpoints/` folder, or one step folder; returns (manager dir, step)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "params").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir())
    if not steps:
        raise FileNotFoundError(f"{path} holds no checkpoint (expected a workdir, its checkpoints/ folder, "
                                "or a step folder with a params/ item)")
    return path, steps[-1]


def load_model_variables(path: str | epath.Path, step: int | None = None) -> tuple[dict, dict, int]:
    """Reads only the `params` and `meta` items of a checkpoint, as host numpy arrays."""
    directory, latest = resolve_checkpoint_dir(path)
    step = latest if step is None else step
    manager = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        metadata = manager.item_metadata(step)["params"]
        if metadata is None:
            raise FileNotFoundError(f"{directory / str(step)} has no readable 'params' item")
        # Onto this process's first device, whatever topology saved it (a pod's checkpoint on a laptop).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(metadata))
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    variables = jax.tree.map(np.asarray, dict(restored["params"]))
    variables.setdefault("batch_stats", {})
    return variables, dict(restored["meta"] or {}), step


def merge_pretrained(fresh: dict, pretrained: dict, *, source: str, required_prefix: str = "encoder",
                     ) -> tuple[dict, list[str], list[str]]:
    """Copies every pretrained leaf whose path and shape match into `fresh` (new heads stay fresh).

    Leaves under `required_prefix` must all be present and of the right shape: a backbone that does not
    fit is a config error, not something to initialise at random silently."""
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_pre = traverse_util.flatten_dict(pretrained, sep="/")
    backbone = {k: v for k, v in flat_fresh.items() if k.split("/")[0] == required_prefix}
    compare_shapes(traverse_util.unflatten_dict(backbone, sep="/"),
                   traverse_util.unflatten_dict({k: v for k, v in flat_pre.items() if k in backbone}, sep="/"),
                   what=f"The backbone ({required_prefix}) in {source}")
    loaded, kept_fresh = [], []
    for k, v in flat_fresh.items():
        if k in flat_pre and np.shape(flat_pre[k]) == np.shape(v):
            flat_fresh[k] = flat_pre[k]
            loaded.append(k)
        else:
            kept_fresh.append(k)
    return traverse_util.unflatten_dict(flat_fresh, sep="/"), loaded, kept_fresh


def save_model_variables(directory: str | epath.Path, variables: dict, meta: dict) -> epath.Path:
    """Writes a model-only checkpoint (step 0, items `params` and `meta`) that `load_model_variables`
    and `config.init_from` / `config.init_from_torch` read like a training checkpoint."""
    directory = epath.Path(directory)
    manager = ocp.CheckpointManager(directory, item_handlers={"params": ocp.StandardCheckpointHandler(),
                                                             "meta": ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(create=True,
                                                                         enable_async_checkpointing=False))
    try:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave({"params": variables["params"],
                                          "batch_stats": variables.get("batch_stats", {})}),
            meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / "0"
