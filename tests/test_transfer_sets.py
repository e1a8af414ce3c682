"""Transfer sets and bias adjustment (Hinton et al. 2015, section 3), on the embedded digits.

What a transfer set does to the student's data (and only the student's), that run ids without one stay
what they were, that the rows count errors right with and without a bias offset, that the offset search
uses held-out images only, that unlabelled students train without any label, that the teacher cache
answers for the transfer set's own images, and that every bad request stops before training.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kdbench.train
from kdbench.bias import Bias, error_counts, search_offset, shifted
from kdbench.cli import main
from kdbench.data import DataSplits, holdout_indices, load_dataset
from kdbench.data.transfer import UNLABELLED, TransferSet
from kdbench.errors import KdbenchError
from kdbench.method import Method
from kdbench.recipe import Recipe
from kdbench.report.build import build_report
from kdbench.sweep import transfer as sweep_transfer
from kdbench.sweep.spec import RunSpec, TeacherSpec
from kdbench.sweep.transfer import bias_columns, student_data

PAIR = "hinton_mlp_300@0:hinton_mlp_30"
RUN = ["run", "--seeds", "0", "--limit", "300", "--epochs", "2", "--throughput-batch", "8", "-q", "--no-report"]


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


def rows_of(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*.json"))]


def students(root: Path) -> list[dict]:
    return [r for r in rows_of(root) if r["kind"] == "student"]


def suite_file(tmp_path: Path, pairs: str, recipe: str = "", name: str = "t") -> str:
    """A digits suite with the given pairs entries (TOML) and extra [recipe] lines."""
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndataset = "digits"\nseeds = [0]\npairs = [\n{pairs}\n]\n'
                    f'[recipe]\nbase = "digits"\ncrop_padding = 0\n{recipe}\n')
    return str(path)


class Spy:
    """Wraps kdbench.train.train: records what each run trained on, and what it returned."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        original = kdbench.train.train

        def spy(model, data, recipe, **kw):
            result = original(model, data, recipe, **kw)
            self.calls.append(dict(data=data, kw=kw, result=result))
            return result

        monkeypatch.setattr(kdbench.train, "train", spy)

    def students(self) -> list[dict]:
        return [c for c in self.calls if c["kw"].get("method") is not None]


# -- the transfer set itself --------------------------------------------------------------------

def test_apply_filters_classes_and_keeps_labels_and_the_test_set(digits):
    labels = digits.train_labels
    without = TransferSet(exclude_classes=(3,)).apply(digits)
    assert 3 not in without.train_labels.tolist()
    assert len(without.train_labels) == int((labels != 3).sum()) == without.info.train_size
    assert torch.equal(without.train_labels, labels[labels != 3])  # same labels, same order
    assert torch.equal(without.train_images, digits.train_images[labels != 3])
    assert without.test_images is digits.test_images and without.test_labels is digits.test_labels
    only = TransferSet(only_classes=(8, 7)).apply(digits)
    assert set(only.train_labels.tolist()) == {7, 8}
    assert only.info.train_size == int(((labels == 7) | (labels == 8)).sum())


def test_unlabelled_and_other_dataset_images(digits):
    unlabelled = TransferSet(unlabelled=True).apply(digits)
    assert torch.equal(unlabelled.train_images, digits.train_images)
    assert set(unlabelled.train_labels.tolist()) == {UNLABELLED}
    other = replace(digits, info=replace(digits.info, name="flipped"), train_images=digits.train_images.flip(-1))
    moved = TransferSet(dataset="flipped", exclude_classes=(0,)).apply(digits, other=other)
    assert torch.equal(moved.train_images, other.train_images[other.train_labels != 0])
    assert moved.info.name == "digits" and moved.test_images is digits.test_images  # tested on the suite's
    with pytest.raises(KdbenchError, match="needs the images of flipped"):
        TransferSet(dataset="flipped").apply(digits)


