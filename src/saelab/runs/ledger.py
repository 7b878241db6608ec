"""The experiment ledger: one SQLite file per project holding a row per result.

`record(stage_result, run_dir, cfg)` is the one entry point every stage calls. A row holds
the facts a reader needs to trust a number (git commit and dirty flag, host, CPU, cores,
GPU, torch/transformers versions, model and a content hash of its weights, hook, coder,
architecture, width, k or L0, data, tokens, seed, wall seconds, config hash, run
directory), the result's headline metrics, its primary comparison (both sides, the
difference, the 95% CI, n) and every other comparison in a child table, and a verdict.

Verdicts, assigned mechanically where a rule decides (in this order):
  smoke          the run was labelled smoke: it claims nothing
  reproduced /   a prediction was registered for this row's id before it landed
  not-reproduced   (`saelab ledger predict`), and the metric meets / misses it
  conclusive /   the result's primary comparison has a 95% CI that excludes / includes 0
  inconclusive
  novel          anything else: a new number with nothing to hold it against
  superseded     set by `saelab ledger supersede OLD --by NEW`, or automatically when a
                 stage rewrites a result file an earlier row points to
A user may set any verdict with a reason (`saelab ledger verdict`); every change is kept in
the verdict log.

Safety: WAL mode and one IMMEDIATE transaction per write, so concurrent writer processes
lose nothing and a killed writer leaves the file consistent; rows cannot be deleted (a
trigger refuses it); the schema is versioned and migrated forward on open; a file that is
not a saelab ledger, or was written by a newer saelab, is refused. Every recorded row is
also appended to `ledger.jsonl` in its run directory, so `rebuild` recreates the ledger
from run directories (and backfills results recorded before the ledger existed).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saelab.io import read_json, sha256_file
from saelab.runs.results import (
    EVAL_RESULTS,
    Comparison,
    HarvestResult,
    QuickstartResult,
    Result,
    TrainResult,
)

APP = "saelab.ledger"
SCHEMA_VERSION = 2
LOG_FILE = "ledger.jsonl"  # in each run directory: the rows recorded for it, for `rebuild`
VERDICTS = ("smoke", "novel", "reproduced", "not-reproduced", "conclusive", "inconclusive", "superseded")
DEFAULT_PATH = Path("runs") / "ledger.sqlite"
OFF = ("none", "off", "")


class LedgerError(RuntimeError):
    """A ledger that cannot be opened or an operation it refuses."""


# --- schema: one list of statements per version; opening a file applies the missing ones ---
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE saelab_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE rows (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            time_utc TEXT NOT NULL,
            stage TEXT NOT NULL, kind TEXT NOT NULL,
            run_dir TEXT, result_file TEXT, result_sha256 TEXT,
            git_commit TEXT, git_dirty INTEGER, saelab_version TEXT,
            host TEXT, cpu TEXT, cores INTEGER, gpu TEXT, torch_version TEXT, transformers_version TEXT,
            model TEXT, model_hash TEXT, hook TEXT, coder TEXT, architecture TEXT, width INTEGER, k INTEGER,
            l0 REAL, data_source TEXT, data_slice TEXT, tokens INTEGER, seed INTEGER, wall_seconds REAL,
            config_hash TEXT, metrics TEXT NOT NULL,
            cmp_name TEXT, cmp_a REAL, cmp_b REAL, cmp_diff REAL, cmp_lo REAL, cmp_hi REAL, cmp_n INTEGER,
            cmp_unit TEXT,
            verdict TEXT NOT NULL, verdict_reason TEXT, verdict_auto INTEGER NOT NULL DEFAULT 1,
            notes TEXT NOT NULL DEFAULT '', supersedes TEXT, superseded_by TEXT)""",
        "CREATE INDEX rows_by_run ON rows (run_dir, stage, kind)",
        """CREATE TABLE comparisons (
            row_id TEXT NOT NULL REFERENCES rows(id), name TEXT NOT NULL, a REAL, b REAL, diff REAL,
            lo REAL, hi REAL, n INTEGER, unit TEXT, sides TEXT, PRIMARY KEY (row_id, name))""",
        """CREATE TABLE predictions (
            id TEXT PRIMARY KEY, metric TEXT NOT NULL, expect TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
            created_utc TEXT NOT NULL)""",
        """CREATE TABLE verdict_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, row_id TEXT NOT NULL, time_utc TEXT NOT NULL,
            verdict TEXT NOT NULL, reason TEXT, auto INTEGER NOT NULL)""",
        """CREATE TRIGGER rows_append_only BEFORE DELETE ON rows
            BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only'); END""",
    ],
    2: [  # the device setting (every stage can run on a GPU)
        "ALTER TABLE rows ADD COLUMN device TEXT",
        "ALTER TABLE rows ADD COLUMN peak_memory_bytes INTEGER",
    ],
}

FACT_COLUMNS = ("model", "model_hash", "hook", "coder", "architecture", "width", "k", "l0", "data_source",
                "data_slice", "tokens", "seed", "wall_seconds", "device", "peak_memory_bytes")
