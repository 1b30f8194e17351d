"""cli_errors.first_line, the one place a command cuts an exception to its `error:` line."""

from __future__ import annotations

import pytest

from pixelbert_jax import cli_errors


@pytest.mark.parametrize(
    "message, line, typed",
    [
        ("one line", "one line", "ValueError: one line"),
        ("first\n  second\nthird", "first", "ValueError: first"),
        ("\n\n  indented first \nsecond", "indented first", "ValueError: indented first"),  # blank lines first
        ("", "", "ValueError"),
        ("  \n \n", "", "ValueError"),
    ],
)
def test_first_line_is_the_first_non_blank_line(message, line, typed):
  assert cli_errors.first_line(ValueError(message)) == line
  assert cli_errors.first_line(ValueError(message), with_type=True) == typed
  assert cli_errors.first_line(message) == line  # a text too (a log record's message)


@pytest.mark.parametrize("message, shown", [("", "ValueError"), ("\nthe real message\nmore", "the real message")])
def test_a_usage_error_with_an_empty_or_blank_first_line_still_says_something(capsys, message, shown):
  """run_command printed `error: ` and nothing else for a message that starts with a newline."""

  def body():
    raise ValueError(message)

  assert cli_errors.run_command(body, usage_errors=(ValueError,), verbose=False) == 2
  assert capsys.readouterr().err == f"error: {shown}\n"
