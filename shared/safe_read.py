"""Reading a user-supplied file without being crashed, hung or fooled by it.

Every reader of a file someone else may have written — ledgers, the
coordinator's record, model cards, schemas, summaries, key files, tables —
opens it here:

* **regular files only**: a FIFO would block a plain ``open`` forever, a device
  could be read without end, a directory is not a file.  The file is opened
  with ``O_NONBLOCK`` (so opening a FIFO returns at once) and checked with
  ``fstat`` on the opened descriptor (so a file swapped after a check is still
  caught) before one byte is read; a symlink loop is named as such;
* **bounded**: a size limit per kind of file, read at most limit + 1 bytes;
* **strict UTF-8**: binary or Latin-1 bytes are refused naming the byte offset
  and the line, never decoded into replacement characters;
* **bounded JSON**: nesting depth checked before ``json.loads`` (CPython's
  decoder recurses), ``NaN``/``Infinity``/``1e400`` refused, integers of more
  than :data:`MAX_INT_DIGITS` digits refused, and the top level typed (an object
  where an object is expected).

Every refusal is an :class:`UnreadableFile` (a ``ValueError``) whose message
names the file, the line where known, and what to do; the CLI turns it into a
one-line error and exit code 2.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

# Size limits, by kind of file (bytes).  Generous for honest files: a ledger of
# a million rounds is ~1 GB, so 256 MiB is about a quarter of a million rounds.
MAX_LEDGER_BYTES = 256 << 20
MAX_JSON_BYTES = 16 << 20  # a schema, card, summary, policy
MAX_KEY_BYTES = 64 << 10
MAX_TABLE_BYTES = 4 << 30
# The deepest nesting an honest fedsilo file has is ~5; 64 leaves room.
MAX_DEPTH = 64
# An integer field of ours fits in 64 bits (20 digits); Python would parse 4300.
MAX_INT_DIGITS = 24

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


class UnreadableFile(ValueError):
    """A file that cannot be read as what it should be; the message names it, the line and the fix.

    Parameters
    ----------
    path : Path or str
        The file.
    reason : str
        What is wrong with it.
    line : int, optional
        The line (counted from 1) where that was found.
    hint : str, optional
        What to do about it.
    """

    def __init__(self, path: Path | str, reason: str, line: int | None = None, hint: str = "") -> None:
        self.path, self.reason, self.line, self.hint = str(path), reason, line, hint
        where = f"'{self.path}'" + (f" line {line}" if line is not None else "")
        super().__init__(f"{where}: {reason}" + (f"; {hint}" if hint else ""))


def _describe_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path | str, max_bytes: int = MAX_JSON_BYTES, what: str = "file", head: bool = False) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, without blocking on a FIFO or device.

    With ``head`` only the first ``max_bytes`` are read, whatever the file's size.

    Raises
    ------
    UnreadableFile
        Missing, a directory, FIFO, device or socket, a symlink loop, too
        large, or unreadable (permissions, I/O error).
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnreadableFile(path, f"the {what} is a symbolic link that loops", hint="point at the real file") from None
        if err.errno == errno.ENOENT:
            raise UnreadableFile(path, f"the {what} does not exist", hint="check the path") from None
        if err.errno == errno.EISDIR:
            raise UnreadableFile(path, f"the {what} is a directory, not a file", hint="give the file itself") from None
        raise UnreadableFile(path, f"cannot open the {what}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(path, f"the {what} is {_describe_kind(info.st_mode)}, not a regular file",
                                 hint="give a regular file")
        if info.st_size > max_bytes and not head:
            raise UnreadableFile(path, f"the {what} is {info.st_size} bytes, more than the {max_bytes} a {what} may be",
                                 hint="it is not a file fedsilo wrote, or it must be split")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        limit = max_bytes if head else max_bytes + 1
        while total < limit:  # a file growing while read is still bounded
            chunk = os.read(fd, min(1 << 20, limit - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise UnreadableFile(path, f"cannot read the {what}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes and not head:
        raise UnreadableFile(path, f"the {what} grew past {max_bytes} bytes while it was read")
    return data


def decode_utf8(data: bytes, path: Path | str, what: str = "file") -> str:
    """``data`` as strict UTF-8; binary or Latin-1 bytes are refused with their byte offset and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UnreadableFile(
            path, f"the {what} is not UTF-8 text: byte {err.start} (0x{data[err.start]:02x}) cannot be decoded "
            "(a binary file, or text in another encoding such as Latin-1)", line,
            "give the file fedsilo wrote, or re-save it as UTF-8",
        ) from None


def read_text(path: Path | str, max_bytes: int = MAX_JSON_BYTES, what: str = "file") -> str:
    """A regular, bounded, strictly UTF-8 text file (see :func:`read_bytes`)."""
    return decode_utf8(read_bytes(path, max_bytes, what), path, what)


def nesting_depth(text: str) -> int:
    """How deeply JSON brackets nest in ``text``, outside strings (an upper bound for malformed text)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return text.count("[") + text.count("{")  # cheap: no more brackets than the limit
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (not finite as a float)")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits is out of range")
    return int(text)


def parse_json(text: str, path: Path | str, line: int | None = None, what: str = "file",
               expect: type | None = dict, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text, bounded in depth, finite in every number, typed at the top.

    Raises
    ------
    UnreadableFile
        Not JSON, nested deeper than ``max_depth``, a non-finite or overlong
        number, or (with ``expect``) a top level of another type.
    """
    depth = nesting_depth(text)
    if depth > max_depth:
        raise UnreadableFile(path, f"the {what} nests {depth} levels deep, more than the {max_depth} allowed",
                             line, "it is not a file fedsilo wrote")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise UnreadableFile(path, f"the {what} nests too deeply", line, "it is not a file fedsilo wrote") from None
    except ValueError as err:  # JSONDecodeError is one
        raise UnreadableFile(path, f"the {what} is not valid JSON ({err})", line,
                             "it was edited, truncated, or is not a fedsilo file") from None
    if expect is not None and not isinstance(value, expect):
        raise UnreadableFile(path, f"the {what} holds a JSON {_json_type(value)} where an "
                             f"{_json_type(expect())} is expected", line, "it is not a file fedsilo wrote")
    return value


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def load_json(path: Path | str, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
              expect: type | None = dict) -> Any:
    """A JSON file read safely (regular, bounded, UTF-8, bounded depth, finite, typed)."""
    return parse_json(read_text(path, max_bytes, what), path, None, what, expect)


def read_lines(path: Path | str, what: str = "file", max_bytes: int = MAX_LEDGER_BYTES) -> tuple[list[str], bool]:
    """The lines of a JSON-lines file read safely, and whether it ends with a newline.

    A line nested deeper than :data:`MAX_DEPTH` is refused here (naming it), so
    a caller's own ``json.loads`` of a line cannot recurse without bound.
    """
    text = read_text(path, max_bytes, what)
    lines = text.split("\n")
    complete = not lines or lines[-1] == ""
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        depth = nesting_depth(line)
        if depth > MAX_DEPTH:
            raise UnreadableFile(path, f"the {what} nests {depth} levels deep, more than the {MAX_DEPTH} allowed",
                                 number, "it is not a file fedsilo wrote")
    return lines, complete