ENV_COLUMNS = ("git_commit", "git_dirty", "saelab_version", "host", "cpu", "cores", "gpu", "torch_version",
               "transformers_version")
ROW_COLUMNS = ("id", "time_utc", "stage", "kind", "run_dir", "result_file", "result_sha256", *ENV_COLUMNS,
               *FACT_COLUMNS, "config_hash", "metrics", "cmp_name", "cmp_a", "cmp_b", "cmp_diff", "cmp_lo",
               "cmp_hi", "cmp_n", "cmp_unit", "verdict", "verdict_reason", "verdict_auto", "notes", "supersedes",
               "superseded_by")


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ledger_path(explicit: str | Path | None = None) -> Path | None:
    """The ledger to use: explicit > $SAELAB_LEDGER > runs/ledger.sqlite; None when turned off."""
    for value in (explicit, os.environ.get("SAELAB_LEDGER")):
        if value is not None:
            return None if str(value).strip().lower() in OFF else Path(value).expanduser()
    return DEFAULT_PATH


# --- predictions -----------------------------------------------------------------------------
_EXPECT = re.compile(r"\s*(?:(>=|<=|>|<|==)\s*(?P<v>[-+0-9.eE]+)"
                     r"|(?P<c>[-+0-9.eE]+)\s*(?:\+-|±|\+/-)\s*(?P<t>[0-9.eE]+)"
                     r"|\[\s*(?P<lo>[-+0-9.eE]+)\s*,\s*(?P<hi>[-+0-9.eE]+)\s*\])\s*")


def parse_expect(expect: str) -> tuple[float, float, str]:
    """'>= 0.7', '< 3', '0.81 +- 0.02' (or ±), '[0.7, 0.9]' -> (low, high, canonical text); bounds inclusive
    except for > and <, which the canonical text keeps."""
    m = _EXPECT.fullmatch(expect)
    if not m:
        raise ValueError(f"expectation {expect!r} is not one of '>= X', '> X', '<= X', '< X', '== X', "
                         "'X +- TOL' or '[LO, HI]'")
    inf = float("inf")
    if m.group("c") is not None:
        c, t = float(m.group("c")), float(m.group("t"))
        return c - t, c + t, f"{c:g} +- {t:g}"
    if m.group("lo") is not None:
        lo, hi = float(m.group("lo")), float(m.group("hi"))
        if lo > hi:
            raise ValueError(f"expectation {expect!r}: the interval's low end exceeds its high end")
        return lo, hi, f"[{lo:g}, {hi:g}]"
    op, v = m.group(1), float(m.group("v"))
    lo, hi = {">=": (v, inf), ">": (v, inf), "<=": (-inf, v), "<": (-inf, v), "==": (v, v)}[op]
    return lo, hi, f"{op} {v:g}"


def meets(value: float, expect: str) -> bool:
    lo, hi, text = parse_expect(expect)
    if text.startswith("> "):
        return value > lo
    if text.startswith("< "):
        return value < hi
    return lo <= value <= hi


