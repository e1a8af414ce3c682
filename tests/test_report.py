"""Tests of kdbench.report: tables and plots derived from a hand-made results store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kdbench.errors import KdbenchError
from kdbench.report.build import build_report, load_rows

FULL = "crd, 240 epochs"
SHORT = "crd, shortened: 24 of 240 epochs"
PARAMS = {"cifar_resnet20": 278_324, "cifar_wrn_16_2": 703_284, "cifar_resnet56": 861_620,
          "cifar_wrn_40_2": 2_255_156}
SPEED = {"cifar_resnet20": 31_000.0, "cifar_wrn_16_2": 22_000.0, "cifar_resnet56": 11_500.0,
         "cifar_wrn_40_2": 6_200.0}
R56, WRN, R20, W16 = "cifar_resnet56", "cifar_wrn_40_2", "cifar_resnet20", "cifar_wrn_16_2"


def row(method: str, teachers: str, student: str, seed: int, top1: float, *, schedule: str = FULL,
        epochs: int = 240, device: str = "NVIDIA H100", dataset: str = "cifar100") -> dict:
    """One run row, flat, the way the store writes it (plus columns the report must ignore)."""
    kind = "teacher" if method == "teacher" else "student"
    pair = f"{student}→" if kind == "teacher" else f"{teachers}→{student}"
    return {
        "run_id": f"{dataset}-{method}-{teachers}-{student}-{epochs}-s{seed}",
        "kind": kind, "method": method,
        "method_paper": f"Paper of {method}" if kind == "student" else "",
        "teachers": teachers, "student": student, "pair": pair, "dataset": dataset, "recipe": "crd",
        "epochs": epochs, "recipe_epochs": 240, "shortened": epochs < 240, "schedule": schedule,
        "seed": seed, "top1_last": top1, "top5_last": top1 + 20.0, "top1_best": top1 + 0.5,
        "top5_best": top1 + 20.5, "best_epoch": epochs - 3,
        "agreement": float("nan") if method in ("ce", "teacher") else 80.0 + seed,
        "params": PARAMS[student], "extra_params": 4096 if method == "fitnets" else 0,
        "flops_per_image": PARAMS[student] * 150, "throughput_img_s": SPEED[student] + seed,
        "throughput_batch": 256, "throughput_device": device, "throughput_dtype": "float16",
        "train_time_s": 1000.0, "peak_mem_mb": 900.0, "device": device, "git_commit": "abc1234",
        "command": f"kdbench run {method} --seed {seed}", "kdbench_version": "0.1.0",
        "torch_version": "2.5.0", "timm_version": "1.0.11",
        "finished_at": f"2025-01-0{seed + 1}T12:00:00",
        "hp.temperature": 4.0, "loss.kd": 0.3, "class_f1.0": 0.7, "some_future_column": [1, 2],
    }


# (method, teachers, student) -> per-seed top-1; three seeds in the full benchmark
FULL_RUNS = {
    ("teacher", "", R56): [72.34, 72.01, 72.50],
    ("teacher", "", WRN): [75.61, 75.40, 75.93],
    ("ce", "", R20): [69.06, 68.80, 69.41],
    ("ce", "", W16): [73.26, 72.90, 73.02],
    ("kd", R56, R20): [70.66, 70.40, 70.95],
    ("kd", f"{R56}+{WRN}", R20): [71.10, 70.70, 71.31],
    ("kd", WRN, W16): [74.92, 74.70, 75.20],
    ("fitnets", R56, R20): [69.21, 68.90, 69.70],
    ("fitnets", WRN, W16): [73.58, 73.10, 73.90],
}
SHORT_RUNS = {
    ("teacher", "", R56): [70.10],
    ("ce", "", R20): [60.50],
    ("kd", R56, R20): [62.25],
}


def write_store(root: Path, runs: dict, schedule: str = FULL, epochs: int = 240, **kw) -> None:
    """Write one JSON file per run into root/runs, as the results store does."""
    (root / "runs").mkdir(parents=True, exist_ok=True)
    for (method, teachers, student), values in runs.items():
        for seed, top1 in enumerate(values):
            r = row(method, teachers, student, seed, top1, schedule=schedule, epochs=epochs, **kw)
            (root / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("results")
    write_store(root, FULL_RUNS)
    write_store(root, SHORT_RUNS, schedule=SHORT, epochs=24)
    return root, build_report(root)


def stat(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1))


def table_lines(md: str) -> list[list[str]]:
    """The cells of the first markdown table."""
    block = md.split("\n\n")
    table = next(b for b in block if b.startswith("| method"))
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()]


FULL_SLUG, SHORT_SLUG = "cifar100_crd-240ep", "cifar100_crd-shortened-24-of-240ep"


def test_files_per_benchmark(report):
    root, paths = report
    names = [p.name for p in paths]
    for slug in (FULL_SLUG, SHORT_SLUG):
        for stem in ("table_{}.md", "table_{}.csv", "acc_vs_params_{}.png", "acc_vs_throughput_{}.png",
                     "bars_{}.png"):
            assert stem.format(slug) in names
    assert names[-1] == "index.md"
    assert all(p.parent == root and p.exists() for p in paths)
    assert not list(root.glob(".*.tmp")), "temp files left behind"
    index = (root / "index.md").read_text()
    assert all(n in index for n in names[:-1])


def test_pngs_are_valid(report):
    _, paths = report
    pngs = [p for p in paths if p.suffix == ".png"]
    # per benchmark (2): accuracy against parameters, throughput and training cost, and the bars
    assert len(pngs) == 8 and sum(p.name.startswith("acc_vs_cost_") for p in pngs) == 2
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 20_000


def test_markdown_values_and_order(report):
    root, _ = report
    md = (root / f"table_{FULL_SLUG}.md").read_text()
    lines = table_lines(md)
    pairs = [f"{R56} → {R20}", f"{R56}+{WRN} → {R20}", f"{WRN} → {W16}"]
    assert lines[0] == ["method"] + pairs
    assert [line[0] for line in lines[2:]] == ["teacher", "ce", "fitnets", "kd"]
    cells = {line[0]: dict(zip(pairs, line[1:])) for line in lines[2:]}

    def expect(values, base=None) -> str:
        mean, std = stat(values)
        text = f"{mean:.2f} ± {std:.2f}"
        return text if base is None else f"{text} ({mean - np.mean(base):+.2f})"

    ce20, ce16 = FULL_RUNS[("ce", "", R20)], FULL_RUNS[("ce", "", W16)]
    assert cells["kd"][pairs[0]] == expect(FULL_RUNS[("kd", R56, R20)], ce20)
    assert cells["kd"][pairs[1]] == expect(FULL_RUNS[("kd", f"{R56}+{WRN}", R20)], ce20)
    assert cells["kd"][pairs[2]] == expect(FULL_RUNS[("kd", WRN, W16)], ce16)
    assert cells["fitnets"][pairs[0]] == expect(FULL_RUNS[("fitnets", R56, R20)], ce20)
    assert cells["fitnets"][pairs[1]] == ""  # no run
    # one ce run serves both pairs with the same student
    assert cells["ce"][pairs[0]] == cells["ce"][pairs[1]] == expect(ce20)
    assert cells["ce"][pairs[2]] == expect(ce16)
    assert cells["teacher"][pairs[0]] == expect(FULL_RUNS[("teacher", "", R56)])
    ensemble = [f"{np.mean(FULL_RUNS[('teacher', '', t)]):.2f}" for t in (R56, WRN)]
    assert cells["teacher"][pairs[1]] == " / ".join(ensemble)
    assert "n=3" in md


def test_markdown_titles_and_footer(report):
    root, _ = report
    md = (root / f"table_{FULL_SLUG}.md").read_text()
    title = md.splitlines()[0]
    assert "cifar100" in title and FULL in title and "top-1 at the last epoch" in title
    assert "shortened" not in md.lower()
    assert "images/s (NVIDIA H100, batch 256, float16)" in md
    assert "0.28M" in md  # resnet20 params
    for text in ("0.1.0", "abc1234", "2.5.0", "1.0.11", "runs: 27", "kdbench run kd --seed 2"):
        assert text in md


def test_shortened_benchmark(report):
    root, _ = report
    assert "shortened" in SHORT_SLUG
    md = (root / f"table_{SHORT_SLUG}.md").read_text()
    assert "shortened" in md.splitlines()[0]
    lines = table_lines(md)
    assert lines[0] == ["method", f"{R56} → {R20}"]
    assert lines[2:] == [["teacher", "70.10"], ["ce", "60.50"], ["kd", "62.25 (+1.75)"]]
    assert "n=1" in md
    csv = pd.read_csv(root / f"table_{SHORT_SLUG}.csv")
    assert (csv["schedule"] == SHORT).all() and csv["shortened"].all()
    # the full benchmark's runs are not mixed in
    assert csv["n"].tolist() == [1, 1, 1]


def test_csv_long_form(report):
    root, _ = report
    csv = pd.read_csv(root / f"table_{FULL_SLUG}.csv", keep_default_na=False, na_values=[""])
    for col in ("method", "pair", "teachers", "student", "metric", "mean", "std", "n", "delta_vs_ce",
                "params", "extra_params", "flops_per_image", "throughput_img_s"):
        assert col in csv
    assert list(dict.fromkeys(csv["method"])) == ["teacher", "ce", "fitnets", "kd"]
    assert (csv["metric"] == "top1_last").all()
    kd = csv[(csv["method"] == "kd") & (csv["pair"] == f"{R56}+{WRN}→{R20}")].iloc[0]
    mean, std = stat(FULL_RUNS[("kd", f"{R56}+{WRN}", R20)])
    assert kd["mean"] == pytest.approx(mean) and kd["std"] == pytest.approx(std) and kd["n"] == 3
    assert kd["delta_vs_ce"] == pytest.approx(mean - np.mean(FULL_RUNS[("ce", "", R20)]))
    assert kd["params"] == PARAMS[R20] and kd["teachers"] == f"{R56}+{WRN}"
    assert kd["throughput_img_s"] == pytest.approx(SPEED[R20] + 1)
    ce = csv[csv["method"] == "ce"]
    assert ce["pair"].tolist() == [f"{R56}→{R20}", f"{R56}+{WRN}→{R20}", f"{WRN}→{W16}"]
    ce20 = np.mean(FULL_RUNS[("ce", "", R20)])
    assert ce["mean"].iloc[0] == ce["mean"].iloc[1] == pytest.approx(ce20)
    teachers = csv[(csv["method"] == "teacher") & (csv["pair"] == f"{R56}+{WRN}→{R20}")]
    assert teachers["model"].tolist() == [R56, WRN]
    assert teachers["delta_vs_ce"].isna().all()


def test_best_epoch_metric(tmp_path):
    write_store(tmp_path, SHORT_RUNS)
    paths = build_report(tmp_path, tmp_path / "out", metric="top1_best")
    assert all(p.parent == tmp_path / "out" for p in paths)
    md = next(p for p in paths if p.suffix == ".md" and p.name != "index.md").read_text()
    assert "top-1 at the best epoch" in md.splitlines()[0] and "last epoch" not in md
    assert "62.75 (+1.75)" in md


def test_unknown_metric(tmp_path):
    write_store(tmp_path, SHORT_RUNS)
    with pytest.raises(KdbenchError, match="did you mean 'top1_last'"):
        build_report(tmp_path, metric="top1_lst")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_empty_store(tmp_path, make):
    if make == "empty":
        (tmp_path / "runs").mkdir()
    with pytest.raises(KdbenchError, match="no finished runs") as err:
        build_report(tmp_path)
    assert str(tmp_path) in str(err.value) and "kdbench run" in str(err.value)


def test_damaged_file_named_and_skipped(tmp_path, capsys):
    # A crash can leave a damaged file (truncated JSON, or one lacking columns): it is reported by
    # name and skipped, and the rest of the store stays readable.
    write_store(tmp_path, SHORT_RUNS)
    intact = load_rows(tmp_path)
    (tmp_path / "runs" / "zz.json").write_text('{"run_id": ')
    (tmp_path / "runs" / "zy.json").write_text('{"run_id": "zy"}')
    (tmp_path / "runs" / "zx.json").write_bytes(b"\x00\xff" * 10)
    rows = load_rows(tmp_path)
    err = capsys.readouterr().err
    for name in ("zz.json", "zy.json", "zx.json"):
        assert name in err and "skipping" in err
    assert rows["run_id"].tolist() == intact["run_id"].tolist()
    build_report(tmp_path)  # the report is still written from the intact rows


def test_extra_columns_ignored_and_rows_sorted(tmp_path):
    write_store(tmp_path, SHORT_RUNS)
    rows = load_rows(tmp_path)
    assert "some_future_column" in rows and "hp.temperature" in rows
    assert rows["run_id"].tolist() == sorted(rows["run_id"])  # file name == run_id here
    build_report(tmp_path)


def test_mixed_devices_split_throughput(tmp_path):
    short = {"schedule": SHORT, "epochs": 24}
    write_store(tmp_path, {("ce", "", R20): [60.0], ("kd", R56, R20): [61.0]}, **short)
    write_store(tmp_path, {("fitnets", R56, R20): [61.5]}, **short, device="NVIDIA A100")
    paths = build_report(tmp_path)
    names = {p.name for p in paths}
    assert {f"acc_vs_throughput_{SHORT_SLUG}_nvidia-a100.png",
            f"acc_vs_throughput_{SHORT_SLUG}_nvidia-h100.png"} <= names
    md = (tmp_path / f"table_{SHORT_SLUG}.md").read_text()
    assert re.search(r"2 different devices", md)
    assert "images/s (NVIDIA A100" in md and "images/s (NVIDIA H100" in md


def test_seed_counts_shown_when_they_differ(tmp_path):
    write_store(tmp_path, {("ce", "", R20): [69.0, 69.4, 69.2], ("kd", R56, R20): [70.0, 70.6]})
    build_report(tmp_path)
    md = (tmp_path / f"table_{FULL_SLUG}.md").read_text()
    cells = dict((line[0], line[1]) for line in table_lines(md)[2:])
    mean, std = stat([70.0, 70.6])
    assert cells["kd"] == f"{mean:.2f} ± {std:.2f} ({mean - 69.2:+.2f}) [n=2]"
    assert cells["ce"] == "69.20 ± 0.20"
    assert "n=3 seeds unless marked [n=k]" in md


def test_interrupted_write_keeps_old_file(tmp_path):
    from kdbench.files import atomic_write
    from kdbench.report.markdown import write_text

    target = tmp_path / "table.md"
    write_text(target, "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_hyperparameter_variants_are_separate_rows_not_seeds(tmp_path):
    """kd at T=4 and kd at T=8 in one store: two labelled rows, never averaged together."""
    from kdbench.report.build import build_report

    runs = tmp_path / "runs"
    runs.mkdir()
    for temperature, top1 in ((4.0, 70.0), (8.0, 60.0)):
        for seed in (0, 1):
            r = row("kd", R56, R20, seed, top1 + seed)
            r["hparams"] = json.dumps({"ce_weight": 0.1, "kd_weight": 0.9, "temperature": temperature})
            r["run_id"] += f"-T{temperature}"
            (runs / f"{r['run_id']}.json").write_text(json.dumps(r))
    r = row("ce", "", R20, 0, 65.0)
    r["hparams"] = json.dumps({"ce_weight": 1.0})
    (runs / f"{r['run_id']}.json").write_text(json.dumps(r))
    md = next(p for p in build_report(tmp_path, tmp_path / "out") if p.suffix == ".md" and p.name.startswith("table"))
    text = md.read_text()
    assert "| kd[temperature=4.0] | 70.50 ± 0.71 (+5.50) |" in text
    assert "| kd[temperature=8.0] | 60.50 ± 0.71 (-4.50) |" in text
    assert "| ce | 65.00" in text  # one seed among cells of two: marked [n=1]


def test_precisions_are_separate_tables_not_seeds(tmp_path):
    """fp32 and bf16 runs of one pair: two tables (bf16 named in title and file), never one mean."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for precision, base in (("fp32", 70.0), ("bf16", 60.0), (None, 80.0)):
        for seed in (0, 1):
            r = row("kd", R56, R20, seed, base + seed, dataset="cifar10" if precision is None else "cifar100")
            if precision is not None:  # rows written before precision was recorded have no such field
                r["precision"] = precision
                r["run_id"] += f"-{precision}"
            (runs / f"{r['run_id']}.json").write_text(json.dumps(r))
    tables = {p.name: p.read_text() for p in build_report(tmp_path, tmp_path / "out")
              if p.suffix == ".md" and p.name.startswith("table")}
    assert set(tables) == {f"table_{FULL_SLUG}.md", f"table_{FULL_SLUG}_bf16.md",
                           f"table_{FULL_SLUG.replace('cifar100', 'cifar10')}.md"}
    assert "| kd | 70.50 ± 0.71 |" in tables[f"table_{FULL_SLUG}.md"]
    bf16 = tables[f"table_{FULL_SLUG}_bf16.md"]
    assert "| kd | 60.50 ± 0.71 |" in bf16 and bf16.splitlines()[0].split(" — ")[0].endswith("· bf16")
    assert "| kd | 80.50 ± 0.71 |" in tables[f"table_{FULL_SLUG.replace('cifar100', 'cifar10')}.md"]


