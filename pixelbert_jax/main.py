"""Entry point: `python -m pixelbert_jax.main --config=configs/pretrain.py[:VARIANT] --workdir=DIR`.

Thin on purpose: flags, multi-host initialisation, then train.train_and_evaluate. A rerun with the same
workdir resumes; `--config.KEY=VALUE` overrides any config value (unknown keys are an error).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from pixelbert_jax import distributed, paths, run_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.Filter):
    """Orbax logs every file it writes at INFO; keep the console for the progress line and warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, after resolving `--config=~/my.py:variant`: bash expands no `~` after `=`, and the config
    flag opens the file itself. The workdir and the config's paths are resolved in train.train_and_evaluate."""
    def resolve(arg: str) -> str:
        if not arg.startswith("--config="):
            return arg
        file, sep, variant = arg[len("--config="):].partition(":")
        return "--config=" + paths.resolve(file) + sep + variant

    return app.parse_flags_with_usage([argv[0]] + [resolve(a) for a in argv[1:]])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    info = distributed.initialize_from_env(cpu_devices=_CONFIG.value.get("cpu_devices", 0))
    # Imported after initialisation: nothing may touch the JAX backend before jax.distributed is set up.
    from pixelbert_jax import train

    logging.info("Process %d/%d (%s)", info.process_index, info.process_count, info.detected_by)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (FloatingPointError, ValueError, FileNotFoundError, run_lock.WorkdirBusyError) as e:  # NonFiniteLossError
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
