import json

import numpy as np
import pytest

from saelab.data.fetch import ASSETS, DEB_ASSETS, asset_ready
from saelab.data.tasks import (
    BINARY_TASKS,
    BUILTINS,
    BinaryTask,
    TaskSpec,
    binary_tasks_of,
    binary_view,
    builtin_spec,
    builtin_task_file,
    lemma,
    load_task,
)


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


def _optional(asset: str) -> bool:
    return asset in DEB_ASSETS or ASSETS[asset].optional


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_tasks_build_from_their_real_sources(name):
    missing = [a for a in BUILTINS[name].assets if not asset_ready(a)]
    if missing:
        if all(_optional(a) for a in missing):
            pytest.skip(f"optional sources {missing} not fetched (saelab data fetch skips them where apt-get "
                        "or the registry is unavailable)")
        pytest.fail(f"{name}: run `saelab data fetch` first")
    path = builtin_task_file(name)
    assert path.stat().st_size > 0
    data = load_task(builtin_spec(name, max_per_class=100))
    assert len(data.classes) >= 2
    for c, counts in data.counts().items():
        assert counts["train"] >= 20 and counts["test"] >= 10, (c, counts)
    train_groups = {g for g, t in zip(data.groups, data.test, strict=True) if not t}
    assert not train_groups & {g for g, t in zip(data.groups, data.test, strict=True) if t}


def test_binary_views_keep_the_group_split_and_say_which_class_is_positive(tmp_path):
    f = _write(tmp_path / "t.jsonl", _rows(180, classes=("a", "b", "c")))
    spec = TaskSpec(name="t", source=str(f), group_field="doc", min_train=5, min_test=3)
    data = load_task(spec)
    tasks = binary_tasks_of(spec, data.classes)
    assert [t.name for t in tasks] == ["t_a", "t_b", "t_c"]
    b = binary_view(data, tasks[1])
    assert b.classes == ["not b", "b"] and b.labels.sum() == (data.labels == 1).sum() and len(b.texts) == 180
    assert (b.test == data.test).all()  # the base task's group split, unchanged
    pair = binary_view(data, BinaryTask("a_vs_c", "t", ("a",), ("c",)))
    assert pair.classes == ["c", "a"] and len(pair.texts) == 120
    assert binary_tasks_of(spec.model_copy(update={"name": "two"}), ["x", "y"])[0].positive == ("y",)
    with pytest.raises(ValueError, match=r"classes \['z'\] are not in task 't'"):
        binary_view(data, BinaryTask("bad", "t", ("z",)))


def test_there_are_at_least_30_built_in_binary_tasks_over_the_built_in_bases():
    assert len(BINARY_TASKS) >= 30
    assert {t.base for t in BINARY_TASKS.values()} <= set(BUILTINS)
