import json

import numpy as np
import pytest

from saelab.data.fetch import asset_ready
from saelab.data.tasks import BUILTINS, TaskSpec, builtin_spec, builtin_task_file, lemma, load_task


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=60, classes=("a", "b")):
    return [{"text": f"text {i}", "label": classes[i % len(classes)], "doc": f"d{i // 3}"} for i in range(n)]


def test_a_local_task_splits_by_group_and_stratifies(tmp_path):
    f = _write(tmp_path / "t.jsonl", _rows(120))
    data = load_task(TaskSpec(name="t", source=str(f), group_field="doc", min_train=5, min_test=3))
    train_groups = {g for g, t in zip(data.groups, data.test, strict=True) if not t}
    test_groups = {g for g, t in zip(data.groups, data.test, strict=True) if t}
    assert not train_groups & test_groups
    assert data.classes == ["a", "b"]
    for c in data.counts().values():
        assert c["train"] >= 5 and c["test"] >= 3
    assert 0.2 < data.test.mean() < 0.4


def test_csv_and_max_per_class(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("sentence,y\n" + "".join(f"row {i},{'xy'[i % 2]}\n" for i in range(200)))
    data = load_task(TaskSpec(name="c", source=str(f), text_field="sentence", label_field="y", max_per_class=40,
                              min_train=5, min_test=5))
    assert len(data.texts) <= 80 and set(np.unique(data.labels)) == {0, 1}


def test_bad_task_files_name_the_file_and_the_count(tmp_path):
    one = _write(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(30)])
    with pytest.raises(ValueError, match=r"one\.jsonl has 1 class \('x': 30 examples\)"):
        load_task(TaskSpec(name="one", source=str(one)))
    rows = _rows(40)
    rows[3]["label"] = ""
    del rows[7]["label"]
    missing = _write(tmp_path / "missing.jsonl", rows)
    with pytest.raises(ValueError, match=r"missing\.jsonl has 2 rows without a label in field 'label'"):
        load_task(TaskSpec(name="m", source=str(missing)))
    few = _write(tmp_path / "few.jsonl", _rows(24))
    with pytest.raises(ValueError, match=r"few\.jsonl class 'a' has \d+ test examples \(12 in all.*needs at least 10"):
        load_task(TaskSpec(name="f", source=str(few)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task(TaskSpec(name="n", source=str(tmp_path / "nope.jsonl")))


def test_lemma_groups_related_spellings():
    assert lemma("happily") == lemma("happiness") == lemma("happy")
    assert lemma("dogs") == lemma("dog")
    assert lemma("cat") != lemma("car")


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "language_id"] + ["language_id"])
def test_builtin_tasks_build_from_their_real_sources(name):
    if not all(asset_ready(a) for a in BUILTINS[name].assets):
        if name == "language_id":
            pytest.skip("optional Debian fortunes-* not fetched (saelab data fetch needs apt-get)")
        pytest.fail(f"{name}: run `saelab data fetch` first")
    path = builtin_task_file(name)
    assert path.stat().st_size > 0
    data = load_task(builtin_spec(name, max_per_class=100))
    assert len(data.classes) >= 2
    for c, counts in data.counts().items():
        assert counts["train"] >= 20 and counts["test"] >= 10, (c, counts)
    train_groups = {g for g, t in zip(data.groups, data.test, strict=True) if not t}
    assert not train_groups & {g for g, t in zip(data.groups, data.test, strict=True) if t}
