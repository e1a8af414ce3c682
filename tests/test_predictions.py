"""Stored test-set predictions and the metrics the report derives from them (issue 16, items 1, 2 and 6): each
metric against an independent computation (scikit-learn, or the definition written out), the files against
their rows, and the report over old rows that have none."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from sklearn.metrics import log_loss, precision_recall_fscore_support

from kdbench import metrics, predictions
from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.report import build_report
from kdbench.report.derived import add_derived, load_predictions
from kdbench.sweep.store import ResultsStore


def _logits(n: int = 300, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) * 2
    logits[torch.arange(n), labels] += 1.5  # better than chance, not perfect
    return logits, labels


# -- the metrics, against independent computations ----------------------------------------------------------------
def test_macro_scores_match_scikit_learn():
    logits, labels = _logits()
    pred = logits.argmax(1)
    pred[pred == 6] = 0  # a class never predicted: precision 0 by scikit-learn's zero_division=0
    p, r, f, _ = precision_recall_fscore_support(labels.numpy(), pred.numpy(), average="macro", zero_division=0,
                                                 labels=list(range(7)))
    got = metrics.macro_prf(pred, labels, 7)
    assert got == pytest.approx((100 * p, 100 * r, 100 * f), rel=1e-9)


def test_ece_matches_the_definition_written_out():
    logits, labels = _logits(n=500)
    probs = torch.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    total = 0.0
    for b in range(15):  # bin b: confidence in (b/15, (b+1)/15]
        members = [i for i in range(500) if b / 15 < conf[i] <= (b + 1) / 15]
        if members:
            acc = sum(int(pred[i] == labels[i]) for i in members) / len(members)
            total += len(members) * abs(acc - sum(float(conf[i]) for i in members) / len(members))
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(100 * total / 500, rel=1e-9)
    # a model that is always right with confidence 1 is perfectly calibrated; one always wrong at 1, 100% off
    onehot = torch.nn.functional.one_hot(labels, 7).double()
    assert metrics.expected_calibration_error(onehot, labels) == 0.0
    assert metrics.expected_calibration_error(onehot, (labels + 1) % 7) == pytest.approx(100.0)


def test_nll_matches_scikit_learn():
    logits, labels = _logits()
    probs = torch.softmax(logits.double(), 1).numpy()
    assert metrics.nll(logits, labels) == pytest.approx(log_loss(labels.numpy(), probs, labels=list(range(7))),
                                                        rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_to_the_teacher_and_the_teachers_ensemble(temperature):
    s, _ = _logits(n=40, seed=1)
    t1, _ = _logits(n=40, seed=2)
    t2, _ = _logits(n=40, seed=3)

    def direct(ps: list[list[float]], qs: list[list[float]]) -> float:
        return sum(sum(p * math.log(p / q) for p, q in zip(pr, qr)) for pr, qr in zip(ps, qs)) / len(ps)

    q = torch.softmax(s.double() / temperature, 1).tolist()
    p1 = torch.softmax(t1.double() / temperature, 1)
    p2 = torch.softmax(t2.double() / temperature, 1)
    assert metrics.kl_to_teacher([t1], s, temperature) == pytest.approx(direct(p1.tolist(), q), rel=1e-9)
    ensemble = ((p1 + p2) / 2).tolist()  # the teachers' ensemble: the mean of their probabilities
    assert metrics.kl_to_teacher([t1, t2], s, temperature) == pytest.approx(direct(ensemble, q), rel=1e-9)
    assert metrics.kl_to_teacher([s], s, temperature) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(metrics.kl_to_teacher([t1], s, float("nan")))


# -- stored with every run, derived by the report -------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A real sweep: kd and ce students (seeds 0 and 1) of a tiny CIFAR ResNet teacher on the embedded digits,
    2 epochs."""
    root = tmp_path_factory.mktemp("preds")
    assert main(["run", "--methods", "kd,ce", "--pairs", "cifar_resnet14:cifar_resnet8", "--seeds", "0,1",
                 "--limit", "96", "--epochs", "2", "--throughput-batch", "8", "-q", "--no-report",
                 "--results-dir", str(root)]) == 0
    return root


def _rows(root: Path) -> dict[str, dict]:
    """Seed 0's row of each method (and the teacher's)."""
    return {r["method"]: r for r in ResultsStore(root).rows() if r["seed"] == 0}