def test_labels_items_and_command_line():
    assert TransferSet().empty and TransferSet().label == "" and TransferSet().items() == ()
    t = TransferSet(exclude_classes=[5, 3])
    assert t.label == "without 3, 5" and t.items() == (("exclude_classes", (3, 5)),)
    assert TransferSet.from_items(json.loads(json.dumps(t.items()))) == t  # survives JSON (lists)
    assert TransferSet(only_classes=(7, 8)).label == "only 7, 8"
    assert TransferSet(dataset="fashion_mnist", unlabelled=True).label == "fashion_mnist images, unlabelled"
    assert TransferSet.from_cli(["only=7,8"]) == TransferSet(only_classes=(7, 8))
    assert TransferSet.from_cli(["dataset=x", "unlabelled"]) == TransferSet(dataset="x", unlabelled=True)
    assert TransferSet(only_classes=(7, 8)).absent_classes(10) == (0, 1, 2, 3, 4, 5, 6, 9)
    for bad in (["exclude"], ["unlabelled=1"], ["only=a"], ["bogus=3"]):
        with pytest.raises(KdbenchError, match="--transfer"):
            TransferSet.from_cli(bad)


def test_bias_syntax():
    assert Bias.parse({"3": 3.5}, "x") == Bias(((3, 3.5),))
    assert Bias.parse("val", "x") == Bias(search="val")
    assert Bias.parse({"7": -7.6, "8": -7.6, "search": "val"}, "x") == Bias(((7, -7.6), (8, -7.6)), "val")
    assert Bias.from_cli(["3=3.5", "val"]) == Bias(((3, 3.5),), "val")
    assert Bias.from_items(json.loads(json.dumps(Bias(((3, 3.5),), "val").items()))) == Bias(((3, 3.5),), "val")
    for bad, message in ((["3.5"], "must be written"), ("test", "only search is"), ({"given": {"3": 1}}, "neither"),
                         ({"3": "x"}, "must be a number"), (3.5, "must be written")):
        with pytest.raises(KdbenchError, match=message):
            Bias.parse(bad, "x")


# -- run ids ------------------------------------------------------------------------------------

def test_run_ids_without_transfer_or_bias_are_unchanged():
    """Golden ids, computed before the fields existed: stored results keep their ids."""
    r = Recipe(name="t", epochs=2, batch_size=64, lr=0.05, milestones=(1,))
    t = TeacherSpec("cifar_resnet14", "digits", r, 0, "cpu")
    kd = RunSpec("kd", (("ce_weight", 0.1), ("kd_weight", 0.9), ("temperature", 4.0)), (t,), "hinton_mlp_30",
                 "digits", r, 0, "cpu", method_source="abc", pair="x")
    ce = RunSpec("ce", (("ce_weight", 1.0),), (), "hinton_mlp_30", "digits", r, 1, "cpu")
    assert (t.run_id, kd.run_id, ce.run_id) == ("c93cb94113925746", "5296b201530285a4", "8b2e3d8ab8f2f294")
    without = replace(kd, transfer=TransferSet(exclude_classes=(3,)))
    shifted_3 = replace(without, bias=Bias(((3, 3.5),)))
    assert len({kd.run_id, without.run_id, shifted_3.run_id}) == 3
    assert without.label == "kd x on without 3 seed 0"


# -- bias arithmetic ----------------------------------------------------------------------------

def test_a_given_offset_shifts_exactly_that_class():
    torch.manual_seed(0)
    logits, labels = torch.randn(500, 10), torch.randint(0, 10, (500,))
    out = shifted(logits, {3: 3.5})
    assert torch.equal(out[:, 3], logits[:, 3] + 3.5)
    assert torch.equal(torch.cat([out[:, :3], out[:, 4:]], 1), torch.cat([logits[:, :3], logits[:, 4:]], 1))
    errors, per_class = error_counts(out, labels, 10)
    pred = out.argmax(1)
    assert errors == int((pred != labels).sum()) == sum(per_class)
    assert per_class == [int(((pred != labels) & (labels == c)).sum()) for c in range(10)]
    assert per_class[3] <= error_counts(logits, labels, 10)[1][3]  # raising 3 can only help the 3s


def test_the_search_lowers_validation_errors_and_never_reads_test_labels():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (400,))
    logits = torch.nn.functional.one_hot(labels, 10).float() * 4 + torch.randn(400, 10)
    logits[:, 3] -= 6.0  # a class the student never saw: under-predicted
    offset, after = search_offset(logits, labels, (3,))
    before = error_counts(logits, labels, 10)[0]
    assert after < before and 2.0 <= offset <= 10.0
    at_1 = error_counts(shifted(logits, {3: 1.0}), labels, 10)[0]
    assert search_offset(logits, labels, (3,), grid=(-1.0, 1.0, 0.0)) == (1.0, at_1)
    test = torch.randn(300, 10)
    t = TransferSet(exclude_classes=(3,))
    a = bias_columns(t, Bias(search="val"), test, torch.randint(0, 10, (300,)), (logits, labels))
    b = bias_columns(t, Bias(search="val"), test, torch.randint(0, 10, (300,)), (logits, labels))
    assert a["bias_val"] == b["bias_val"] == json.dumps({"3": offset})  # whatever the test labels
    assert a["bias_val_errors_after"] == after < a["bias_val_errors_before"] == before


