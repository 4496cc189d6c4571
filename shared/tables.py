"""Reading a department's or the coordinator's table (CSV or Parquet) safely, with clear errors."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from . import safe_read
from .schema import SchemaError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
MAX_TABLE_BYTES = safe_read.MAX_TABLE_BYTES


def read_table(path: Path | str):
    """A CSV or Parquet file as a pandas DataFrame, with clear errors."""
    import pandas as pd

    path = Path(path).expanduser()
    if not os.path.lexists(path):
        raise SchemaError(f"data file '{path}' does not exist; check the path")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise SchemaError(f"data file '{path}' must be .csv or .parquet")
    try:  # regular files only, opened without blocking (a FIFO would hang pandas), bounded in size
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise SchemaError(f"cannot read data file '{path}': {err.strerror or err}"
                          + (" (a symbolic link that loops)" if err.errno == errno.ELOOP else "")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SchemaError(f"data path '{path}' is not a file (a directory, pipe or device); give a .csv or .parquet file")
        if info.st_size > MAX_TABLE_BYTES:
            raise SchemaError(f"data file '{path}' is {info.st_size} bytes, more than the {MAX_TABLE_BYTES} read at once; split it")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as fh:
            frame = pd.read_csv(fh) if path.suffix.lower() == ".csv" else pd.read_parquet(fh)
    except SchemaError:
        raise
    except Exception as err:  # pandas/pyarrow raise many types for a bad file
        raise SchemaError(
            f"cannot read '{path}' as {path.suffix.lstrip('.').upper()}: {str(err)[:300]}. "
            "Check that the file is a valid, non-empty table"
        ) from None
    finally:
        os.close(fd)
    if frame.empty:
        raise SchemaError(f"data file '{path}' has no rows")
    frame.columns = [str(c) for c in frame.columns]
    return frame
