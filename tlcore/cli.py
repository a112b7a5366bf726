"""What the command lines share: logging to the terminal, and errors as one line."""

from __future__ import annotations

import logging
import sys
import warnings

from tlcore import TlcoreError

__all__ = ["setup_logging", "report_error", "report_interrupt"]


def setup_logging(quiet: bool) -> None:
    """Log the library's progress to stderr (warnings only when ``quiet``)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module="nvidia")


def report_error(exc: TlcoreError) -> int:
    """Print a user mistake as one line on stderr; return the exit code for it."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def report_interrupt() -> int:
    """Print one line for Ctrl-C; return the shell's exit code for it."""
    print("interrupted: what finished is already recorded; the feature cache keeps complete "
          "entries only", file=sys.stderr)
    return 130