def test_ties_prefer_the_smallest_offset():
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert search_offset(logits, labels, (1,))[0] == 0.0


def test_held_out_images_never_reach_the_student(digits):
    """Tag each training image with its index: none of the held-out ones is in any transfer set."""
    n = len(digits.train_labels)
    tagged = digits.train_images.clone()
    tagged[:, 0, 0, 0], tagged[:, 0, 0, 1] = torch.arange(n) % 256, torch.arange(n) // 256
    data = replace(digits, train_images=tagged)
    _, val = holdout_indices(digits.train_labels, 0.2)
    for t in (TransferSet(exclude_classes=(3,)), TransferSet(only_classes=(7, 8)), TransferSet(unlabelled=True)):
        got = student_data(data, t, {}, val_fraction=0.2)
        seen = set((got.train_images[:, 0, 0, 0].long() + 256 * got.train_images[:, 0, 0, 1].long()).tolist())
        assert not seen & set(val.tolist())
        assert seen  # and it trained on something


# -- runs ---------------------------------------------------------------------------------------

def test_a_run_without_3s(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    suite = suite_file(tmp_path, f'{{ pair = "{PAIR}", methods = ["ce", "kd"], transfer = {{ exclude_classes = [3] }}, '
                                 'bias = { 3 = 3.5 } },')
    assert main([*RUN, "--suite", suite, "--results-dir", str(tmp_path / "r")]) == 0
    teacher = [c for c in spy.calls if c["kw"].get("method") is None]
    assert teacher and 3 in teacher[0]["data"].train_labels.tolist()  # the teacher trains on every class
    assert len(spy.students()) == 2
    for call in spy.students():
        assert 3 not in call["data"].train_labels.tolist()
    test = load_dataset("digits", limit=300)
    by_method = {r["method"]: r for r in students(tmp_path / "r")}
    for call in spy.students():
        logits = call["result"].test_logits
        row = next(r for r in by_method.values() if r["transfer_train_size"] == len(call["data"].train_labels)
                   and abs(r["top1_last"] - call["result"].last.top1) < 1e-9)
        assert row["transfer"] == "without 3" and json.loads(row["transfer_absent"]) == [3]
        errors, per_class = error_counts(logits, test.test_labels, 10)
        assert row["test_errors"] == errors == round((100 - row["top1_last"]) * row["test_size"] / 100)
        assert [row[f"class_errors.{i}"] for i in range(10)] == per_class
        errors, per_class = error_counts(shifted(logits, {3: 3.5}), test.test_labels, 10)
        assert row["bias_given"] == '{"3": 3.5}' and row["test_errors_bias_given"] == errors
        assert [row[f"class_errors_bias_given.{i}"] for i in range(10)] == per_class
    out = build_report(tmp_path / "r", tmp_path / "report")
    table = next(p for p in out if p.name.startswith("table_") and "without-3" in p.name and p.suffix == ".md")
    text = table.read_text()
    assert "transfer: without 3" in text.splitlines()[0] and "## Test errors per class" in text and "on 3s" in text


def test_a_run_searching_the_offset_on_held_out_images(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    suite = suite_file(tmp_path, f'{{ pair = "{PAIR}", methods = ["kd"], transfer = {{ only_classes = [7, 8] }}, '
                                 'bias = "val" },', recipe="val_fraction = 0.2")
    assert main([*RUN, "--suite", suite, "--results-dir", str(tmp_path / "r")]) == 0
    (row,) = students(tmp_path / "r")
    assert row["transfer"] == "only 7, 8" and row["bias_given"] == ""
    offsets = json.loads(row["bias_val"])
    assert set(offsets) == {str(c) for c in (0, 1, 2, 3, 4, 5, 6, 9)} and len(set(offsets.values())) == 1
    assert row["bias_val_errors_after"] <= row["bias_val_errors_before"]
    assert row["bias_val_images"] == len(holdout_indices(load_dataset("digits", limit=300).train_labels, 0.2)[1])
    assert row["test_errors_bias_val"] == sum(row[f"class_errors_bias_val.{i}"] for i in range(10))
    # The student's data held neither another class nor a held-out image (tagged by their bytes).
    full = load_dataset("digits", limit=300)
    _, val = holdout_indices(full.train_labels, 0.2)
    held = {full.train_images[i].numpy().tobytes() for i in val.tolist()}
    kept = {full.train_images[i].numpy().tobytes() for i in range(300) if i not in set(val.tolist())}
    (call,) = spy.students()
    assert set(call["data"].train_labels.tolist()) == {7, 8}
    trained = {x.numpy().tobytes() for x in call["data"].train_images}
    assert not trained & (held - kept)


def test_unlabelled_students_train_without_labels(tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    entry = f'{{ pair = "{PAIR}", methods = ["ce", "kd", "dkd"], transfer = {{ unlabelled = true }} }},'
    suite = suite_file(tmp_path, entry, recipe="val_fraction = 0.2")
    assert main([*RUN, "--suite", suite, "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "'ce' learns from the labels alone" in out and "'dkd' cannot train without labels" in out
    (row,) = students(tmp_path / "r")
    assert row["method"] == "kd" and row["transfer"] == "unlabelled"
    assert "loss.ce" not in row and "loss.kd" in row
    assert row["top1_val_best"] is None and row["history_val_top1"] == ""  # unlabelled held-out images: no score
    (call,) = spy.students()
    assert call["kw"]["labelled"] is False and set(call["data"].train_labels.tolist()) == {UNLABELLED}


class LabelProbe(Method):
    """A test method that records the labels the engine hands it."""

    name = "label_probe"
    paper = "test"
    seen: list = []

    def forward(self, student, teachers, batch):
        LabelProbe.seen.append(batch.labels)
        return {"kd_like": (student.logits - teachers[0].logits).pow(2).mean()}


def test_the_engine_drops_cross_entropy_and_hides_labels(digits):
    from kdbench import zoo

    data = TransferSet(unlabelled=True).apply(load_dataset("digits", limit=100))
    kw = dict(num_classes=10, in_chans=1, img_size=8)
    LabelProbe.seen.clear()
    recipe = Recipe(name="t", epochs=1, batch_size=50, lr=0.05, milestones=())
    result = kdbench.train.train(zoo.create("hinton_mlp_30", **kw), data, recipe, seed=0,
                                 method=LabelProbe(ce_weight=1.0), teachers=[zoo.create("hinton_mlp_30", **kw)],
                                 labelled=False)
    assert LabelProbe.seen == [None, None] and set(result.last.losses) == {"kd_like"}


def test_a_transfer_dataset_is_loaded_checked_and_trained_on(tmp_path, monkeypatch):
    """Another dataset (here digits mirrored, standing in for one with the suite's classes)."""
    spy = Spy(monkeypatch)
    real = sweep_transfer.load_dataset

    def mirrored(name, **kw):
        data = real("digits", **kw)
        return replace(data, info=replace(data.info, name=name), train_images=data.train_images.flip(-1))

    monkeypatch.setattr(sweep_transfer, "load_dataset", mirrored)
    suite = suite_file(tmp_path, f'{{ pair = "{PAIR}", methods = ["kd"], transfer = {{ dataset = "mirror" }} }},')
    assert main([*RUN, "--suite", suite, "--results-dir", str(tmp_path / "r")]) == 0
    (row,) = students(tmp_path / "r")
    assert row["transfer"] == "mirror images"
    (call,) = spy.students()
    assert torch.equal(call["data"].train_images, load_dataset("digits", limit=300).train_images.flip(-1))


def test_the_teacher_cache_is_built_on_the_transfer_set(tmp_path):
    """Cached and online teachers give the same numbers on a transfer set; the cache is its own file."""
    suite = suite_file(tmp_path, f'{{ pair = "{PAIR}", methods = ["kd"], transfer = {{ exclude_classes = [3] }} }},',
                       recipe="val_fraction = 0.2")
    rows = {}
    for mode in ("on", "off"):
        assert main([*RUN, "--suite", suite, "--teacher-cache", mode, "--results-dir", str(tmp_path / mode)]) == 0
        (rows[mode],) = students(tmp_path / mode)
    assert rows["on"]["teacher_cache"] and not rows["off"]["teacher_cache"]
    for col in ("history_loss", "history_top1", "test_errors", "top1_last", "transfer_train_size"):
        assert rows["on"][col] == rows["off"][col], col
    (cache,) = (tmp_path / "on" / "cache").glob("*")
    assert re.search(r"-t[0-9a-f]{8}", cache.name)


# -- bad input: a clear error before training, nothing written ----------------------------------

def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(("entry", "recipe", "expected"), [
    ("transfer = { exclude_classes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }", "", r"excludes every class of digits"),
    ("bias = { 12 = 3.5 }", "", r"bias offset for class 12, which digits lacks .*classes are 0-9"),
    ("transfer = { exclude_classes = [3], only_classes = [7] }", "", r"both exclude_classes \[3\] and only_classes"),
    ("transfer = { only_classes = [7, 10] }", "", r"only_classes 10 out of range: digits has classes 0-9"),
    ('transfer = { dataset = "synthetic:cifar100" }', "", r"has 100 classes but digits has 10"),
    ('transfer = { dataset = "synthetic:cifar10" }', "", r"3x32x32 images but digits 1x8x8"),
    ('transfer = { exclude_classes = [3] }, bias = "val"', "", r"set \[recipe\] val_fraction"),
    ('bias = "val"', "val_fraction = 0.2", r"leaves out none"),
    ('transfer = { exclude_class = [3] }', "", r"unknown transfer key 'exclude_class'; did you mean 'exclude_classes'"),
    ('bias = { given = { 3 = 3.5 } }', "", r"neither a class index nor 'search'"),
    ('transfer = { unlabelled = true }', "val_fraction = 0.2\nearly_stop = 2", r"early_stop = 0"),
], ids=["every-class", "bias-class", "only-and-exclude", "out-of-range", "other-classes", "other-shape",
        "val-needs-fraction", "val-needs-absent", "unknown-key", "bias-syntax", "unlabelled-early-stop"])
def test_bad_transfer_and_bias_are_refused_before_training(entry, recipe, expected, tmp_path, capsys):
    root = tmp_path / "r"
    suite = suite_file(tmp_path, f'{{ pair = "{PAIR}", methods = ["kd"], {entry} }},', recipe=recipe)
    root.mkdir()
    before = snapshot(root)
    code = main([*RUN, "--suite", suite, "--results-dir", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kdbench: error: ") and "Traceback" not in err, err
    assert re.search(expected, err), err
    assert snapshot(root) == before


def test_bad_command_line_transfer_is_refused(tmp_path, capsys):
    code = main([*RUN, "--methods", "kd", "--pairs", PAIR, "--transfer", "exclude", "--results-dir", str(tmp_path)])
    assert code == 2 and "--transfer 'exclude'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_report_tables_per_transfer_set_with_grouped_absent_classes():
    """A table per transfer set, titled with it; many absent classes share one error column."""
    import pandas as pd

    from kdbench.report.aggregate import benchmarks
    from kdbench.report.transfer import errors_table

    def row(run_id, kind, method, transfer="", absent="[]", **extra):
        return dict(run_id=run_id, kind=kind, method=method, student="s" if kind == "student" else "t",
                    teachers="t" if method == "kd" else "", teacher_ids="T" if kind == "student" else "",
                    dataset="digits", schedule="x", shortened=False, seed=0, top1_last=90.0, transfer=transfer,
                    transfer_absent=absent, test_errors=10, **extra)

    only = {f"class_errors.{i}": 1 for i in range(10)}
    rows = pd.DataFrame([row("T", "teacher", "teacher"), row("a", "student", "kd"),
                         row("b", "student", "kd", "only 7, 8", "[0, 1, 2, 3, 4, 5, 6, 9]", **only,
                             bias_given='{"7": -7.6, "8": -7.6}', test_errors_bias_given=5)])
    benches = {b.transfer: b for b in benchmarks(rows)}
    assert set(benches) == {"", "only 7, 8"} and benches["only 7, 8"].title.endswith("· transfer: only 7, 8")
    assert set(benches["only 7, 8"].rows["run_id"]) == {"b", "T"}  # with the teacher its students name
    header, lines, _ = errors_table(benches["only 7, 8"].rows)
    assert header[:5] == ["method", "pair", "n", "test errors", "on 0, 1, 2, 3, 4, 5, 6, 9"]
    kd = next(line for line in lines if line[0] == "kd")
    assert kd[3:7] == ["10", "8", "-7.6 on 7, 8", "5"]
    assert errors_table(benches[""].rows) is None
