"""Entry point: `python -m pixelbert_jax.main --config=configs/pretrain.py[:VARIANT] --workdir=DIR`.

Thin on purpose: flags, config checks, multi-host initialisation, then train.train_and_evaluate. A rerun with
the same workdir resumes; `--config.KEY=VALUE` overrides any config value (unknown keys are an error).
A failure ends with one `error: ...` line and exit status 1 (130 for a second Ctrl-C); the traceback goes to
WORKDIR/error.log, or to stderr with --verbose (cli_errors.py). Bad flags and config values end with exit
status 2 and one line per bad value, before anything is written into the workdir (config_checks.py).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from pixelbert_jax import cli_errors, config_checks, distributed, paths, run_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/pretrain.py:demo", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On failure, print the traceback (else WORKDIR/error.log has it).")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = 2  # exit status of bad flags and config values, as argparse's


def _usage_error(text: str) -> None:
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(USAGE)


def _unknown_key(e: BaseException, args: list[str]) -> str:
  """ml_collections' AttributeError for `--config.a.b=..` on a config without `b`: the argument and its hint."""
  text = str(e).replace("\\n", "\n")
  key = re.search(r"[A-Za-z_]\w*", cli_errors.first_line(text))
  key = key.group(0) if key else "?"
  given = next(
      (
          a.split("=", 1)[0]
          for a in args
          if a.startswith("--config.") and key in a.split("=", 1)[0][len("--config.") :].split(".")
      ),
      f"--config.(...).{key}",
  )
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return f"unknown config key {given}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")


def _flag_error(e: BaseException) -> str:
  """absl's message, whose first line is enough unless it embeds the config file's traceback."""
  text = str(e).strip()
  lines = [s.strip() for s in text.splitlines() if s.strip()]
  if not lines:
    cause = e.__cause__ or e.__context__
    return cli_errors.message(cause) if cause else type(e).__name__
  if "Traceback (most recent call last)" in text:  # the config file raised: its exception's own line
    last = re.sub(r"^\w+Error: ", "", lines[-1])
    flag = re.match(r"flag (--\w+)", lines[0])
    return f"{flag.group(1) if flag else '--config'}: {last}"
  return lines[0].replace("flag --", "--", 1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after resolving `--config=~/my.py:variant` (bash expands no `~` after `=`, and the config
  flag opens the file itself), with every parse failure as one line. The workdir and the config's paths are
  resolved in train.train_and_evaluate."""

  def resolve(arg: str) -> str:
    if not arg.startswith("--config="):
      return arg
    file, sep, variant = arg[len("--config=") :].partition(":")
    return "--config=" + paths.resolve(file) + sep + variant

  args = [argv[0]] + [resolve(a) for a in argv[1:]]
  for arg in args[1:]:
    if arg.startswith("--config="):
      file = arg[len("--config=") :].partition(":")[0]
      if not os.path.isfile(file):
        _usage_error(f"config file {file} {'is a folder' if os.path.isdir(file) else 'does not exist'}")
  try:
    return flags.FLAGS(args)
  except flags.Error as e:  # a bad value, a missing flag, or the config file's own error
    _usage_error(_flag_error(e))
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config does not have
    _usage_error(_unknown_key(e, args))
  except Exception as e:  # noqa: BLE001 - the config file raised while it was loaded
    _usage_error(f"--config: {cli_errors.message(e)}")


def main(argv):
  if len(argv) > 1:
    _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet = cli_errors.QuietOrbax()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)
  if not _VERBOSE.value:
    sys.stderr = cli_errors.CollapsedTracebacks(sys.stderr, quiet)
  workdir = paths.resolve(_WORKDIR.value)
  log_name = "error.log"
  try:
    try:
      config = _CONFIG.value
    except Exception as e:  # noqa: BLE001 - ml_collections defers a config file's load failure to here
      _usage_error(f"--config: {cli_errors.message(e.__cause__ or e)}")
    config_checks.validate(config)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      _usage_error(f"--workdir {workdir} is a file, not a folder")
    info = distributed.initialize_from_env(cpu_devices=config.get("cpu_devices", 0))
    if info.process_index:
      log_name = f"error.process{info.process_index}.log"
    # What needs the device count (mesh shape, batches over the data-parallel devices), still before the
    # workdir is touched.
    config_checks.validate_devices(config, info.device_count, info.process_count)
    # Imported after initialisation: nothing may touch the JAX backend before jax.distributed is set up.
    from pixelbert_jax import train

    logging.info("Process %d/%d (%s)", info.process_index, info.process_count, info.detected_by)
    train.train_and_evaluate(config, workdir)
  except config_checks.ConfigError as e:  # a bad value, also one found later: status 2, no error.log
    cli_errors.report(e, verbose=_VERBOSE.value)
    cli_errors.exit_now(USAGE)
  except KeyboardInterrupt:  # the second Ctrl-C (the first saves and stops, train.py)
    cli_errors.exit_now(cli_errors.interrupted())
  except Exception as e:  # noqa: BLE001 - every failure ends as one line; the traceback goes to error.log
    own = not isinstance(e, run_lock.WorkdirBusyError)  # a busy workdir's error.log is the other run's
    code = cli_errors.report(
        e, verbose=_VERBOSE.value, workdir=workdir if own else None, quiet_orbax=quiet, log_name=log_name
    )
    cli_errors.exit_now(code)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
