"""Errors meant for the user, running commands, and printing."""

import subprocess
import sys
from pathlib import Path

LOG_TAIL_LINES = 30


class LabError(Exception):
    """An error meant for the user: printed without a traceback."""


def run(cmd, *, input=None, check=True):
    """Run a command, capturing output; raise LabError (with its stderr) on failure."""
    proc = subprocess.run(cmd, input=input, text=True, capture_output=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{detail}")
    return proc


def progress(msg):
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def log_tail(path, lines=LOG_TAIL_LINES):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"    (cannot read log: {e})"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "    (log is empty)"


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
