"""Reading a JSON file that may be hostile, within limits checked before anything is allocated.

Baselines are JSON whose bulk is flat lists of numbers (per-window series, expert counts). The
standard parser turns every number into a Python object (about 36 bytes for a number written in
2-4 bytes) and recurses once per nesting level, so a small file can take gigabytes or the stack.
:func:`load` instead:

* checks the file's size before reading it;
* makes one pass in C (a regular expression over the bytes) that sees every string, bracket,
  bare number and flat number list outside strings, checks the nesting depth, and counts each
  against :class:`JsonLimits` before anything proportional to it is allocated;
* parses each flat number list on its own (at most ``max_list`` numbers, so the standard parser's
  objects for it are short-lived) into one float64 numpy array (8 bytes a number), leaving the
  bare token ``NaN`` in its place (the file's own ``NaN`` and infinities were rewritten as
  ``null`` and ``±1e999``, so ``NaN`` marks a list's slot);
* hands the small rest (the skeleton) to the standard parser, refusing duplicate keys, and puts
  the arrays back into their slots in document order (or, where the caller wants JSON values,
  the list exactly as the standard parser reads it).

Errors are :class:`JsonLimitError` (a limit) or :class:`json.JSONDecodeError` / ``ValueError``
(not JSON); the caller turns them into its own error type.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import numpy as np


class JsonLimitError(ValueError):
    """A JSON file exceeds one of the :class:`JsonLimits`."""


@dataclass(frozen=True)
class JsonLimits:
    """What one file may hold. Numbers in flat lists cost 8 bytes each once read."""

    max_bytes: int  # size of the file
    max_numbers: int  # numbers in flat lists, all lists together
    max_lists: int  # flat lists of numbers
    max_list: int  # numbers in one flat list
    max_tokens: int  # strings, brackets and bare numbers outside flat lists
    max_skeleton: int  # bytes left for the standard parser once the lists are taken out
    max_depth: int = 32  # nesting of objects and arrays
    max_exact: int = 65_536  # numbers in lists kept as JSON values (not arrays): Python objects


# One token outside strings: a string, a flat list of numbers (a bracket pair holding only
# characters numbers, null, commas and whitespace are made of), a bracket, a bare number, or a
# non-standard constant. Everything else (whitespace, ',', ':', true/false/null) is copied as is.
_TOKEN = re.compile(rb'(?P<s>"[^"\\]*(?:\\.[^"\\]*)*")|(?P<f>\[[-+0-9.eEnul, \t\r\n]*\])|(?P<b>[\[\]{}])'
                    rb'|(?P<n>-?[0-9][0-9.eE+-]*)|(?P<c>NaN|-?Infinity)')
_SLOT = object()  # what the marker NaN parses to
# Non-standard constants in the file (Python's json writes them; strict JSON has none) are kept
# as values the checks after parsing can name: infinities stay infinite, NaN becomes null.
_CONSTANTS = {b"NaN": b"null", b"Infinity": b"1e999", b"-Infinity": b"-1e999"}


class _Scan:
    """The regular-expression pass: counts, the depth, the arrays and where they came from."""

    def __init__(self, limits: JsonLimits):
        self.limits = limits
        self.depth = 0
        self.tokens = 0
        self.numbers = 0
        self.arrays: List[np.ndarray] = []
        self.spans: List[Tuple[int, int]] = []

    def __call__(self, match: "re.Match[bytes]") -> bytes:
        kind = match.lastgroup
        if kind == "f":
            return self._flat(match)
        self.tokens += 1
        if self.tokens > self.limits.max_tokens:
            raise JsonLimitError(f"more than {self.limits.max_tokens:,} strings, brackets and numbers "
                                 "outside number lists")
        if kind == "b":
            if match.group() in (b"[", b"{"):
                self.depth += 1
                if self.depth > self.limits.max_depth:
                    raise JsonLimitError(f"nested deeper than {self.limits.max_depth} levels")
            else:
                self.depth = max(0, self.depth - 1)
        elif kind == "c":  # NaN marks a list's slot: the constants become what they mean
            return _CONSTANTS[match.group()]
        return match.group()

    def _flat(self, match: "re.Match[bytes]") -> bytes:
        limits = self.limits
        if self.depth + 1 > limits.max_depth:
            raise JsonLimitError(f"nested deeper than {limits.max_depth} levels")
        if len(self.arrays) >= limits.max_lists:
            raise JsonLimitError(f"more than {limits.max_lists:,} lists of numbers")
        text = match.group()
        # every number but the last is followed by a comma: count before allocating
        count = text.count(b",") + 1 if text[1:-1].strip() else 0
        if count > limits.max_list:
            raise JsonLimitError(f"a list of {count:,} numbers at byte {match.start()}; the limit is "
                                 f"{limits.max_list:,}")
        if self.numbers + count > limits.max_numbers:
            raise JsonLimitError(f"more than {limits.max_numbers:,} numbers in lists")
        self.numbers += count
        # the standard parser on one short list: strict JSON, and its Python objects live only
        # until the array holds the values (null becomes NaN)
        try:
            try:
                items = _LISTS.decode(text.decode("ascii"))
            except ValueError:  # not JSON, or an int past Python's 4300 digits: the slow way says which
                items = _LONG_INTS.decode(text.decode("ascii"))
            values = np.array(items, dtype=np.float64)
        except OverflowError:
            raise JsonLimitError(f"a number out of range in the list at byte {match.start()}") from None
        if values.shape != (count,):
            raise JsonLimitError(f"unreadable list of numbers at byte {match.start()}")
        self.arrays.append(values)
        self.spans.append(match.span())
        return b"NaN"


def _pairs(pairs: List[Tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:  # the last one would win silently, and the slots would go out of order
            raise JsonLimitError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _int(text: str) -> Any:
    # int() of more than 4300 digits raises; a number this long is no count or index anyway
    return int(text) if len(text) <= 20 else float(text)


_LISTS = json.JSONDecoder()
_LONG_INTS = json.JSONDecoder(parse_int=_int)


def _constant(name: str) -> Any:
    if name != "NaN":  # the scan rewrote the others
        raise JsonLimitError(f"unexpected constant {name}")
    return _SLOT


def open_regular(path: "str | os.PathLike"):
    """A binary file object for ``path``, refusing anything but a regular file.

    O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; a device
    (``/dev/zero``) or a directory is refused before a byte is read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory", os.fspath(path))
        if not stat.S_ISREG(mode):
            raise JsonLimitError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: "str | os.PathLike", max_bytes: int) -> bytes:
    """The file's bytes, refusing anything but a regular file of at most ``max_bytes``."""
    with open_regular(path) as fh:
        info = os.fstat(fh.fileno())
        if info.st_size > max_bytes:
            raise JsonLimitError(f"{info.st_size:,} bytes; the limit is {max_bytes:,}")
        data = fh.read(max_bytes + 1)  # a file growing while it is read is still bounded
    if len(data) > max_bytes:
        raise JsonLimitError(f"more than {max_bytes:,} bytes; the limit is {max_bytes:,}")
    return data


