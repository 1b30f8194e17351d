"""The documentation's links: every relative Markdown link reaches a file of the repository, and no file
refers to notes outside it (a fresh clone has only what is committed)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests import train_helpers as th

# Files that lived beside the repository while it was written; a clone does not have them. Spelled in
# pieces so that this file does not match itself.
OUTSIDE = ("PAPER" + ".md", "DESIGN" + ".md", "../" + "shared")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _tracked() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files"], cwd=th.REPO, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  return [f for f in out.splitlines() if (th.REPO / f).is_file()]


def test_markdown_links_reach_repository_files():
  broken, checked = [], 0
  for name in _tracked():
    if not name.endswith(".md"):
      continue
    path = th.REPO / name
    for target in LINK.findall(path.read_text(errors="replace")):
      if "://" in target or target.startswith("mailto:"):
        continue
      checked += 1
      resolved = (path.parent / target).resolve()
      if not resolved.exists() or th.REPO not in resolved.parents:
        broken.append(f"{name}: ({target})")
  assert checked, "no relative Markdown link found: the pattern no longer matches"
  assert not broken, f"links to files that are not in the repository: {broken}"


def test_no_file_refers_to_notes_outside_the_repository():
  found = []
  for name in _tracked():
    if name.endswith((".png", ".jpg", ".safetensors", ".npy")):
      continue
    text = (th.REPO / name).read_text(errors="replace")
    for needle in OUTSIDE:
      for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
          found.append(f"{name}:{i}: {needle}")
  assert not found, f"references to files outside the repository: {found}"
