"""Tests of kdbench.report.reproduce (and its markdown): published cells against hand-made result rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kdbench.errors import KdbenchError
from kdbench.report.reproduce import (
    COLUMNS,
    Cell,
    check_ordering,
    compare,
    write_reproduction,
)
from kdbench.report.reproduce_markdown import NOT_REAL_WARNING
from kdbench.report.reproduce_markdown import reproduction_markdown as markdown
from kdbench.suites import Tolerance

R56, R110, R20 = "cifar_resnet56", "cifar_resnet110", "cifar_resnet20"
BIG, SMALL = "mnist_mlp_big", "mnist_mlp_small"
FULL = "crd, 240 epochs"
SHORT = "crd, shortened: 24 of 240 epochs"
CRD, HINTON = "CRD (Tian et al., ICLR 2020) Table 1", "Hinton et al. 2015, MNIST"


def row(method: str, teachers: str, student: str, seed: int, last: float, best: float, *,
        dataset: str = "cifar100", test_size: int = 10_000, schedule: str = FULL,
        **extra) -> dict:
    """One run row with the columns compare() reads (the store's flat shape)."""
    kind = "teacher" if method == "teacher" else "student"
    return {
        "run_id": f"{method}-{teachers}-{student}-s{seed}", "kind": kind, "method": method,
        "teachers": teachers, "student": student, "dataset": dataset, "seed": seed,
        "top1_last": last, "top1_best": best, "test_size": test_size, "schedule": schedule,
        "shortened": "shortened" in schedule, **extra,
    }


def runs(method: str, teachers: str, student: str, last: list[float], best: list[float],
         **kw) -> list[dict]:
    return [row(method, teachers, student, s, a, b, **kw) for s, (a, b) in enumerate(zip(last, best))]


# No real_data column: rows written before it existed count as real data.
CIFAR = pd.DataFrame(
    runs("teacher", "", R56, [72.34], [72.80])
    + runs("ce", "", R20, [69.0, 69.4, 68.9], [69.5, 69.8, 69.3])
    + runs("kd", R56, R20, [70.6, 70.8, 71.0], [71.2, 71.3, 71.1])
    + runs("kd", R110, R20, [69.5, 70.0, 70.5], [70.1, 70.4, 70.9])
    + runs("fitnets", R110, R20, [69.9], [70.2])
)
MNIST = pd.DataFrame(
    runs("teacher", "", BIG, [99.33, 99.31], [99.40, 99.38], dataset="mnist")
    + runs("ce", "", SMALL, [98.54], [98.60], dataset="mnist")
    + runs("kd", BIG, SMALL, [99.20], [99.25], dataset="mnist")
)


def cell(teachers, student, method, value, selection="last", *, paper=None, metric="top1",
         source=CRD, table="1", note="") -> Cell:
    return Cell(tuple(teachers), student, method, paper or method, metric, value, selection,
                source, table, note)


CELLS = [
    cell([R56], R20, "teacher", 72.34),
    cell([R56], R20, "ce", 69.06, paper="student_ce"),
    cell([R56], R20, "kd", 70.2),                     # Δ = +0.6 > max(2 × 0.2, 0.5): outside
    cell([R56], R20, "fitnets", 69.21, paper="fitnet"),  # fitnets was run on R110 only
    cell([R56], R20, "crd", 71.16),                   # kdbench has no crd
    cell([R110], R20, "teacher", 74.31),              # no R110 teacher run
    cell([R110], R20, "ce", 69.06, "best", paper="student_ce"),
    cell([R110], R20, "kd", 70.8),                    # Δ = -0.8 <= 2 × 0.5: within
    cell([R110], R20, "fitnets", 70.0, paper="fitnet", note="mean of 5 runs"),
    cell([R110], R20, "crd", 71.5),
    cell([BIG], SMALL, "teacher", 67, metric="test_errors", source=HINTON, table="2"),
    cell([BIG], SMALL, "kd", 74, metric="test_errors", source=HINTON, table="2"),
    cell([BIG], SMALL, "ce", 120, metric="test_errors", source=HINTON, table="2"),
]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return compare(pd.concat([CIFAR, MNIST], ignore_index=True), CELLS, Tolerance())


def line(table: pd.DataFrame, pair: str, method: str) -> pd.Series:
    hit = table[(table["pair"] == pair) & (table["method"] == method)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_one_line_per_cell_in_order(table):
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == len(CELLS)
    assert list(table["method"]) == [c.method for c in CELLS]
    assert table["pair"].iloc[0] == f"{R56}→{R20}"


def test_mean_std_delta_at_the_cells_rule(table):
    kd = line(table, f"{R56}→{R20}", "kd")
    assert kd["kdbench"] == pytest.approx(70.8)
    assert kd["kdbench_std"] == pytest.approx(0.2)
    assert kd["delta"] == pytest.approx(0.6)
    assert kd["other_rule"] == pytest.approx(71.2)
    assert kd["other_rule_name"] == "best epoch"
    assert kd["seeds"] == 3


def test_selection_rule_picks_the_column(table):
    # One ce run set serves both pairs; the cells ask for different rules.
    last = line(table, f"{R56}→{R20}", "ce")
    best = line(table, f"{R110}→{R20}", "ce")
    assert last["kdbench"] == pytest.approx(np.mean([69.0, 69.4, 68.9]))
    assert best["kdbench"] == pytest.approx(np.mean([69.5, 69.8, 69.3]))
    assert best["other_rule"] == pytest.approx(last["kdbench"])
    assert best["other_rule_name"] == "last epoch"
    assert best["delta"] == pytest.approx(best["kdbench"] - 69.06)


def test_tolerance_floor_and_sigma_branches(table):
    floor = line(table, f"{R56}→{R20}", "kd")  # σ = 0.2: 2σ < 0.5
    assert floor["tolerance"] == pytest.approx(0.5)
    assert floor["verdict"] == "outside"
    sigma = line(table, f"{R110}→{R20}", "kd")  # σ = 0.5: 2σ = 1.0 covers Δ = -0.8
    assert sigma["kdbench_std"] == pytest.approx(0.5)
    assert sigma["tolerance"] == pytest.approx(1.0)
    assert sigma["delta"] == pytest.approx(-0.8)
    assert sigma["verdict"] == "within"
    one_seed = line(table, f"{R110}→{R20}", "fitnets")  # no σ: the floor alone
    assert math.isnan(one_seed["kdbench_std"])
    assert one_seed["tolerance"] == pytest.approx(0.5)
    assert one_seed["verdict"] == "within"


def test_gap_equal_to_tolerance_is_within():
    rows = pd.DataFrame(runs("kd", R56, R20, [70.73], [70.9]))
    out = compare(rows, [cell([R56], R20, "kd", 70.23)], Tolerance())
    assert out["verdict"].iloc[0] == "within"


def test_test_errors_conversion_and_relative_tolerance(table):
    pair = f"{BIG}→{SMALL}"
    teacher = line(table, pair, "teacher")  # 99.33 % and 99.31 % of 10000: 67 and 69 errors
    assert teacher["kdbench"] == pytest.approx(68.0)
    assert teacher["kdbench_std"] == pytest.approx(math.sqrt(2))
    assert teacher["other_rule"] == pytest.approx(61.0)
    kd = line(table, pair, "kd")  # 80 errors against 74: |6| <= 0.15 × 74
    assert (kd["kdbench"], kd["delta"]) == (pytest.approx(80.0), pytest.approx(6.0))
    assert kd["tolerance"] == pytest.approx(11.1)
    assert kd["verdict"] == "within"
    ce = line(table, pair, "ce")  # 146 errors against 120: 26 > 18
    assert ce["kdbench"] == pytest.approx(146.0)
    assert ce["tolerance"] == pytest.approx(18.0)
    assert ce["verdict"] == "outside"


def test_not_run(table):
    for pair, method in ((f"{R56}→{R20}", "fitnets"), (f"{R56}→{R20}", "crd"),
                         (f"{R110}→{R20}", "teacher")):
        missing = line(table, pair, method)
        assert missing["verdict"] == "not run"
        assert missing["seeds"] == 0
        assert math.isnan(missing["kdbench"]) and math.isnan(missing["delta"])


def test_shared_teacher_and_ce_rows_serve_several_pairs():
    cells = [cell([R56], R20, "teacher", 72.0), cell([R56], "cifar_resnet8", "teacher", 72.0),
             cell([R56], R20, "ce", 69.0), cell([R110], R20, "ce", 69.0)]
    out = compare(CIFAR, cells, Tolerance())
    assert list(out["seeds"]) == [1, 1, 3, 3]
    assert out["kdbench"].iloc[0] == out["kdbench"].iloc[1] == pytest.approx(72.34)
    assert out["kdbench"].iloc[2] == out["kdbench"].iloc[3]


def test_kd_runs_match_only_their_teachers():
    ensemble = pd.DataFrame(runs("kd", f"{R56}+{R110}", R20, [75.0], [75.0]))
    rows = pd.concat([CIFAR, ensemble], ignore_index=True)
    out = compare(rows, [cell([R56], R20, "kd", 70.0), cell([R56, R110], R20, "kd", 75.0)],
                  Tolerance())
    assert list(out["seeds"]) == [3, 1]
    assert out["pair"].iloc[1] == f"{R56}+{R110}→{R20}"
    assert out["kdbench"].iloc[1] == pytest.approx(75.0)


def test_not_real_data_gets_no_verdict():
    synthetic = pd.DataFrame(runs("kd", R56, R20, [1.0, 1.2], [1.1, 1.3], real_data=False))
    real = pd.DataFrame(runs("ce", "", R20, [69.0], [69.5], real_data=True))
    out = compare(pd.concat([synthetic, real], ignore_index=True),
                  [cell([R56], R20, "kd", 70.0), cell([R56], R20, "ce", 69.0)], Tolerance())
    assert list(out["verdict"]) == ["not real data", "within"]
    assert out["kdbench"].iloc[0] == pytest.approx(1.1)  # the number is still shown
    assert list(out["real_data"]) == [False, True]
    md = markdown(out, title="t", tolerance=Tolerance())
    assert NOT_REAL_WARNING in md
    assert "1 of 1 cells within tolerance" in md


def test_shortened_runs_keep_a_verdict_and_are_marked():
    rows = pd.DataFrame(runs("kd", R56, R20, [62.0], [62.5], schedule=SHORT))
    out = compare(rows, [cell([R56], R20, "kd", 70.66)], Tolerance())
    assert out["verdict"].iloc[0] == "outside"
    assert out["schedule"].iloc[0] == SHORT
    md = markdown(out, title="t", tolerance=Tolerance())
    assert "outside (shortened)" in md
    assert "**Shortened schedule**" in md and SHORT in md
    assert "NOT REAL DATA" not in md


def test_ordering_holds_or_not(table):
    lines = check_ordering(table, ("teacher", "kd", "ce"))
    # R110→R20 has no teacher run: skipped; test errors: lower is better.
    assert lines == [
        f"{R56}→{R20}: teacher 72.34 > kd 70.80 > ce 69.10 top-1 % (last epoch) — holds",
        f"{BIG}→{SMALL}: teacher 68 < kd 80 < ce 146 test errors — holds",
    ]
    wrong = check_ordering(table, ("ce", "kd"))
    assert wrong[0] == f"{R56}→{R20}: ce 69.10 < kd 70.80 top-1 % (last epoch) — does not hold"
    assert wrong[-1].endswith("test errors — does not hold")
    assert check_ordering(table, ("kd", "crd")) == []


def test_markdown_tables_and_unimplemented_line(table):
    md = markdown(table, title="CRD Table 1 · crd, 240 epochs", tolerance=Tolerance())
    assert md.startswith("# CRD Table 1 · crd, 240 epochs\n")
    assert "NOT REAL DATA" not in md and "shortened" not in md
    assert "**7 of 9 cells within tolerance (4 not run).**" in md
    assert "## Table 1" in md and "## Table 2" in md
    assert md.index("## Table 1") < md.index("## Table 2")
    assert "Published cells of methods not run here (no kdbench plugin, or not among the methods run): crd (2)." in md
    table_lines = [t for t in md.splitlines() if t.startswith("| ")]
    assert not any("| crd" in t for t in table_lines)
    # An implemented method's missing pair stays in the table; paper names in parentheses.
    # Table 1 mixes rules, so its published and other-rule cells name theirs.
    assert (f"| {R56}→{R20} | fitnets (fitnet) | 69.21 (last epoch) | — | — | — | not run |"
            in table_lines)
    assert (f"| {R56}→{R20} | kd | 70.20 (last epoch) | 70.80 ± 0.20 (n=3) | 71.20 (best epoch) "
            "| +0.60 (±0.50) | outside |" in table_lines)
    assert "69.06 (best epoch)" in md
    # Table 2 has one rule: the header names it.
    assert f"| {BIG}→{SMALL} | ce | 120 | 146 (n=1) | 140 | +26 (±18.0) | outside |" in table_lines
    assert "published test errors (last epoch)" in md
    assert "mean of 5 runs" in md


def test_write_reproduction_files(table, tmp_path):
    ordering = check_ordering(table, ("teacher", "kd", "ce"))
    paths = write_reproduction(table, tmp_path, suite="CRD Table 1", title="CRD · crd, 240 epochs",
                               ordering_lines=ordering, extra_notes=["a note"])
    assert [p.name for p in paths] == ["reproduce_crd-table-1.md", "reproduce_crd-table-1.csv",
                                       "published_vs_kdbench_crd-table-1.png"]
    assert all(p.parent == tmp_path and p.exists() for p in paths)
    assert not list(tmp_path.glob(".*.tmp")), "temp files left behind"
    md = paths[0].read_text(encoding="utf-8")
    assert ordering[0] in md and "a note" in md and paths[2].name in md
    csv = pd.read_csv(paths[1], keep_default_na=False)
    assert list(csv.columns) == list(COLUMNS) and len(csv) == len(CELLS)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_kdbench_value_writes_no_plot(tmp_path):
    out = compare(CIFAR, [cell([R56], R20, "crd", 71.16)], Tolerance())
    paths = write_reproduction(out, tmp_path, suite="x", title="x")
    assert [p.suffix for p in paths] == [".md", ".csv"]


@pytest.mark.parametrize("bad, message", [
    (cell([R56], R20, "kd", 70.0, metric="top5"), "metric 'top5'"),
    (cell([R56], R20, "kd", 70.0, selection="final"), "selection rule 'final'"),
    (cell([R56, R110], R20, "teacher", 70.0), "one cell per teacher"),
])
def test_bad_cells_are_named(bad, message):
    with pytest.raises(KdbenchError, match=message):
        compare(CIFAR, [bad], Tolerance())


def test_two_runs_of_one_seed_are_refused():
    rows = pd.concat([CIFAR, pd.DataFrame(runs("ce", "", R20, [10.0], [10.0]))], ignore_index=True)
    with pytest.raises(KdbenchError, match="share a seed"):
        compare(rows, [cell([R56], R20, "ce", 69.0)], Tolerance())


def test_test_errors_need_test_size():
    rows = MNIST.drop(columns="test_size")
    with pytest.raises(KdbenchError, match="test_size"):
        compare(rows, [CELLS[-1]], Tolerance())


# -- transfer sets, bias offsets, one class's errors ---------------------------------------------
def _transfer_rows() -> pd.DataFrame:
    """kd on the full training set, and on the set without 3s with and without the 3's bias raised."""
    full = runs("kd", BIG, SMALL, [99.20], [99.25], dataset="mnist")
    no3 = [row("kd", BIG, SMALL, s, last, last + 0.1, dataset="mnist", transfer="without 3",
               test_errors=errors, test_errors_bias_given=adjusted,
               **{"class_errors.3": on3, "class_errors_bias_given.3": adj3})
           for s, (last, errors, adjusted, on3, adj3) in enumerate([(97.90, 210, 110, 130, 16),
                                                                      (97.96, 204, 104, 136, 12)])]
    return pd.DataFrame(full + no3)


def _no3(value, *, metric="test_errors", bias="", of_class=None) -> Cell:
    return Cell((BIG,), SMALL, "kd", "soft_targets", metric, value, "last", HINTON, "no 3", "",
                transfer="without 3", bias=bias, of_class=of_class)


def test_a_transfer_set_cell_reads_only_the_runs_on_that_transfer_set():
    out = compare(_transfer_rows(), [_no3(206), Cell((BIG,), SMALL, "kd", "kd", "test_errors", 74, "last", HINTON)],
                  Tolerance())
    no3, full = out.iloc[0], out.iloc[1]
    assert (no3["kdbench"], no3["seeds"]) == (pytest.approx(207.0), 2)  # 210 and 204 from top-1 97.90/97.96
    assert no3["measured_on"] == "transfer without 3"
    assert (full["kdbench"], full["seeds"]) == (pytest.approx(80.0), 1)  # not averaged with the no-3 runs


def test_bias_and_one_class_cells_read_the_measured_counts_at_the_last_epoch_only():
    cells = [_no3(109, bias="given"), _no3(133, of_class=3), _no3(14, bias="given", of_class=3),
             _no3(1.09, metric="test_error_pct", bias="given")]
    out = compare(_transfer_rows(), cells, Tolerance())
    assert out["kdbench"].tolist() == pytest.approx([107.0, 133.0, 14.0, 1.07])
    assert out["other_rule"].isna().all()  # the offsets act on the last epoch's logits: no best-epoch value
    assert out["measured_on"].tolist()[2] == "transfer without 3 · bias offsets given · on class 3"
    text = markdown(out, title="t", tolerance=Tolerance())
    assert "kd (soft_targets); transfer without 3 · bias offsets given · on class 3" in text


def test_error_percent_cells_use_the_relative_tolerance():
    out = compare(_transfer_rows(), [_no3(2.0, metric="test_error_pct")], Tolerance(relative=0.15))
    line_ = out.iloc[0]
    assert line_["kdbench"] == pytest.approx(2.07) and line_["tolerance"] == pytest.approx(0.3)
    assert line_["verdict"] == "within"


def test_runs_without_the_bias_counts_are_an_error_that_says_how_to_get_them():
    rows = pd.DataFrame([row("kd", BIG, SMALL, 0, 97.9, 98.0, dataset="mnist", transfer="without 3")])
    with pytest.raises(KdbenchError, match="record no test_errors_bias_given.*set the pair's bias"):
        compare(rows, [_no3(109, bias="given")], Tolerance())


def test_the_ordering_check_leaves_out_transfer_set_cells():
    table = compare(_transfer_rows(), [Cell((BIG,), SMALL, "kd", "kd", "test_errors", 74, "last", HINTON),
                                       _no3(206)], Tolerance())
    assert check_ordering(table, ["kd"]) == []  # one method: nothing to order, and no-3 is not a second kd
    assert len(check_ordering(table.assign(method=["kd", "ce"]), ["kd", "ce"])) == 0
