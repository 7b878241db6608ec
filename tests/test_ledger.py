"""The ledger on real SQLite files: concurrent writer processes, a killed writer, refused files,
predictions -> verdicts, supersession, migration from a v1 file, export, rebuild."""

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from saelab.runs.ledger import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    meets,
    parse_expect,
    rebuild,
    record,
)
from saelab.runs.results import Comparison, ControlResult


def control_result(diff: float = 0.2, half_width: float = 0.05, n: int = 100) -> ControlResult:
    """A real result type with one comparison whose CI is diff +- half_width."""
    c = Comparison(a=0.5 + diff, b=0.5, diff=diff, a_ci95=[0.5 + diff - 0.05, 0.5 + diff + 0.05], b_ci95=[0.45, 0.55],
                   diff_ci95=[diff - half_width, diff + half_width], n_units=n, unit="validation context",
                   n_boot=100, method="test")
    return ControlResult(comparison_sides="a = real, b = random", gaps={"explained_variance": c}, probing_skipped={},
                         random_run="r", random_core={}, budget={}, wall_seconds={"total": 1.0}, model="m",
                         hook="resid_post.1")


def record_into(ledger: Path | str, run: Path, result=None, **kw):
    run.mkdir(parents=True, exist_ok=True)
    result = result or control_result()
    result.write(run / result.FILE)
    return record(result, run, ledger=ledger, **kw)


def _writer(ledger: str, root: str, worker: int, n: int) -> None:
    for i in range(n):
        record_into(Path(ledger), Path(root) / f"w{worker}-{i}", control_result(diff=0.01 * i + worker))


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    Ledger(ledger)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(ledger), str(tmp_path / "runs"), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = Ledger(ledger).rows()
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    assert sorted(r["id"] for r in rows) == [f"eval-{i:04d}" for i in range(1, 61)]
    assert Ledger(ledger).check() == []


def _die_mid_transaction(ledger: str) -> None:
    con = sqlite3.connect(ledger, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO rows (id, time_utc, stage, kind, metrics, verdict) VALUES "
                "('half', 't', 'eval', 'core', '{}', 'novel')")
    os.kill(os.getpid(), signal.SIGKILL)


def _record_forever(ledger: str, root: str) -> None:
    i = 0
    while True:
        record_into(Path(ledger), Path(root) / f"r{i}")
        i += 1


def test_a_killed_writer_leaves_the_ledger_consistent(tmp_path):
    ledger = tmp_path / "ledger.sqlite"
    record_into(ledger, tmp_path / "first")
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_die_mid_transaction, args=(str(ledger),))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    led = Ledger(ledger)
    assert [r["id"] for r in led.rows()] == ["eval-0001"] and led.check() == []
    # killed at a random moment of a record loop: every row that made it is whole
    p = ctx.Process(target=_record_forever, args=(str(ledger), str(tmp_path / "loop")))
    p.start()
    time.sleep(4)
    p.kill()
    p.join(60)
    assert led.check() == []
    for r in led.rows():
        assert led.row(r["id"])["comparisons"].keys() == {"explained_variance"}
    assert record_into(ledger, tmp_path / "after").inserted  # the lock was released


