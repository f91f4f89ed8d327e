"""What users see besides results: the one exception type (problem + fix) and one-line notes."""

import sys


class QuantMoeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits 2."""


def note(message: str) -> None:
    """Tell the user something they should know now (not at the end of a long run), on stderr."""
    print(f"note: {message}", file=sys.stderr, flush=True)
