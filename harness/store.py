"""Durable run records: one JSON file per run, indexed in SQLite, read back as a DataFrame.

Layout under the store directory::

    records/<config_hash>.json   the source of truth, written atomically (temp file + rename),
                                 so a reader never sees half a record, also on a shared
                                 filesystem where many cluster jobs write at once
    index.sqlite                 a query index rebuilt from the records whenever it is stale

A configuration's hash names its record, so re-running a sweep finds the finished runs and
skips them (unless forced), and parallel workers never write the same file for different
runs. A run that fails still leaves a record (status "failed", error, traceback).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from harness.record import flatten_record

COMPLETE = "ok"
INDEX_COLUMNS = ("config_hash", "experiment", "model", "status", "finished_at", "path")


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of a (resolved, JSON-able) configuration."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _json_safe(value: Any) -> Any:
    """Make a record JSON-clean: non-finite floats become strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Store:
    """A directory of run records with an SQLite index."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.sqlite"

    # --- records -----------------------------------------------------------------------------
    def record_path(self, run_hash: str) -> Path:
        return self.records_dir / f"{run_hash}.json"

    def get(self, run_hash: str) -> dict | None:
        """The record of ``run_hash``, or None (also for an unreadable file, which is reported)."""
        path = self.record_path(run_hash)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def finished(self, run_hash: str, force: bool = False) -> dict | None:
        """The complete record of ``run_hash`` marked ``skipped``, or None when it must (re-)run."""
        record = self.get(run_hash)
        if record is None or record.get("status") != COMPLETE or force:
            return None
        return {**record, "skipped": True}

    def is_complete(self, run_hash: str) -> bool:
        record = self.get(run_hash)
        return record is not None and record.get("status") == COMPLETE

    def put(self, record: Mapping[str, Any]) -> Path:
        """Write a record (must hold ``config_hash``) atomically and index it."""
        run_hash = record["config_hash"]
        record = _json_safe(dict(record))
        record.setdefault("finished_at", time.time())
        path = self.record_path(run_hash)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
        try:
            self._index([(record, path)])
        except sqlite3.Error:
            pass  # the JSON record is the truth; the index is rebuilt from the records when read
        return path

    def records(self, experiment: str | None = None) -> list[dict]:
        """All readable records (optionally of one experiment), oldest first."""
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if experiment is None or rec.get("experiment") == experiment:
                out.append(rec)
        return sorted(out, key=lambda r: float(r.get("finished_at") or 0))

    # --- index -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.index_path, timeout=60)
        con.execute(
            "CREATE TABLE IF NOT EXISTS runs (config_hash TEXT PRIMARY KEY, experiment TEXT, model TEXT, "
            "status TEXT, finished_at REAL, path TEXT, record TEXT)"
        )
        return con

    def _index(self, items: Iterable[tuple[Mapping, Path]]) -> None:
        rows = [(r["config_hash"], r.get("experiment"), r.get("model"), r.get("status"),
                 float(r.get("finished_at") or 0), str(p), json.dumps(r)) for r, p in items]
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def reindex(self) -> int:
        """Rebuild the SQLite index from the record files; returns the number of records."""
        items = [(r, self.record_path(r["config_hash"])) for r in self.records() if "config_hash" in r]
        with self._connect() as con:
            con.execute("DELETE FROM runs")
        self._index(items)
        return len(items)

    def query(self, sql_where: str = "1", params: tuple = ()) -> pd.DataFrame:
        """Index rows matching an SQL WHERE clause, e.g. ``query("experiment = ?", ("quickstart",))``."""
        if self._stale():
            self.reindex()
        with self._connect() as con:
            return pd.read_sql_query(f"SELECT {', '.join(INDEX_COLUMNS)} FROM runs WHERE {sql_where}", con,
                                     params=params)

    def _stale(self) -> bool:
        with self._connect() as con:
            (n,) = con.execute("SELECT COUNT(*) FROM runs").fetchone()
        return n != sum(1 for _ in self.records_dir.glob("*.json"))

    def frame(self, experiment: str | None = None) -> pd.DataFrame:
        """One row per run with flat result columns (``harness.record.flatten_record``)."""
        return pd.DataFrame([flatten_record(r) for r in self.records(experiment)])