def test_files_that_are_not_a_ledger_are_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("hello, this is not a database " * 100)
    with pytest.raises(LedgerError, match="not a SQLite database"):
        Ledger(text)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(LedgerError, match="not a saelab ledger .*t"):
        Ledger(other)
    newer = tmp_path / "newer.sqlite"
    Ledger(newer)
    con = sqlite3.connect(newer)
    con.execute("UPDATE saelab_meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(LedgerError, match="newer saelab .*schema 99"):
        Ledger(newer)
    assert text.read_text().startswith("hello")  # refused files are left as they were


def test_rows_cannot_be_deleted(tmp_path):
    ledger = tmp_path / "l.sqlite"
    record_into(ledger, tmp_path / "a")
    con = sqlite3.connect(ledger)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM rows")


def test_expectations_parse_and_decide():
    assert parse_expect(">= 0.7")[:2] == (0.7, float("inf"))
    assert parse_expect("0.81 +- 0.02")[:2] == pytest.approx((0.79, 0.83))
    assert parse_expect("0.81 ± 0.02")[2] == "0.81 +- 0.02"
    assert meets(0.7, ">= 0.7") and not meets(0.7, "> 0.7") and meets(0.75, "[0.7, 0.8]")
    assert not meets(0.9, "0.81 +- 0.02") and meets(-1, "< 0")
    for bad in ("about 0.7", ">= ", "[0.9, 0.1]"):
        with pytest.raises(ValueError):
            parse_expect(bad)


def test_a_prediction_decides_reproduced_or_not_and_is_frozen_once_a_result_lands(tmp_path):
    ledger = tmp_path / "l.sqlite"
    led = Ledger(ledger)
    led.predict("repro-001", "explained_variance.diff", ">= 0.1", source="Heap et al. 2025, fig. 2")
    led.predict("repro-002", "explained_variance.diff", "0.5 +- 0.1")
    led.predict("repro-003", "no_such_metric", ">= 0")
    a = record_into(ledger, tmp_path / "a", control_result(diff=0.2), ledger_id="repro-001")
    b = record_into(ledger, tmp_path / "b", control_result(diff=0.2), ledger_id="repro-002")
    c = record_into(ledger, tmp_path / "c", control_result(diff=0.2), ledger_id="repro-003")
    assert (a.verdict, b.verdict, c.verdict) == ("reproduced", "not-reproduced", "inconclusive")
    row = led.row("repro-001")
    assert "predicted >= 0.1 (Heap et al. 2025" in row["verdict_reason"] and row["prediction"]["metric"]
    with pytest.raises(LedgerError, match="already recorded"):
        led.predict("repro-001", "explained_variance.diff", ">= 0.5")
    with pytest.raises(LedgerError, match="taken"):
        record_into(ledger, tmp_path / "d", control_result(diff=0.3), ledger_id="repro-001")
    assert "no_such_metric" in led.row("repro-003")["verdict_reason"]


def test_comparisons_decide_conclusive_inconclusive_and_smoke_claims_nothing(tmp_path):
    ledger = tmp_path / "l.sqlite"
    yes = record_into(ledger, tmp_path / "a", control_result(diff=0.2, half_width=0.05))
    no = record_into(ledger, tmp_path / "b", control_result(diff=0.02, half_width=0.05))
    assert (yes.verdict, no.verdict) == ("conclusive", "inconclusive")
    r = Ledger(ledger).row(yes.id)
    assert (r["cmp_a"], r["cmp_b"], r["cmp_n"]) == (pytest.approx(0.7), 0.5, 100)
    assert r["cmp_lo"] == pytest.approx(0.15) and r["cmp_hi"] == pytest.approx(0.25)


def test_supersession_by_hand_and_by_a_rewritten_result_file(tmp_path):
    ledger = tmp_path / "l.sqlite"
    led = Ledger(ledger)
    a = record_into(ledger, tmp_path / "a")
    b = record_into(ledger, tmp_path / "b")
    with pytest.raises(LedgerError, match="reason"):
        led.supersede(a.id, b.id, "")
    led.supersede(a.id, b.id, "re-run with the bug fixed")
    ra, rb = led.row(a.id), led.row(b.id)
    assert ra["verdict"] == "superseded" and ra["superseded_by"] == b.id and rb["supersedes"] == a.id
    assert ra["verdict_log"][-1]["reason"] == f"by {b.id}: re-run with the bug fixed"
    # the same run directory's result rewritten with another result: the old row is superseded
    c = record_into(ledger, tmp_path / "b", control_result(diff=0.3))
    assert led.row(b.id)["superseded_by"] == c.id and "rewritten" in led.row(b.id)["verdict_reason"]
    # recording the identical result again is not a new row
    again = record(control_result(diff=0.3), tmp_path / "b", ledger=ledger)
    assert again.id == c.id and not again.inserted


def test_a_verdict_set_by_hand_keeps_its_reason_and_the_history(tmp_path):
    ledger = tmp_path / "l.sqlite"
    led = Ledger(ledger)
    a = record_into(ledger, tmp_path / "a")
    with pytest.raises(LedgerError, match="unknown verdict"):
        led.set_verdict(a.id, "great", "x")
    with pytest.raises(LedgerError, match="reason"):
        led.set_verdict(a.id, "inconclusive", " ")
    led.set_verdict(a.id, "inconclusive", "the random model was trained on 5x fewer tokens")
    r = led.row(a.id)
    assert r["verdict"] == "inconclusive" and r["verdict_auto"] == 0
    assert [v["verdict"] for v in r["verdict_log"]] == ["conclusive", "inconclusive"]


def test_a_v1_ledger_is_migrated_forward_and_keeps_its_rows(tmp_path):
    path = tmp_path / "v1.sqlite"
    con = sqlite3.connect(path)
    for stmt in MIGRATIONS[1]:
        con.execute(stmt)
    con.execute("INSERT INTO saelab_meta VALUES ('app', 'saelab.ledger'), ('schema_version', '1')")
    con.execute("INSERT INTO rows (id, time_utc, stage, kind, metrics, verdict) VALUES "
                "('old-1', '2026-11-30T00:00:00Z', 'train', 'sae', '{\"train_fvu\": 0.2}', 'novel')")
    con.commit()
    con.close()
    led = Ledger(path)
    assert led.schema_version == SCHEMA_VERSION == 2
    old = led.row("old-1")
    assert old["metrics"] == {"train_fvu": 0.2} and old["device"] is None and old["peak_memory_bytes"] is None
    new = record_into(path, tmp_path / "a")
    assert led.row(new.id)["stage"] == "eval" and led.check() == []


def test_export_markdown_csv_json(tmp_path):
    ledger = tmp_path / "l.sqlite"
    led = Ledger(ledger)
    led.predict("x-1", "explained_variance.diff", ">= 0.1")
    record_into(ledger, tmp_path / "a", ledger_id="x-1", notes="first | try")
    md = led.export("markdown").splitlines()
    assert md[0].startswith("| id | date | commit | model | hook | kind |") and len(md) == 3
    assert "x-1" in md[2] and "reproduced" in md[2] and "predicted explained_variance.diff >= 0.1" in md[2]
    assert "first \\| try" in md[2]  # a pipe in a note does not break the table
    assert led.export("csv").splitlines()[0].startswith("id,time_utc,stage")
    full = json.loads(led.export("json"))
    assert full["rows"][0]["comparisons"]["explained_variance"]["unit"] == "validation context"
    with pytest.raises(LedgerError, match="unknown export format"):
        led.export("xlsx")


def test_only_rank_zero_records_and_none_turns_it_off(tmp_path, monkeypatch):
    ledger = tmp_path / "l.sqlite"
    monkeypatch.setenv("RANK", "1")
    assert record_into(ledger, tmp_path / "a") is None and not ledger.exists()
    monkeypatch.setenv("RANK", "0")
    assert record_into("none", tmp_path / "b") is None


def test_rebuild_from_run_directories_equals_the_live_ledger(tmp_path):
    runs = tmp_path / "runs"
    live = runs / "ledger.sqlite"  # the default place: its journal (predictions, hand-made changes) is under runs/
    led = Ledger(live)
    led.predict("mine-1", "explained_variance.diff", ">= 0.1", source="a paper")
    a = record_into(live, runs / "a", ledger_id="mine-1")
    b = record_into(live, runs / "b")
    record_into(live, runs / "b", control_result(diff=0.01))  # supersedes b automatically
    led.set_verdict(a.id, "inconclusive", "by hand")
    led.supersede(a.id, b.id, "because")
    led.add_note(b.id, "a note")
    rebuilt = tmp_path / "rebuilt.sqlite"
    led.predict("pending-1", "explained_variance.diff", "> 0")  # its run has not landed yet
    assert rebuild(runs, rebuilt) == {"replayed": 3, "backfilled": 0, "skipped_events": 0, "unreadable_files": 0}
    assert Ledger(rebuilt).prediction("pending-1")["expect"] == "> 0"

    def facts(path):
        out = []
        for r in Ledger(path).rows():
            full = Ledger(path).row(r["id"])
            full.pop("seq")
            out.append(full)
        return out

    assert facts(rebuilt) == facts(live)
    with pytest.raises(LedgerError, match="exists"):
        rebuild(runs, rebuilt)


def test_rebuild_survives_copied_and_moved_runs_and_a_second_ledger(tmp_path):
    import shutil

    runs = tmp_path / "runs"
    led = Ledger(runs / "ledger.sqlite")
    a = record_into(runs / "ledger.sqlite", runs / "a")
    led.set_verdict(a.id, "inconclusive", "by hand")
    shutil.copytree(runs / "a", runs / "a-copy")  # the copy's log names the same id
    record_into(tmp_path / "other.sqlite", runs / "b")  # a second ledger logged into the same runs: eval-0001 again
    shutil.move(runs / "b", runs / "b-moved")
    counts = rebuild(runs, tmp_path / "rebuilt.sqlite")
    assert counts["replayed"] == 3 and not (tmp_path / ".rebuilt.sqlite.rebuilding").exists()
    rows = {Path(r["run_dir"]).name: r for r in Ledger(tmp_path / "rebuilt.sqlite").rows()}
    assert set(rows) == {"a", "a-copy", "b-moved"} and len({r["id"] for r in rows.values()}) == 3
    assert rows["a"]["verdict"] == "inconclusive"  # the verdict set by hand follows the original row


def test_a_rerun_under_the_same_id_supersedes_it_and_a_taken_id_is_refused_before_work(tmp_path):
    from saelab.runs.ledger import check_ledger

    ledger = tmp_path / "l.sqlite"
    first = record_into(ledger, tmp_path / "a", control_result(diff=0.2), ledger_id="exp-1")
    again = record_into(ledger, tmp_path / "a", control_result(diff=0.3), ledger_id="exp-1")  # rewrote the file
    assert again.id == "exp-1.2" and Ledger(ledger).row(first.id)["superseded_by"] == "exp-1.2"

    from types import SimpleNamespace

    Cfg = SimpleNamespace(ledger=str(ledger), ledger_id="exp-1")

    check_ledger(Cfg, tmp_path / "a")  # the same run directory: a rerun, allowed
    with pytest.raises(LedgerError, match="taken by a eval row"):
        check_ledger(Cfg, tmp_path / "elsewhere")
    Cfg.ledger_id = "bad id!"
    with pytest.raises(LedgerError, match="short slug"):
        check_ledger(Cfg, tmp_path / "a")


def test_a_nan_comparison_is_inconclusive_and_prints(tmp_path):
    ledger = tmp_path / "l.sqlite"
    bad = control_result()
    bad.gaps["explained_variance"].diff_ci95 = [float("nan"), float("nan")]
    r = record_into(ledger, tmp_path / "a", bad)
    assert r.verdict == "inconclusive" and "nan" in Ledger(ledger).export("markdown")


def test_rebuild_rebases_a_moved_run_directory_with_results_in_subfolders(tmp_path):
    """A stage that writes RUN/steer/x.json: after the run directory moves, the rebuilt row points
    to the file's new place inside it, not to RUN/x.json."""
    live = tmp_path / "live.sqlite"
    run = tmp_path / "old" / "r"
    (run / "steer").mkdir(parents=True)
    result = control_result()
    result.write(run / "steer" / "x.json")
    rec = record(result, run, ledger=live, result_file=run / "steer" / "x.json")
    (tmp_path / "new").mkdir()
    run.rename(tmp_path / "new" / "r")
    rebuilt = tmp_path / "rebuilt.sqlite"
    assert rebuild(tmp_path / "new", rebuilt) ["replayed"] == 1
    row = Ledger(rebuilt).row(rec.id)
    assert row["result_file"] == str((tmp_path / "new" / "r" / "steer" / "x.json").resolve())
    assert Ledger(rebuilt).check() == []
