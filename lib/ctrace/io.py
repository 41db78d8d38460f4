"""Atomic file output, checked reading of the tables and JSON files steps pass on, and safe loading of
pickled dictionaries.

Every result file is written to a temporary sibling and renamed into place, so an interrupted job
never leaves a half-written output that Snakemake (or a user) could mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctrace.errors import CtraceInputError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    `suffix` defaults to the target's own suffix, so writers that dispatch on extension still work.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".tmp{suffix if suffix is not None else target.suffix}",
            dir=target.parent,
        )
    except OSError as err:
        raise CtraceInputError(f"{target}: cannot write here ({err.strerror}); choose a writable output path") from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results should be readable like any file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_parquet(path: str | os.PathLike, frame, metadata: dict[str, str] | None = None) -> None:
    """Write a pandas DataFrame as Parquet (pyarrow), atomically; `metadata` joins the file's key-value
    metadata (next to pandas' own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_tsv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as a tab-separated table, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write uncompressed named arrays (`np.savez`), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


# Errors of unreadable files: numpy (EOFError, BadZipFile), pandas/pyarrow/json (ValueError subclasses), OS.
UNREADABLE_FILE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def unreadable(err: Exception) -> str:
    """Why a file could not be read, for an error message. NumPy reads bytes that are not .npy/.npz as a
    pickle and then advises `allow_pickle=True`, which is the wrong advice for a file of another format."""
    if isinstance(err, ValueError) and "pickled" in str(err):
        return "not NumPy .npy/.npz data: another format or a corrupted file"
    return f"{type(err).__name__}: {err}"


def read_table(path: str | os.PathLike, what: str, columns: Sequence[str] = (), as_text: bool = False):
    """A Parquet (`.parquet`) or tab-separated table with at least `columns`, else a CtraceInputError that
    names the file and says what it should be (`what`, e.g. "an edge table (the edges step's Parquet)").
    as_text: a TSV's fields are kept as written (names such as "00041" or "NA" stay strings)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: not found; expected {what}")
    parquet = path.suffix == ".parquet"
    text = {"dtype": str, "keep_default_na": False} if as_text else {}
    try:
        frame = pd.read_parquet(path) if parquet else pd.read_csv(path, sep="\t", **text)
    except UNREADABLE_FILE_ERRORS as err:
        kind = "Parquet" if parquet else "a tab-separated table"
        raise CtraceInputError(f"{path}: cannot be read as {kind} ({type(err).__name__}: {err}); expected {what}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CtraceInputError(
            f"{path}: no column(s) {missing} (it has {list(frame.columns)[:12]}); expected {what}"
        )
    return frame


def read_json(path: str | os.PathLike, what: str, keys: Sequence[str] = ()) -> dict:
    """A JSON object with at least `keys`, else a CtraceInputError naming the file and what it should be."""
    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: not found; expected {what}")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CtraceInputError(f"{path}: not valid JSON ({err}); expected {what}") from None
    if not isinstance(obj, dict):
        raise CtraceInputError(f"{path}: a JSON {type(obj).__name__}, not an object; expected {what}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CtraceInputError(f"{path}: no key(s) {missing} (it has {sorted(obj)[:12]}); expected {what}")
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for Geneformer's dictionaries: plain containers plus numpy scalars, nothing else.

    The official pickles reference only `numpy.core.multiarray.scalar` and `numpy.dtype`; any other
    global (a function, a class with side effects) is refused, so a tampered file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in self._ALLOWED:
            if name == "dtype":
                return np.dtype
            from numpy._core import multiarray  # numpy >= 2

            return multiarray.scalar
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_restricted_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may contain only builtin containers/scalars and numpy scalars."""
    path = Path(path)
    if not path.is_file():
        raise CtraceInputError(f"{path}: file not found")
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle).load()
        except pickle.UnpicklingError as err:
            raise CtraceInputError(
                f"{path}: refused to unpickle ({err}); only plain dictionaries of strings and numbers "
                "are accepted. Use the official Geneformer dictionary files."
            ) from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, MemoryError) as err:
            # what the unpickler raises on bytes that are not a (complete) pickle
            raise CtraceInputError(
                f"{path}: not a readable pickle ({type(err).__name__}: {err}); the file is truncated or of "
                "another format. Use the official Geneformer dictionary files."
            ) from None