# --- the database ------------------------------------------------------------------------------
class Ledger:
    """One ledger file. Every method opens its own connection (safe across processes and threads)."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise LedgerError(f"no ledger at {self.path} (a stage creates it when it records a result)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e}") from None
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute("PRAGMA foreign_keys = ON")
            if write:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            else:
                yield con
        except sqlite3.DatabaseError as e:
            if "not a database" in str(e) or "malformed" in str(e):
                raise LedgerError(f"{self.path} is not a SQLite database (or is damaged): {e}; "
                                  "pass another --ledger or move the file away") from None
            raise
        finally:
            con.close()

    def _migrate(self) -> None:
        with self._connect() as con:
            try:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.DatabaseError as e:
                raise LedgerError(f"{self.path} is not a SQLite database ({e}); a ledger is a saelab SQLite "
                                  "file: pass another --ledger or move this file away") from None
            if tables and "saelab_meta" not in tables:
                raise LedgerError(f"{self.path} is a SQLite database but not a saelab ledger (its tables: "
                                  f"{', '.join(sorted(tables))}); pass another --ledger")
            version = 0
            if tables:
                meta = dict(con.execute("SELECT key, value FROM saelab_meta").fetchall())
                if meta.get("app") != APP:
                    raise LedgerError(f"{self.path}: saelab_meta.app is {meta.get('app')!r}, not {APP!r}")
                version = int(meta.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path} was written by a newer saelab (ledger schema {version}; this "
                                  f"saelab reads up to {SCHEMA_VERSION}): upgrade saelab to use it")
            if version == SCHEMA_VERSION:
                return
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN IMMEDIATE")
            try:  # re-read under the write lock: another process may have migrated meanwhile
                if "saelab_meta" in {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}:
                    version = int(dict(con.execute("SELECT key, value FROM saelab_meta").fetchall())
                                  .get("schema_version", 0))
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in MIGRATIONS[v]:
                        con.execute(stmt)
                con.execute("INSERT OR REPLACE INTO saelab_meta VALUES ('app', ?)", (APP,))
                con.execute("INSERT OR REPLACE INTO saelab_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    @property
    def journal(self) -> Path:
        """The ledger's own event log (predictions, and every hand-made change), beside the file."""
        return self.path.with_name(self.path.name + ".jsonl")

    @property
    def schema_version(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT value FROM saelab_meta WHERE key = 'schema_version'").fetchone()[0])

    # --- writing --------------------------------------------------------------------------
    def insert(self, row: dict[str, Any], comparisons: dict[str, dict[str, Any]],
               replay: bool = False) -> tuple[dict[str, Any], bool]:
        """Insert a row (its id generated when None); returns (the stored row, inserted). A row for
        the same result (stage, kind, run directory, result checksum) is not inserted twice.

        An explicit id taken by an earlier result of the same run directory and result file (a
        stage rerun with another config rewrote that file) becomes `<id>.2`, `<id>.3`, ..., which
        supersedes it; taken by anything else, it is refused. With replay (rebuild), a taken id
        is replaced by a fresh one instead: the caller maps the logged id to the stored one."""
        with self._connect(write=True) as con:
            same = con.execute("SELECT * FROM rows WHERE stage = ? AND kind = ? AND run_dir IS ? AND "
                               "result_sha256 IS ? ORDER BY superseded_by IS NOT NULL, seq",
                               (row["stage"], row["kind"], row["run_dir"], row["result_sha256"])).fetchone()
            if same is not None:
                return _as_dict(same), False
            row = dict(row)
            if row.get("id"):
                taken = con.execute("SELECT * FROM rows WHERE id = ?", (row["id"],)).fetchone()
                if taken is not None and replay:
                    row["id"] = self._next_id(con, row["stage"])
                elif taken is not None:
                    rerun = all(taken[c] == row[c] for c in ("stage", "kind", "run_dir", "result_file"))
                    if not rerun:
                        raise LedgerError(f"ledger id {row['id']!r} is taken by a {taken['stage']} row of "
                                          f"{taken['run_dir']} ({taken['time_utc']}); choose another --ledger-id")
                    base, n = row["id"], 2
                    while con.execute("SELECT 1 FROM rows WHERE id = ?", (f"{base}.{n}",)).fetchone():
                        n += 1
                    row["id"] = f"{base}.{n}"
            else:
                row["id"] = self._next_id(con, row["stage"])
            pred = con.execute("SELECT * FROM predictions WHERE id = ?", (row["id"],)).fetchone()
            if pred is not None and row.get("verdict") != "smoke":
                row["verdict"], row["verdict_reason"] = _prediction_verdict(dict(pred), row, comparisons)
            cols = [c for c in ROW_COLUMNS if c in row]
            con.execute(f"INSERT INTO rows ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [row[c] for c in cols])
            for name, c in comparisons.items():
                con.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (row["id"], name, c["a"], c["b"], c["diff"], c["lo"], c["hi"], c["n"], c["unit"],
                             c.get("sides", "")))
            con.execute("INSERT INTO verdict_log (row_id, time_utc, verdict, reason, auto) VALUES (?, ?, ?, ?, 1)",
                        (row["id"], row["time_utc"], row["verdict"], row.get("verdict_reason")))
            # a stage that rewrote a result file supersedes the rows that pointed to its old content
            for old in con.execute("SELECT id FROM rows WHERE stage = ? AND kind = ? AND run_dir IS ? AND "
                                   "result_file IS ? AND id != ? AND superseded_by IS NULL",
                                   (row["stage"], row["kind"], row["run_dir"], row["result_file"],
                                    row["id"])).fetchall():
                self._supersede(con, old["id"], row["id"], f"its result file {row['result_file']} was rewritten "
                                f"by {row['id']}", row["time_utc"])
            stored = con.execute("SELECT * FROM rows WHERE id = ?", (row["id"],)).fetchone()
            return _as_dict(stored), True

    @staticmethod
    def _next_id(con: sqlite3.Connection, stage: str) -> str:
        n = con.execute("SELECT COUNT(*) FROM rows WHERE stage = ?", (stage,)).fetchone()[0] + 1
        while con.execute("SELECT 1 FROM rows WHERE id = ?", (f"{stage}-{n:04d}",)).fetchone():
            n += 1
        return f"{stage}-{n:04d}"

    def predict(self, row_id: str, metric: str, expect: str, source: str = "",
                created_utc: str | None = None) -> dict[str, Any]:
        """Pre-register what a run's metric should be, before the run lands."""
        _, _, canonical = parse_expect(expect)
        _check_id(row_id)
        with self._connect(write=True) as con:
            if con.execute("SELECT 1 FROM rows WHERE id = ?", (row_id,)).fetchone():
                raise LedgerError(f"a result is already recorded as {row_id!r}: a prediction is registered "
                                  "before its run lands and cannot be edited after")
            t = created_utc or now_utc()
            con.execute("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?)",
                        (row_id, metric, canonical, source, t))
        if created_utc is None:  # registered now (not replayed): kept in the ledger's journal too
            _append_log(self.journal, {"event": "predict", "id": row_id, "metric": metric, "expect": canonical,
                                       "source": source, "time_utc": t})
        return self.prediction(row_id)

    def prediction(self, row_id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            r = con.execute("SELECT * FROM predictions WHERE id = ?", (row_id,)).fetchone()
        return dict(r) if r else None

    def set_verdict(self, row_id: str, verdict: str, reason: str, t: str | None = None, log: bool = True) -> None:
        """A user's verdict, kept with its reason (and the earlier verdicts in the log)."""
        if verdict not in VERDICTS:
            raise LedgerError(f"unknown verdict {verdict!r}; verdicts: {', '.join(VERDICTS)}")
        if verdict == "superseded":
            raise LedgerError("use `saelab ledger supersede OLD --by NEW` to say what supersedes a row")
        if not reason.strip():
            raise LedgerError("a verdict set by hand needs a --reason (it is kept in the ledger)")
        t = t or now_utc()
        with self._connect(write=True) as con:
            r = self._require(con, row_id)
            con.execute("UPDATE rows SET verdict = ?, verdict_reason = ?, verdict_auto = 0 WHERE id = ?",
                        (verdict, reason, row_id))
            con.execute("INSERT INTO verdict_log (row_id, time_utc, verdict, reason, auto) VALUES (?, ?, ?, ?, 0)",
                        (row_id, t, verdict, reason))
        if log:
            self._log_event(r["run_dir"], {"event": "verdict", "id": row_id, "verdict": verdict, "reason": reason,
                                           "time_utc": t})

    def supersede(self, old: str, by: str, reason: str, t: str | None = None, log: bool = True) -> None:
        if old == by:
            raise LedgerError("a row cannot supersede itself")
        if not reason.strip():
            raise LedgerError("say why with --reason (it is kept in the ledger)")
        t = t or now_utc()
        with self._connect(write=True) as con:
            r = self._require(con, old)
            self._require(con, by)
            self._supersede(con, old, by, reason, t)
        if log:
            self._log_event(r["run_dir"], {"event": "supersede", "id": old, "by": by, "reason": reason,
                                           "time_utc": t})

    @staticmethod
    def _supersede(con: sqlite3.Connection, old: str, by: str, reason: str, t: str) -> None:
        con.execute("UPDATE rows SET verdict = 'superseded', verdict_reason = ?, verdict_auto = 0, superseded_by = ? "
                    "WHERE id = ?", (reason, by, old))
        con.execute("UPDATE rows SET supersedes = ? WHERE id = ?", (old, by))
        con.execute("INSERT INTO verdict_log (row_id, time_utc, verdict, reason, auto) VALUES (?, ?, 'superseded', ?, 0)",
                    (old, t, f"by {by}: {reason}"))

    def _log_event(self, run_dir: str | None, event: dict[str, Any]) -> None:
        """A hand-made change: in the ledger's journal, and in the row's run directory while it exists."""
        event = _append_log(self.journal, event)
        if run_dir and Path(run_dir).is_dir():
            _append_log(Path(run_dir), event)

    def add_note(self, row_id: str, note: str, t: str | None = None, log: bool = True) -> None:
        t = t or now_utc()
        with self._connect(write=True) as con:
            r = self._require(con, row_id)
            notes = "; ".join(x for x in (r["notes"], note) if x)
            con.execute("UPDATE rows SET notes = ? WHERE id = ?", (notes, row_id))
        if log:
            self._log_event(r["run_dir"], {"event": "note", "id": row_id, "note": note, "time_utc": t})

    @staticmethod
    def _require(con: sqlite3.Connection, row_id: str) -> sqlite3.Row:
        r = con.execute("SELECT * FROM rows WHERE id = ?", (row_id,)).fetchone()
        if r is None:
            near = [x[0] for x in con.execute("SELECT id FROM rows ORDER BY seq DESC LIMIT 5")]
            raise LedgerError(f"no ledger row {row_id!r} (latest: {', '.join(near) or 'none'})")
        return r

    # --- reading ----------------------------------------------------------------------------
    def rows(self, stage: str | None = None, verdict: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM rows", []
        where = [(c, v) for c, v in (("stage", stage), ("verdict", verdict)) if v]
        if where:
            q += " WHERE " + " AND ".join(f"{c} = ?" for c, _ in where)
            args = [v for _, v in where]
        with self._connect() as con:
            out = [dict(r) for r in con.execute(q + " ORDER BY seq", args)]
        for r in out:
            r["metrics"] = json.loads(r["metrics"])
        return out

    def row(self, row_id: str) -> dict[str, Any]:
        """One row with everything: its comparisons, prediction and verdict history."""
        with self._connect() as con:
            r = dict(self._require(con, row_id))
            r["metrics"] = json.loads(r["metrics"])
            r["comparisons"] = {c["name"]: {k: c[k] for k in ("a", "b", "diff", "lo", "hi", "n", "unit", "sides")}
                                for c in con.execute("SELECT * FROM comparisons WHERE row_id = ? ORDER BY name",
                                                     (row_id,))}
            p = con.execute("SELECT * FROM predictions WHERE id = ?", (row_id,)).fetchone()
            r["prediction"] = dict(p) if p else None
            r["verdict_log"] = [dict(v) for v in con.execute(
                "SELECT time_utc, verdict, reason, auto FROM verdict_log WHERE row_id = ? ORDER BY seq", (row_id,))]
        return r

    def check(self) -> list[str]:
        """SQLite's integrity and foreign-key checks, and each row's result file against its checksum.
        Returns the problems found (empty: all good)."""
        problems = []
        with self._connect() as con:
            problems += [f"integrity: {r[0]}" for r in con.execute("PRAGMA integrity_check") if r[0] != "ok"]
            problems += [f"foreign key: {tuple(r)}" for r in con.execute("PRAGMA foreign_key_check")]
        for r in self.rows():
            if not r["result_file"] or r["superseded_by"]:
                continue
            f = Path(r["result_file"])
            if not f.is_file():
                problems.append(f"{r['id']}: result file {f} is missing")
            elif r["result_sha256"] and sha256_file(f) != r["result_sha256"]:
                problems.append(f"{r['id']}: result file {f} changed since it was recorded")
        return problems

    # --- export -------------------------------------------------------------------------------
    def export(self, fmt: str = "markdown") -> str:
        rows = self.rows()
        preds = {}
        with self._connect() as con:
            preds = {p["id"]: dict(p) for p in con.execute("SELECT * FROM predictions")}
        if fmt == "json":
            full = [self.row(r["id"]) for r in rows]
            return json.dumps({"rows": full, "predictions_pending": [p for i, p in preds.items()
                                                                     if i not in {r["id"] for r in rows}]}, indent=2)
        table = [experiments_row(r, preds.get(r["id"])) for r in rows]
        if fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({**r, "metrics": json.dumps(r["metrics"], sort_keys=True)})
            return buf.getvalue()
        if fmt == "markdown":
            head = list(EXPERIMENTS_COLUMNS)
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md(t[h]) for h in head) + " |" for t in table]
            return "\n".join(lines) + "\n"
        raise LedgerError(f"unknown export format {fmt!r}; formats: markdown, csv, json")


EXPERIMENTS_COLUMNS = ("id", "date", "commit", "model", "hook", "kind", "width", "L0", "data", "tokens", "seed",
                       "hardware", "wall", "result", "verdict", "notes")


def experiments_row(r: dict[str, Any], pred: dict[str, Any] | None = None) -> dict[str, str]:
    """One EXPERIMENTS.md row: the columns a paper's appendix table wants, as text."""
    commit = (r["git_commit"] or "")[:8] + ("+dirty" if r["git_dirty"] else "") if r["git_commit"] else \
        (f"v{r['saelab_version']}" if r["saelab_version"] else "?")
    hw = r["gpu"] or (f"{r['cpu']} x{r['cores']}" if r["cpu"] else "?")
    result = result_text(r)
    if pred:
        result += f" (predicted {pred['metric']} {pred['expect']}{'; ' + pred['source'] if pred['source'] else ''})"
    verdict = r["verdict"] + (f" by {r['superseded_by']}" if r["superseded_by"] else "")
    return {"id": r["id"], "date": r["time_utc"][:10], "commit": commit, "model": r["model"] or "",
            "hook": r["hook"] or "", "kind": f"{r['stage']}/{r['kind']}" + (f" {r['architecture']}" if
                                                                          r["architecture"] else ""),
            "width": str(r["width"] or ""), "L0": f"{r['l0']:.1f}" if r["l0"] is not None else "",
            "data": "/".join(x for x in (r["data_source"], r["data_slice"]) if x),
            "tokens": f"{r['tokens']:,}" if r["tokens"] else "", "seed": "" if r["seed"] is None else str(r["seed"]),
            "hardware": hw, "wall": f"{r['wall_seconds']:.0f} s" if r["wall_seconds"] is not None else "",
            "result": result, "verdict": verdict, "notes": r["notes"] or ""}


def result_text(r: dict[str, Any]) -> str:
    """The headline of a row in one cell: its primary comparison, else its first metrics."""
    if r["cmp_name"]:
        a, b, d, lo, hi = (_num(r[k]) for k in ("cmp_a", "cmp_b", "cmp_diff", "cmp_lo", "cmp_hi"))
        return f"{r['cmp_name']}: {a} vs {b}, diff {d} [{lo}, {hi}], n={r['cmp_n']} {r['cmp_unit']}s"
    return ", ".join(f"{k} {_num(v)}" for k, v in list(r["metrics"].items())[:3])


def _num(v: float | None) -> str:
    if v is None or v != v:  # SQLite stores NaN as NULL
        return "nan"
    return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:.4g}"


