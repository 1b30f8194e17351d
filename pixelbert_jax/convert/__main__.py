"""`python -m pixelbert_jax.convert to-torch|from-torch ...`: PyTorch interop, verified every time.

  to-torch   --checkpoint WORKDIR_OR_STEP_DIR [--step N] --out OUT [--overwrite] [--no-verify]
  from-torch --cnn RESNET.pth|.safetensors --bert HF_BERT_DIR --out INIT_DIR [--config FILE.py:VARIANT]
             [--set model.hidden_size=32 ...] [--seed N] [--no-verify]

Errors in the inputs (missing paths, truncated or foreign files, checkpoints of another config, tensors
that do not fit, no torch to verify with) end with one line on stderr naming the culprit and exit status 1,
before any output is written where they can be known then; outputs that disagree with the Flax model exit
with status 2. --verbose prints the traceback of a failure.
"""

from __future__ import annotations

import argparse
import sys

from pixelbert_jax import cli_errors

NO_VERIFY_BANNER = (
    "WARNING: --no-verify: the converted weights were NOT compared with the Flax model. "
    "Use this only where torch is not installed, and verify elsewhere before trusting them."
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m pixelbert_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("to-torch", help="Orbax checkpoint -> torchvision / HF / whole-model PyTorch files")
  t.add_argument("--checkpoint", required=True, help="a workdir, its checkpoints/ folder or a step folder")
  t.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  t.add_argument("--out", required=True, help="a new or empty folder (see --overwrite)")
  t.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing the export's files")
  t.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff per output (float32)")
  t.add_argument("--no-verify", action="store_true", help="skip the Flax vs PyTorch check (machines without torch)")
  f = sub.add_parser("from-torch", help="torchvision ResNet + HF BERT -> INIT_DIR for config.init_from_torch")
  f.add_argument("--cnn", required=True, help="torchvision ResNet/ResNeXt state dict (.pth/.pt/.bin or .safetensors)")
  f.add_argument("--bert", required=True, help="HF BERT folder (config.json + model.safetensors or pytorch_model.bin)")
  f.add_argument("--out", required=True)
  f.add_argument("--config", default="configs/pretrain.py:r50", help="FILE.py[:VARIANT] the weights are for")
  f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
  f.add_argument("--seed", type=int, default=0, help="seed of the parts PyTorch does not provide")
  f.add_argument("--no-verify", action="store_true", help="skip the Flax vs PyTorch check (machines without torch)")
  return p


def _one_line(e: BaseException) -> str:
  lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [type(e).__name__]
  text = lines[0] + (": " + "; ".join(lines[1:4]) if len(lines) > 1 else "")
  if len(lines) > 4:
    text += f"; ... ({len(lines) - 4} more)"
  return text


def _require_torch() -> None:
  """Verification runs the PyTorch model: without torch, say so before anything is written (it used to fail
  only after writing every output file)."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise ValueError(
        f"torch is not installed ({e}); the conversion is verified with it: pip install "
        "'pixelbert_jax[torch]', or pass --no-verify to convert without checking"
    ) from None


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from pixelbert_jax.checkpoint import CheckpointMismatchError
  from pixelbert_jax.convert.mapping import MappingError
  from pixelbert_jax.convert.safetensors_io import TensorFileError
  from pixelbert_jax.convert.verify import VerificationError

  if args.no_verify:
    print(NO_VERIFY_BANNER, file=sys.stderr)
  try:
    if not args.no_verify:
      _require_torch()
    if args.command == "to-torch":
      from pixelbert_jax.convert.to_torch import to_torch

      to_torch(
          args.checkpoint,
          args.out,
          step=args.step,
          verify=not args.no_verify,
          tolerance=args.tolerance,
          overwrite=args.overwrite,
      )
    else:
      from pixelbert_jax.convert.from_torch import from_torch

      from_torch(args.cnn, args.bert, args.out, args.config, args.set, seed=args.seed, verify=not args.no_verify)
  except VerificationError as e:
    print(f"error: verification failed: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, TensorFileError, MappingError, CheckpointMismatchError, ValueError, KeyError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return cli_errors.interrupted()
  except Exception as e:  # noqa: BLE001 - anything else is one line too; --verbose shows where
    return cli_errors.report(e, verbose=args.verbose)
  if args.no_verify:
    print(NO_VERIFY_BANNER, file=sys.stderr)
  print(f"done: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