def test_every_run_keeps_its_predictions_and_the_report_derives_each_metric(results):
    rows = _rows(results)
    assert set(rows) == {"kd", "ce", "teacher"}
    data = {m: torch.load(results / r["predictions"], weights_only=True) for m, r in rows.items()}
    for m, r in rows.items():
        d = data[m]
        assert d["run_id"] == r["run_id"] and d["test_set"] == r["test_set_id"] and d["logits"].dtype == torch.float16
        assert d["logits"].shape == (r["test_size"], 10) and len(d["labels"]) == r["test_size"]
        # the stored logits are the last epoch's: their top-1 is the row's (fp16 may flip a near tie)
        top1 = 100 * float((d["logits"].float().argmax(1) == d["labels"]).double().mean())
        assert abs(top1 - r["top1_last"]) <= 100 / r["test_size"] + 1e-9
    assert len({r["test_set_id"] for r in rows.values()}) == 1

    import pandas as pd

    frame = pd.DataFrame(list(rows.values()))
    frame = add_derived(frame, load_predictions(frame, ResultsStore(results))).set_index("method")
    kd, labels = data["kd"]["logits"].float(), data["kd"]["labels"]
    p, r_, f, _ = precision_recall_fscore_support(labels.numpy(), kd.argmax(1).numpy(), average="macro",
                                                  zero_division=0, labels=list(range(10)))
    assert frame.loc["kd", "precision_macro"] == pytest.approx(100 * p)
    assert frame.loc["kd", "f1_macro"] == pytest.approx(100 * f) and frame.loc["kd", "recall_macro"] == \
        pytest.approx(100 * r_)
    probs = torch.softmax(kd.double(), 1)
    assert frame.loc["kd", "nll"] == pytest.approx(log_loss(labels.numpy(), probs.numpy(), labels=list(range(10))))
    assert frame.loc["kd", "ece"] == pytest.approx(metrics.expected_calibration_error(probs, labels))
    teacher = data["teacher"]["logits"].float()
    assert frame.loc["kd", "kl_teacher"] == pytest.approx(metrics.kl_to_teacher([teacher], kd, 1.0))
    assert frame.loc["kd", "kl_teacher_t"] == pytest.approx(metrics.kl_to_teacher([teacher], kd, 4.0))  # kd's T
    assert math.isnan(frame.loc["ce", "kl_teacher"])  # ce has no teacher
    assert math.isnan(frame.loc["teacher", "kl_teacher"]) and not math.isnan(frame.loc["teacher", "ece"])


def test_the_report_shows_several_metrics(results, tmp_path):
    paths = build_report(results, tmp_path / "rep", metric="top1_last,ece,kl_teacher")
    table = next(p for p in paths if p.name.startswith("table_") and p.suffix == ".md").read_text()
    assert "— top-1 at the last epoch" in table
    assert "## Expected calibration error (15 bins) at the last epoch, lower is better (%)" in table
    assert "## KL(teacher ‖ student) at T = 1 on the test set, lower is better (nats)" in table
    csv = next(p for p in paths if p.name.startswith("table_") and p.suffix == ".csv").read_text()
    assert {"top1_last", "ece", "kl_teacher"} <= {line.split(",")[10] for line in csv.splitlines()[1:]}
    assert "Metrics: top-1 at the last epoch; expected calibration error" in paths[-1].read_text()
    with pytest.raises(KdbenchError, match="unknown metric 'calibration'"):
        build_report(results, tmp_path / "rep2", metric="top1_last,calibration")