def _as_dict(r: sqlite3.Row) -> dict[str, Any]:
    return {k: r[k] for k in r.keys()}


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _check_id(row_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", row_id):
        raise LedgerError(f"ledger id {row_id!r} must be a short slug (letters, digits, '.', '_', '-'; e.g. repro-001)")


def _prediction_verdict(pred: dict[str, Any], row: dict[str, Any], comparisons: dict[str, dict]) -> tuple[str, str]:
    values = metric_values(json.loads(row["metrics"]), comparisons)
    metric = pred["metric"]
    src = f" ({pred['source']})" if pred["source"] else ""
    if metric not in values:
        return "inconclusive", (f"prediction names metric {metric!r}, which this result does not have "
                                f"(it has: {', '.join(sorted(values))})")
    v = values[metric]
    ok = meets(v, pred["expect"])
    return ("reproduced" if ok else "not-reproduced"), f"{metric} = {v:.6g}, predicted {pred['expect']}{src}"


def metric_values(metrics: dict[str, float], comparisons: dict[str, dict]) -> dict[str, float]:
    """What a prediction may name: the headline metrics and `<comparison>.a|b|diff|lo|hi`."""
    out = dict(metrics)
    for name, c in comparisons.items():
        out |= {f"{name}.{k}": c[k] for k in ("a", "b", "diff", "lo", "hi")}
    return out


# --- building a row from a result -----------------------------------------------------------------
def auto_verdict(result: Result, smoke: bool) -> tuple[str, str]:
    if smoke:
        return "smoke", "labelled a smoke run: claims nothing"
    name = result.primary()
    if name is not None and name in result.comparisons():
        c = result.comparisons()[name]
        lo, hi = c.diff_ci95
        word = "conclusive" if c.conclusive else "inconclusive"
        return word, f"{name}: 95% CI of the difference [{lo:+.4g}, {hi:+.4g}] {'excludes' if c.conclusive else 'includes'} 0"
    return "novel", "a new result; no prediction or comparison to hold it against"


def _cmp_dict(c: Comparison) -> dict[str, Any]:
    return {"a": c.a, "b": c.b, "diff": c.diff, "lo": c.diff_ci95[0], "hi": c.diff_ci95[1], "n": c.n_units,
            "unit": c.unit, "sides": c.sides}


def _abs(path: Path) -> str:
    return str(Path(path).resolve())


def run_facts(run_dir: Path) -> dict[str, Any]:
    """What a run directory says about its coder (checkpoint/cfg.json) and config (config.yaml)."""
    out: dict[str, Any] = {}
    cfg_json = run_dir / "checkpoint" / "cfg.json"
    if cfg_json.is_file():
        meta = read_json(cfg_json)
        sae = meta.get("sae", {})
        out = {"architecture": sae.get("architecture"), "width": sae.get("width"),
               "coder": "skip-transcoder" if sae.get("skip") else "transcoder" if sae.get("transcoder") else "sae",
               "model": meta.get("model"), "model_hash": meta.get("model_hash"), "hook": meta.get("hook")}
        if sae.get("architecture") in ("topk", "batchtopk", "matryoshka"):
            out["k"] = sae.get("k")
    return out


def build_row(result: Result, run_dir: str | Path, result_file: str | Path, *, config_hash: str | None,
              ledger_id: str | None = None, notes: str = "", env: dict[str, Any] | None = None,
              time_utc: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A ledger row (and its comparisons) for a result written to result_file in run_dir."""
    run_dir, result_file = Path(run_dir), Path(result_file)
    facts = {**run_facts(run_dir), **{k: v for k, v in result.facts().items() if v is not None}}
    smoke = bool(facts.pop("smoke", False))
    comparisons = {n: _cmp_dict(c) for n, c in result.comparisons().items()}
    verdict, reason = auto_verdict(result, smoke)
    row: dict[str, Any] = {
        "id": ledger_id, "time_utc": time_utc or now_utc(), "stage": result.STAGE, "kind": result.KIND,
        "run_dir": _abs(run_dir), "result_file": _abs(result_file),
        "result_sha256": sha256_file(result_file) if result_file.is_file() else None,
        **(env if env is not None else environment()),
        **{k: facts.get(k) for k in FACT_COLUMNS},
        "config_hash": config_hash, "metrics": json.dumps(result.headline()),
        "verdict": verdict, "verdict_reason": reason, "verdict_auto": 1, "notes": notes,
    }
    name = result.primary()
    if name is not None and name in comparisons:
        c = comparisons[name]
        row |= {"cmp_name": name, "cmp_a": c["a"], "cmp_b": c["b"], "cmp_diff": c["diff"], "cmp_lo": c["lo"],
                "cmp_hi": c["hi"], "cmp_n": c["n"], "cmp_unit": c["unit"]}
    return row, comparisons


def environment(prov: dict[str, Any] | None = None) -> dict[str, Any]:
    """The environment columns, from this process (or from a run's manifest provenance)."""
    from saelab.runs.rundir import provenance

    p = prov or provenance()
    hw, v, git = p.get("hardware", {}), p.get("versions", {}), p.get("git", {})
    return {"git_commit": git.get("commit"), "git_dirty": None if git.get("dirty") is None else int(git["dirty"]),
            "saelab_version": v.get("saelab"), "host": p.get("host"), "cpu": hw.get("cpu"), "cores": hw.get("cores"),
            "gpu": hw.get("cuda"), "torch_version": v.get("torch"), "transformers_version": v.get("transformers")}


# --- the one entry point -------------------------------------------------------------------------
@dataclass
class Recorded:
    id: str
    inserted: bool
    verdict: str


def record(result: Result, run_dir: str | Path, cfg: Any = None, *, result_file: str | Path | None = None,
           ledger: str | Path | None = None, ledger_id: str | None = None, notes: str | None = None,
           config_hash: str | None = None) -> Recorded | None:
    """Record a stage's result (already written to run_dir) in the ledger; returns its row id.

    cfg: the stage's config (a StageConfig: its ledger, ledger_id, notes and hash are used).
    Under torchrun only rank 0 records. Returns None when the ledger is turned off."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    path = ledger_path(ledger if ledger is not None else getattr(cfg, "ledger", None))
    if path is None:
        return None
    run_dir = Path(run_dir)
    result_file = Path(result_file) if result_file is not None else run_dir / result.FILE
    row, comparisons = build_row(
        result, run_dir, result_file,
        config_hash=config_hash or (cfg.hash() if cfg is not None and hasattr(cfg, "hash") else None),
        ledger_id=(ledger_id if ledger_id is not None else getattr(cfg, "ledger_id", None)) or None,
        notes=notes if notes is not None else getattr(cfg, "notes", "") or "")
    if row["id"]:
        _check_id(row["id"])
    led = Ledger(path)
    stored, inserted = led.insert(row, comparisons)
    if inserted:  # the row as stored in its transaction (its id and verdict decided)
        logged = {k: stored[k] for k in ROW_COLUMNS}
        _append_log(run_dir, {"event": "record", "row": logged, "comparisons": comparisons})
    return Recorded(stored["id"], inserted, stored["verdict"])


def check_ledger(cfg: Any, run_dir: str | Path | None = None) -> None:
    """Before any work: open (creating) the ledger a stage will record into, so a refused file
    stops it; and refuse a --ledger-id that another run directory's row already holds."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = ledger_path(getattr(cfg, "ledger", None))
    if path is None:
        return
    led = Ledger(path)
    row_id = getattr(cfg, "ledger_id", None)
    if row_id:
        _check_id(row_id)
        with led._connect() as con:
            taken = con.execute("SELECT stage, run_dir, time_utc FROM rows WHERE id = ?", (row_id,)).fetchone()
        if taken is not None and (run_dir is None or taken["run_dir"] != _abs(Path(run_dir))):
            raise LedgerError(f"ledger id {row_id!r} is taken by a {taken['stage']} row of {taken['run_dir']} "
                              f"({taken['time_utc']}); choose another --ledger-id")


def derived_id(base: str | None, part: str) -> str:
    """The id of one of several rows a command records under one --ledger-id: <base>-<part>
    ('' when no id was given, so the ledger generates one)."""
    return f"{base}-{part}" if base else ""


def _append_log(target: Path, event: dict[str, Any]) -> dict[str, Any]:
    """Append one event line to a run directory's ledger.jsonl (or to a log file path) with
    O_APPEND + fsync; a torn last line from a kill is skipped on read."""
    path = target / LOG_FILE if target.is_dir() or target.suffix != ".jsonl" else target
    path.parent.mkdir(parents=True, exist_ok=True)
    event = {**event, "t_ns": event.get("t_ns") or time.time_ns()}  # orders events of one second on rebuild
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return event


def _read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


# --- rebuild -------------------------------------------------------------------------------------
def rebuild(root: str | Path, out: str | Path) -> dict[str, int]:
    """A new ledger at `out` from every run directory under `root`: rows replayed from each
    run's ledger.jsonl (and predictions and hand-made changes from any ledger journal,
    `<ledger>.sqlite.jsonl`, under root), and results without a log (recorded before the ledger
    existed) backfilled from their files (summary.json, eval*.json, quickstart.json, store
    manifests), with the run's recorded provenance where it has one.

    A run directory moved or copied since is rebased to where it is; a logged id already taken
    in the new ledger (a copy, or a second ledger that logged into the same runs) gets a fresh
    id, and later events are mapped to it. Written to a temp file and renamed when whole; an
    existing `out` is never overwritten. Returns counts: replayed, backfilled, skipped events,
    unreadable result files."""
    root, out = Path(root), Path(out)
    if out.exists():
        raise LedgerError(f"{out} exists: rebuild writes a new ledger (move the old one away first)")
    if not root.is_dir():
        raise LedgerError(f"{root} is not a directory of runs")
    tmp = out.with_name(f".{out.name}.rebuilding")
    for f in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        f.unlink(missing_ok=True)
    led = Ledger(tmp)
    records, changes = [], {}  # changes: (key) -> (source dir, event); a run directory's copy wins
    logged: set[tuple[str, str]] = set()
    for log in sorted([*root.rglob(LOG_FILE), *root.rglob("*.sqlite.jsonl")]):
        here, in_run = _abs(log.parent), log.name == LOG_FILE
        for e in _read_log(log):
            if e.get("event") == "record":
                row = e["row"]
                moved = row["run_dir"] != here
                if moved:  # moved or copied: its rows point here now
                    row["result_file"] = row["result_file"] and _abs(log.parent / _inside(row["result_file"],
                                                                                          row["run_dir"]))
                    row["run_dir"] = here
                logged.add((row["stage"], row["result_file"]))
                records.append((int(e.get("t_ns", 0)), moved, here, e))
            else:
                key = (e["event"], e.get("id"), e.get("t_ns"), here if in_run else None)
                journal_key = (*key[:3], None)
                if in_run:
                    changes.pop(journal_key, None)
                    changes[key] = (here, e)
                elif not any(k[:3] == key[:3] for k in changes):
                    changes[key] = (None, e)
    # originals before copies of the same moment, so an id stays with the row at its logged place
    timeline = [(t, 0, moved, src, e) for t, moved, src, e in records] + \
               [(int(e.get("t_ns", 0)), 1, False, src, e) for src, e in changes.values()]
    timeline.sort(key=lambda x: x[:3])
    local: dict[tuple[str, str], str] = {}  # (run directory, logged id) -> id in the rebuilt ledger
    first: dict[str, str] = {}  # logged id -> the first row that carried it (for the ledger's journal)

    def mapped(src: str | None, i: str) -> str | None:
        return local.get((src, i)) if src is not None else first.get(i)

    counts = {"replayed": 0, "backfilled": 0, "skipped_events": 0, "unreadable_files": 0}
    for _, _, _, src, e in timeline:
        kind = e["event"]
        if kind == "record":
            stored, inserted = led.insert(e["row"], e["comparisons"], replay=True)
            local[(src, e["row"]["id"])] = stored["id"]
            first.setdefault(e["row"]["id"], stored["id"])
            counts["replayed"] += inserted
        elif kind == "predict":
            try:
                led.predict(e["id"], e["metric"], e["expect"], e["source"], created_utc=e["time_utc"])
            except LedgerError:
                counts["skipped_events"] += 1  # its result landed before it: as in the live ledger
        elif kind in ("verdict", "note") and (i := mapped(src, e["id"])):
            if kind == "verdict":
                led.set_verdict(i, e["verdict"], e["reason"], t=e["time_utc"], log=False)
            else:
                led.add_note(i, e["note"], t=e["time_utc"], log=False)
        elif kind == "supersede" and (i := mapped(src, e["id"])) and (by := mapped(src, e["by"]) or first.get(e["by"])):
            led.supersede(i, by, e["reason"], t=e["time_utc"], log=False)
        else:
            counts["skipped_events"] += 1  # about a row no log recorded
    for result, run_dir, file in _legacy_results(root, counts):
        if (result.STAGE, _abs(file)) in logged:
            continue
        manifest = run_dir / "manifest.json"  # a training run's provenance; other stages kept none
        prov = read_json(manifest) if result.STAGE == "train" and manifest.is_file() else None
        env = environment(prov) if prov and "hardware" in prov else dict.fromkeys(ENV_COLUMNS)
        t = datetime.fromtimestamp(file.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        row, cmps = build_row(result, run_dir, file, config_hash=None, env=env, time_utc=t,
                              notes="backfilled by `saelab ledger rebuild` from the run directory")
        _, inserted = led.insert(row, cmps, replay=True)
        counts["backfilled"] += inserted
    with led._connect() as con:  # fold the WAL into the file before it is renamed
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for f in (tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        f.unlink(missing_ok=True)
    tmp.rename(out)
    return counts


def _inside(result_file: str, run_dir: str | None) -> Path:
    """A result file's path relative to its run directory (e.g. steer/sentiment.json), else its name."""
    try:
        return Path(result_file).relative_to(run_dir or "")
    except ValueError:
        return Path(Path(result_file).name)


def _legacy_results(root: Path, counts: dict[str, int]) -> Iterator[tuple[Result, Path, Path]]:
    """Every result file under root that a stage writes, read as its typed result (those this
    version cannot read are counted in counts["unreadable_files"])."""
    for f in sorted(root.rglob("*.json")):
        try:
            if f.name == "manifest.json" and (f.parent / "documents.json").is_file():
                m = read_json(f)
                if m.get("format", "").startswith("saelab.activations") and m.get("complete"):
                    yield HarvestResult.read(f), f.parent, f
            elif f.name == "summary.json" and (f.parent / "checkpoint").is_dir():
                yield TrainResult.read(f), f.parent, f
            elif f.name == "quickstart.json":
                yield QuickstartResult.read(f), f.parent, f
            else:
                for cls in EVAL_RESULTS.values():
                    if f.name == cls.FILE:
                        yield cls.read(f), f.parent, f
        except (ValueError, KeyError, TypeError):
            counts["unreadable_files"] += 1  # an older file this version cannot read: not backfilled