def test_a_one_hyperparameter_sweep_gets_its_curve_and_its_best_value(tmp_path):
    """Runs of kd at several temperatures: one figure of error against T, one line per pair, and the
    markdown names the temperature with the lowest mean error (from the numbers, not a label)."""
    (tmp_path / "runs").mkdir()
    curves = {W16: {1.0: 70.0, 4.0: 74.0, 8.0: 73.0}, R20: {1.0: 60.0, 4.0: 66.0, 8.0: 67.5}}
    teachers = {W16: WRN, R20: R56}
    for student, by_t in curves.items():
        for t, top1 in by_t.items():
            for seed in (0, 1):
                r = row("kd", teachers[student], student, seed, top1 + seed * 0.2)
                r.update(run_id=f"{r['run_id']}-t{t}", hparams=json.dumps({"temperature": t, "kd_weight": 0.9}))
                (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    r = row("ce", "", R20, 0, 65.0)
    (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    r = row("kd", R56, W16, 0, 74.5)  # a third pair, at one temperature only: no curve, no line
    r.update(run_id=f"{r['run_id']}-one", hparams=json.dumps({"temperature": 20.0, "kd_weight": 0.9}))
    (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    written = build_report(tmp_path)
    sweeps = [p for p in written if p.name.startswith("sweep_kd_temperature_")]
    assert len(sweeps) == 1 and sweeps[0].stat().st_size > 10_000
    table = next(p for p in written if p.name.startswith("table_") and p.suffix == ".md").read_text()
    assert f"kd on {WRN}→{W16}: lowest mean test error 25.90% at temperature = 4" in table
    assert f"kd on {R56}→{R20}: lowest mean test error 32.40% at temperature = 8" in table
    assert sweeps[0].name in table  # linked from the table
    assert f"kd on {R56}→{W16}" not in table


def test_a_setting_that_differs_as_a_list_is_no_sweep(tmp_path):
    """fsp with its stages set per pair (lists, as the CRD suites set them): the report is written, with no sweep
    figure. (pandas cannot count lists as unique values: this crashed `kdbench report` on the CRD suites.)"""
    (tmp_path / "runs").mkdir()
    for student, teacher, stages in ((W16, WRN, [0, 1, 2]), (R20, R56, [1, 2, 3]), (R20, WRN, [0, 2, 3])):
        r = row("fsp", teacher, student, 0, 60.0)
        r.update(run_id=f"{r['run_id']}-{student}-{teacher}", hparams=json.dumps({"stages": stages, "fsp_weight": 50}))
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    written = build_report(tmp_path)
    assert not [p for p in written if p.name.startswith("sweep_")]
    assert "fsp" in next(p for p in written if p.name.startswith("table_") and p.suffix == ".md").read_text()


def test_one_value_per_pair_is_no_sweep(tmp_path):
    """dkd at a different beta on each of three pairs (DKD's table sets beta per pair): no pair has a curve, so no
    (empty) sweep figure is drawn."""
    (tmp_path / "runs").mkdir()
    for student, teacher, beta in ((W16, WRN, 8.0), (R20, R56, 2.0), (R20, WRN, 4.0)):
        r = row("dkd", teacher, student, 0, 60.0)
        r.update(run_id=f"{r['run_id']}-{student}-{teacher}", hparams=json.dumps({"beta": beta, "alpha": 1.0}))
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert not [p for p in build_report(tmp_path) if p.name.startswith("sweep_")]


def test_a_single_setting_draws_no_sweep(report):
    _, written = report
    assert not [p for p in written if p.name.startswith("sweep_")]


def test_method_cost_is_relative_to_kd_on_the_same_pair():
    """The cost table's ratio compares a method with kd pair by pair (geometric mean over pairs); ce, which has
    no pair of its own, with kd into the same student; extra parameters, init epochs and state come through."""
    import pandas as pd

    from kdbench.report.cost import cost_frame
    from kdbench.report.markdown import method_cost_section

    def run(method, pair, student, seconds, **extra):
        return {"kind": "student", "method": method, "pair": pair, "student": student, "device": "cpu",
                "epoch_time_s": seconds, "epochs": 10, "train_time_s": 10 * seconds, **extra}

    rows = pd.DataFrame([
        run("kd", "a→s", "s", 1.0), run("kd", "a→s", "s", 3.0), run("kd", "b→s", "s", 4.0),
        run("crd", "a→s", "s", 8.0, method_state_mb=5.0, extra_params=100),
        run("crd", "b→s", "s", 8.0, method_state_mb=5.0, extra_params=100),
        run("fsp", "a→s", "s", float("nan"), init_epochs=3, epochs=1, train_time_s=8.0),
        run("ce", "→s", "s", 1.0),
        {"kind": "teacher", "method": "teacher", "pair": "a→", "student": "a", "device": "cpu", "epoch_time_s": 99.0},
    ])
    costs = cost_frame(rows).set_index("method")
    assert "teacher" not in costs.index
    # kd's median on a→s is 2 s, on b→s 4 s: crd is 4x and 2x there, geometric mean sqrt(8)
    assert costs.loc["crd", "vs_kd"] == pytest.approx(8 ** 0.5)
    assert costs.loc["crd", "state_mb"] == 5.0 and costs.loc["crd", "extra_params"] == 100
    # a one-epoch run has no steady epoch: its training time over init + schedule epochs (8 s / 4)
    assert costs.loc["fsp", "epoch_s"] == pytest.approx(2.0) and costs.loc["fsp", "vs_kd"] == pytest.approx(1.0)
    assert costs.loc["fsp", "init_epochs"] == 3
    # ce against kd into the same student, over both pairs (median of 1, 3, 4 s)
    assert costs.loc["ce", "vs_kd"] == pytest.approx(1 / 3)
    text = "\n".join(method_cost_section(rows))
    assert "## Training cost per method" in text and "| `crd` | 8.00" in text and "2.83×" in text


def test_index_opens_with_each_main_table_and_the_speed_plot(report):
    """Issue 16, item 5: what a reader takes in at a glance comes first, per benchmark: the main table, then the
    Pareto plot of accuracy against throughput; the links to everything follow."""
    root, _ = report
    index = (root / "index.md").read_text()
    for slug, title in ((FULL_SLUG, "## cifar100 · crd, 240 epochs"),
                        (SHORT_SLUG, "## cifar100 · crd, shortened: 24 of 240 epochs")):
        section = index[index.index(f"{title}\n"):]
        table, plot, links = (section.index("| method |"), section.index(f"![acc_vs_throughput_{slug}]"),
                              section.index("All tables and plots:"))
        assert table < plot < links
    full = index[index.index("## cifar100 · crd, 240 epochs\n"):index.index("## cifar100 · crd, shortened")]
    mean, std = stat(FULL_RUNS[("kd", R56, R20)])
    assert f"{mean:.2f} ± {std:.2f}" in full  # the same cells as table_<slug>.md


def test_axis_ticks_read_as_counts():
    """A throughput axis past a million images/s read '1e+03k' (seen on the digits MLPs); now '1M'."""
    from kdbench.report.plots import _tick

    assert [_tick(x, "k", 1e3) for x in (500, 12_000, 1e6, 2.5e6)] == ["500", "12k", "1M", "2.5M"]
    assert _tick(270_000, "M", 1e6) == "0.27M" and _tick(40, "s", 1.0) == "40s"


def test_plot_titles_wrap_to_the_figures_width():
    from kdbench.report.plots import TITLE_CHARS_PER_INCH, figure, wrap_title

    title = "mnist · mnist_mlp, 60 epochs, 5% held out for validation, gradients clipped at norm 1\nkd: error against T"
    narrow, wide = figure(6.4, 4.2), figure(10.0, 5.6)
    lines = wrap_title(title, narrow).split("\n")
    assert len(lines) == 3 and max(map(len, lines)) <= 6.4 * TITLE_CHARS_PER_INCH  # the sweep plot's width
    assert wrap_title(title, wide).split("\n") == title.split("\n")  # fits the wider figure as it is


def test_swept_settings_are_ordered_by_value_and_share_one_citation(tmp_path):
    """kd at T = 2, 12 and 20: the table lists them 2, 12, 20 (text order would put 12 first), and the
    methods' footnote cites the shared paper once, after all three labels."""
    (tmp_path / "runs").mkdir()
    for t, top1 in {20.0: 70.0, 2.0: 71.0, 12.0: 72.0}.items():
        r = row("kd", R56, R20, 0, top1)
        r.update(run_id=f"{r['run_id']}-t{t}", hparams=json.dumps({"temperature": t}))
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    written = build_report(tmp_path)
    table = next(p for p in written if p.name.startswith("table_") and p.suffix == ".md").read_text()
    labels = [line[0] for line in table_lines(table) if line[0].startswith("kd[")]
    assert labels[:3] == ["kd[temperature=2.0]", "kd[temperature=12.0]", "kd[temperature=20.0]"]
    methods = next(line for line in table.splitlines() if line.startswith("Methods: "))
    assert methods == ("Methods: `kd[temperature=2.0]`, `kd[temperature=12.0]`, `kd[temperature=20.0]`: "
                       "Paper of kd")