def _copy(results: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(results, root, ignore=shutil.ignore_patterns("report"))
    return root


def test_predictions_of_another_run_are_refused_naming_the_files(results, tmp_path, capsys):
    root = _copy(results, tmp_path)
    rows = _rows(root)
    kd, ce = root / rows["kd"]["predictions"], root / rows["ce"]["predictions"]
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    shutil.copy(ce, kd)  # kd's file now holds ce's predictions
    before[kd] = kd.read_bytes()
    code = main(["report", "--results-dir", str(root), "--metric", "ece", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"predictions file {kd} does not match its row" in err
    assert f"it is run {rows['ce']['run_id']}'s, not {rows['kd']['run_id']}'s" in err and "delete both" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_rows_of_different_test_sets_are_refused(results, tmp_path, capsys):
    root = _copy(results, tmp_path)
    store = ResultsStore(root)
    row_file = store.row_path(_rows(root)["ce"]["run_id"])
    row = json.loads(row_file.read_text())
    row["test_set_id"] = "0123456789abcdef"
    row_file.write_text(json.dumps(row))
    code = main(["report", "--results-dir", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "were scored on different test sets" in err and str(row_file) in err


def test_old_rows_without_predictions_still_report(results, tmp_path, capsys):
    """Rows written before predictions were kept: accuracy tables as before, derived metrics blank, and a derived
    metric no row has is a clear error."""
    root = _copy(results, tmp_path)
    store = ResultsStore(root)
    for row in store.rows():
        path = store.row_path(row["run_id"])
        old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("predictions", "test_set_id")}
        path.write_text(json.dumps(old))
    shutil.rmtree(root / "predictions")
    assert main(["report", "--results-dir", str(root), "--out", str(tmp_path / "a")]) == 0
    code = main(["report", "--results-dir", str(root), "--metric", "top1_last,nll", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "records the metric 'nll' (it is derived from stored test-set predictions" in err


def test_a_missing_predictions_file_is_named(results, tmp_path, capsys):
    root = _copy(results, tmp_path)
    kd = _rows(root)["kd"]
    (root / kd["predictions"]).unlink()
    code = main(["report", "--results-dir", str(root), "--metric", "f1_macro", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"names predictions file {root / kd['predictions']}, which is missing" in err


def test_test_set_id_depends_on_the_labels_and_their_order():
    labels = torch.tensor([0, 1, 2, 3])
    assert predictions.test_set_id("digits", labels) == predictions.test_set_id("digits", labels.clone())
    assert predictions.test_set_id("digits", labels) != predictions.test_set_id("digits", labels.flip(0))
    assert predictions.test_set_id("digits", labels) != predictions.test_set_id("mnist", labels)


# -- student ensembles from seeds (item 3) --------------------------------------------------------------------------
def test_an_ensembles_accuracy_is_the_mean_of_its_members_probabilities():
    """Three members on four images, by hand. Image 0: all right. Image 1: members 0 and 1 wrong with low
    confidence, member 2 right with high: the mean of probabilities is right (a majority vote would not be).
    Image 2: all wrong. Image 3: only member 0 right."""
    from kdbench.report.ensembles import ensemble_of

    labels = torch.tensor([0, 1, 1, 0])
    m0 = torch.tensor([[5.0, 0.0], [0.2, 0.0], [3.0, 0.0], [2.0, 0.0]])
    m1 = torch.tensor([[5.0, 0.0], [0.2, 0.0], [3.0, 0.0], [0.0, 2.0]])
    m2 = torch.tensor([[5.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.0, 2.0]])
    members, top1, diversity = ensemble_of([m0, m1, m2], labels)
    assert members == [50.0, 25.0, 50.0]
    # mean probability of class 1 on image 1: (σ(-0.2) + σ(-0.2) + σ(4)) / 3 = (0.450 + 0.450 + 0.982) / 3 > 0.5
    # on image 3: (σ(-2) + σ(2) + σ(2)) / 3 = (0.119 + 0.881 + 0.881) / 3 > 0.5: class 1, wrong
    assert top1 == 50.0  # images 0 and 1
    # disagreements: (m0, m1) image 3; (m0, m2) images 1 and 3; (m1, m2) image 1: 1/4, 2/4, 1/4 of the images
    assert diversity == pytest.approx(100 * (1 + 2 + 1) / 4 / 3)


def test_the_report_judges_seeds_as_ensembles(results, tmp_path):
    from kdbench.report.ensembles import seed_ensembles
    from kdbench.report.rows import load_rows

    store = ResultsStore(results)
    rows = load_rows(results)
    got = {e.method: e for e in seed_ensembles(rows, load_predictions(rows, store))}
    assert set(got) == {"kd", "ce"}  # the teacher has one seed
    kd_rows = sorted((r for r in store.rows() if r["method"] == "kd"), key=lambda r: r["seed"])
    logits = [torch.load(results / r["predictions"], weights_only=True)["logits"].double() for r in kd_rows]
    labels = torch.load(results / kd_rows[0]["predictions"], weights_only=True)["labels"]
    mean = sum(torch.softmax(x, 1) for x in logits) / 2  # by hand: the mean of the two members' probabilities
    kd = got["kd"]
    assert kd.seeds == (0, 1) and kd.top1 == pytest.approx(100 * float((mean.argmax(1) == labels).double().mean()))
    assert kd.member_top1 == pytest.approx(tuple(r["top1_last"] for r in kd_rows), abs=100 / len(labels) + 1e-9)
    assert kd.params == sum(r["params"] for r in kd_rows)
    assert kd.throughput == pytest.approx(1 / sum(1 / r["throughput_img_s"] for r in kd_rows))
    assert main(["report", "--results-dir", str(results), "--out", str(tmp_path / "rep"), "--ensemble-seeds"]) == 0
    table = next((tmp_path / "rep").glob("table_*.md")).read_text()
    assert "## Student ensembles (seeds)" in table and "| `kd` | cifar_resnet14→cifar_resnet8 | 2 |" in table
    assert next((tmp_path / "rep").glob("ensembles_*.csv")).read_text().startswith("method,pair,seeds,")


def test_the_cost_table_shows_the_ce_ratio_memory_and_what_teachers_cost(results, tmp_path):
    """Issue 16, item 4: per method the whole run's time, × ce on the same student and peak memory; per teacher its
    training time shared by its students."""
    build_report(results, tmp_path / "rep")
    table = next((tmp_path / "rep").glob("table_*.md")).read_text()
    assert "| method | s/epoch | s total | × ce | × kd | peak MB | extra params |" in table
    assert next(line for line in table.splitlines() if line.startswith("| `ce` |")).split(" | ")[3] == "1.00×"
    teachers = [r for r in ResultsStore(results).rows() if r["kind"] == "teacher"]
    students = [r for r in ResultsStore(results).rows() if r["kind"] == "student" and r["teacher_ids"]]
    for t in teachers:
        n = sum(t["run_id"] in s["teacher_ids"].split("+") for s in students)
        line = next(x for x in table.splitlines() if f"`{t['run_id']}`" in x).strip("|").split(" | ")
        assert [c.strip() for c in line] == ["cifar_resnet14", f"`{t['run_id']}`", f"{t['train_time_s']:.1f}", "—",
                                             str(n), f"{t['train_time_s'] / n:.2f}"]
    assert (tmp_path / "rep").glob("acc_vs_cost_*.png")