def everywhere(path: Tuple[Any, ...]) -> bool:
    """The default of ``arrays=``: every flat number list becomes an array."""
    return True


def loads(data: bytes, limits: JsonLimits, arrays: Callable[[Tuple[Any, ...]], bool] = everywhere) -> Any:
    """Parse ``data``. A flat number list at ``path`` (the tuple of keys and indices leading to
    it) comes back as a float64 array where ``arrays(path)`` is true; elsewhere it is exactly what
    ``json.loads`` gives (ints stay ints), at most ``limits.max_exact`` numbers in all."""
    if len(data) > limits.max_bytes:
        raise JsonLimitError(f"{len(data):,} bytes; the limit is {limits.max_bytes:,}")
    if b"\x00" in data:
        raise JsonLimitError("not UTF-8 JSON text (NUL bytes)")
    scan = _Scan(limits)
    skeleton = _TOKEN.sub(scan, data)
    if len(skeleton) > limits.max_skeleton:
        raise JsonLimitError(f"{len(skeleton):,} bytes outside lists of numbers; the limit is "
                             f"{limits.max_skeleton:,}")
    tree = json.loads(skeleton, object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int)
    del skeleton
    filler = _Filler(scan, data, arrays)
    tree = filler.fill(tree, ())
    if filler.next != len(scan.arrays):
        raise JsonLimitError("lists of numbers out of place")  # a marker the parser did not see
    return tree


def load(path: "str | os.PathLike", limits: JsonLimits,
         arrays: Callable[[Tuple[Any, ...]], bool] = everywhere) -> Any:
    """:func:`read_bytes` then :func:`loads`."""
    return loads(read_bytes(path, limits.max_bytes), limits, arrays)


class _Filler:
    """Puts each array back into its slot, walking the tree in document order."""

    def __init__(self, scan: _Scan, data: bytes, arrays: Callable[[Tuple[Any, ...]], bool]):
        self.scan, self.data, self.arrays = scan, data, arrays
        self.next = 0
        self.exact_numbers = 0

    def _take(self, path: Tuple[Any, ...]) -> Any:
        i = self.next
        if i >= len(self.scan.arrays):
            raise JsonLimitError("lists of numbers out of place")
        self.next += 1
        if self.arrays(path):
            return self.scan.arrays[i]
        # re-read the list's own text, so ints stay ints; bounded, as these are Python objects
        self.exact_numbers += self.scan.arrays[i].shape[0]
        limit = self.scan.limits.max_exact
        if self.exact_numbers > limit:
            raise JsonLimitError(f"more than {limit:,} numbers in lists kept as JSON values")
        start, end = self.scan.spans[i]
        return json.loads(self.data[start:end], parse_int=_int)

    def fill(self, node: Any, path: Tuple[Any, ...]) -> Any:
        # recursion is bounded: the scan checked the depth
        if node is _SLOT:
            return self._take(path)
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = self.fill(value, path + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                node[i] = self.fill(value, path + (i,))
        return node
