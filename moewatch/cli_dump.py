"""Reading a dump named on the command line: the dump, or one line on stderr saying why not."""
from __future__ import annotations

import sys
from typing import Optional


def read_dump_or_say(command: str, path: str) -> Optional[object]:
    """The dump at ``path``, or None after printing ``moewatch <command>: <why>`` to stderr
    (a missing, unreadable, truncated, corrupt or foreign file)."""
    from .dump import DumpFormatError, read_dump

    try:
        return read_dump(path)
    except FileNotFoundError:
        print(f"moewatch {command}: {path}: no such file", file=sys.stderr)
    except (DumpFormatError, IsADirectoryError, PermissionError) as error:
        print(f"moewatch {command}: {error}", file=sys.stderr)
    return None
