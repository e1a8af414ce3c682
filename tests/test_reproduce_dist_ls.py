"""The DIST and logit-standardization suites, their per-pair settings, and matching a method variant (kd+ls)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from tiny import REPO

from kdbench.cli import main
from kdbench.errors import KdbenchError
from kdbench.models.crd_names import timm_name
from kdbench.report import Cell, compare, load_rows
from kdbench.report.reproduce import matching_rows, method_and_variant
from kdbench.published_csv import read_published
from kdbench.suites import Tolerance, get_suite, load_suite_file

PUBLISHED = REPO / "benchmarks" / "suites" / "published"
FAST = ["--synthetic", "--epochs", "1", "--seeds", "0", "--limit", "64", "--throughput-batch", "4", "-q"]
R56, R20 = "cifar_resnet56", "cifar_resnet20"


def csv_rows(name: str) -> list[dict[str, str]]:
    with (PUBLISHED / name).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pairs_of(rows: list[dict[str, str]]) -> set[tuple[tuple[str, ...], str]]:
    return {((timm_name(r["teacher"]),), timm_name(r["student"])) for r in rows}


def entry_hparams(pair) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for key, value in pair.hparams:
        method, _, name = key.partition(".")
        out.setdefault(method, {})[name] = value
    return out


# -- the suites ------------------------------------------------------------------------------------
def test_dist_suite_has_the_readmes_pairs_and_one_setting():
    s = get_suite("dist-cifar100")
    rows = csv_rows("dist_cifar100.csv")
    assert {(p.teachers, p.student) for p in s.pairs} == pairs_of(rows) and len(s.pairs) == 6
    assert s.methods == ("ce", "dist") and not any(p.hparams or p.tag for p in s.pairs)
    cells = read_published(s, timm_name)
    assert len(cells) == len(rows) == 18 and {c["method"] for c in cells} == {"teacher", "ce", "dist"}
    assert {c["selection"] for c in cells if c["method"] == "dist"} == {"best"}
    # dist_cifar.yaml: T 4, KD weight 2 on both terms, CE 1: the plugin's defaults, written out
    assert dict(s.hparams) == {"dist.ce_weight": 1.0, "dist.beta": 2.0, "dist.gamma": 2.0, "dist.temperature": 4.0}
    r = s.recipe
    assert (r.epochs, r.batch_size, r.lr, r.milestones, r.weight_decay) == (240, 64, 0.05, (150, 180, 210), 5e-4)
    assert {m: v["lr"] for m, v in s.recipe_by_model.items()} == {
        "cifar_mobilenetv2": 0.01, "cifar_shufflenetv1": 0.01, "cifar_shufflenetv2": 0.01}


def _official_ls_settings() -> dict[tuple[tuple[str, ...], str, str], tuple[float, float, float | None]]:
    """(teachers, student, kd_ls|dkd_ls) -> (base temperature, KD weight, beta or None) from the CSV's notes."""
    out = {}
    for r in csv_rows("ls_cifar100.csv"):
        if r["method"] in ("kd_ls", "dkd_ls"):
            m = re.search(r"base temperature (\d+), kd weight (\d+)(?:, beta ([\d.]+))?", r["note"])
            assert m, r["note"]
            beta = float(m.group(3)) if m.group(3) else None
            out[((timm_name(r["teacher"]),), timm_name(r["student"]), r["method"])] = (
                float(m.group(1)), float(m.group(2)), beta)
    return out


def test_ls_suite_lists_each_pair_plain_and_with_the_official_ls_settings():
    s = get_suite("ls-cifar100")
    rows = csv_rows("ls_cifar100.csv")
    assert s.methods == ("kd", "dkd") and dict(s.reproduce.method_names) == {"kd_ls": "kd+ls", "dkd_ls": "dkd+ls"}
    assert {(p.teachers, p.student) for p in s.pairs} == pairs_of(rows)
    plain = {(p.teachers, p.student): p for p in s.pairs if not p.tag}
    ls = {(p.teachers, p.student): p for p in s.pairs if p.tag == "ls"}
    assert len(plain) == len(ls) == 14 and len(s.pairs) == 28
    assert len({p.label for p in s.pairs}) == 28  # every entry keeps its own hyperparameters
    suite_kd = {k: v for k, v in s.hparams if k.startswith("kd.")}
    assert suite_kd == {"kd.ce_weight": 0.1, "kd.kd_weight": 0.9, "kd.temperature": 4.0}  # plain KD: CRD's
    official = _official_ls_settings()
    for key, entry in ls.items():
        hp = entry_hparams(entry)
        T, w, _ = official[(*key, "kd_ls")]
        assert hp["kd"] == {"standardize": True, "temperature": T, "kd_weight": w}, key
        T, w, beta = official[(*key, "dkd_ls")]
        plain_beta = entry_hparams(plain[key])["dkd"]["beta"]
        # tools/train.py: DKD.ALPHA *= W, DKD.BETA *= W (the log's beta, else the pair's config), DKD.T = T
        assert hp["dkd"] == {"standardize": True, "temperature": T, "alpha": w,
                             "beta": (beta if beta is not None else plain_beta) * w}, key
        assert set(entry_hparams(plain[key])) == {"dkd"}  # plain kd: the suite's CRD weights
    betas = {key: entry_hparams(p)["dkd"]["beta"] for key, p in plain.items()}
    assert betas[((R56,), R20)] == 2.0 and betas[(("cifar_vgg13",), "cifar_vgg8")] == 6.0
    assert betas[(("cifar_resnet32x4",), "cifar_resnet8x4")] == 8.0
    assert {m: v["lr"] for m, v in s.recipe_by_model.items()} == {"cifar_mobilenetv2": 0.01, "cifar_shufflenetv2": 0.01}
    assert s.recipe == get_suite("dkd-cifar100").recipe
    cells = read_published(s, timm_name)
    assert len(cells) == len(rows) and {c["selection"] for c in cells} == {"best"}


# -- one pair listed twice -------------------------------------------------------------------------
SUITE = """name = "twice"
dataset = "digits"
pairs = [
    {{ pair = "a:b", hparams = {{ kd = {{ temperature = 4.0 }} }} }},
    {{ pair = "a:b", {tag}hparams = {{ kd = {{ standardize = true, temperature = 2.0 }} }} }},
]
[recipe]
base = "digits"
"""


def test_a_pair_listed_twice_with_other_hparams_needs_a_tag(tmp_path):
    path = tmp_path / "twice.toml"
    path.write_text(SUITE.format(tag=""))
    with pytest.raises(KdbenchError, match=r"pair a→b is listed twice with different hparams; give each"):
        load_suite_file(path)
    path.write_text(SUITE.format(tag='tag = "ls", '))
    s = load_suite_file(path)
    assert [p.label for p in s.pairs] == ["a→b", "a→b [ls]"] and [p.tag for p in s.pairs] == ["", "ls"]
    for bad in ('tag = "", ', 'tag = "[x]", ', "tag = 3, "):
        path.write_text(SUITE.format(tag=bad))
        with pytest.raises(KdbenchError, match="tag"):
            load_suite_file(path)


# -- end to end, synthetic data --------------------------------------------------------------------
def reproduce(suite: str, pair: str, res: Path, capsys) -> pd.DataFrame:
    code = main(["reproduce", suite, *FAST, "--pairs", pair, "--results-dir", str(res)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return pd.read_csv(res / "reproduce" / suite / f"reproduce_{suite}.csv")


def test_dist_suite_runs_and_compares_the_dist_cell(tmp_path, capsys):
    table = reproduce("dist-cifar100", "resnet56:resnet20", tmp_path / "res", capsys)
    assert set(table["pair"]) == {f"{R56}→{R20}"}
    by_method = table.set_index("method")
    assert sorted(table["method"]) == ["ce", "dist", "teacher"]
    assert set(table["verdict"]) == {"not real data"} and table["kdbench"].notna().all()
    assert by_method.loc["dist", "published"] == 71.75 and by_method.loc["dist", "selection"] == "best"


def test_ls_suite_compares_ls_cells_with_standardized_runs_only(tmp_path, capsys):
    res = tmp_path / "res"
    table = reproduce("ls-cifar100", "resnet56:resnet20", res, capsys)
    verdicts = dict(zip(table["method"], table["verdict"]))
    assert verdicts == {"kd": "not real data", "kd+ls": "not real data", "dkd": "not real data",
                        "dkd+ls": "not real data", "ctkd": "not run", "ctkd_ls": "not run", "mlkd": "not run",
                        "mlkd_ls": "not run"}
    students = [json.loads(p.read_text()) for p in sorted((res / "runs").glob("*.json"))]
    students = [r for r in students if r["kind"] == "student"]
    hp = {(r["method"], r["method_variant"]): {k[3:]: v for k, v in r.items() if k.startswith("hp.")}
          for r in students}
    assert len(students) == len(hp) == 4  # kd, kd+ls, dkd, dkd+ls: one run each
    assert hp[("kd", "")] == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "standardize": False}
    assert hp[("kd", "ls")] == {"ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0, "standardize": True}
    assert (hp[("dkd", "")]["beta"], hp[("dkd", "")]["standardize"]) == (2.0, False)
    assert {k: hp[("dkd", "ls")][k] for k in ("standardize", "temperature", "alpha", "beta", "ce_weight")} == {
        "standardize": True, "temperature": 3.0, "alpha": 18.0, "beta": 36.0, "ce_weight": 1.0}
    # each published cell is compared with exactly its own run
    rows = load_rows(res)
    cells = {c["method"]: Cell(**c) for c in read_published(get_suite("ls-cifar100"), timm_name)
             if c["student"] == R20 and c["teachers"] == (R56,)}
    for method, standardized in (("kd", False), ("kd+ls", True), ("dkd", False), ("dkd+ls", True)):
        runs = matching_rows(rows, cells[method])
        assert len(runs) == 1 and list(runs["hp.standardize"].astype(bool)) == [standardized], method
        assert runs["method"].iloc[0] == method_and_variant(method)[0]


# -- the matcher -----------------------------------------------------------------------------------
def test_a_variant_cell_matches_only_runs_of_that_variant():
    def row(run_id: str, method: str, variant, seed: int, top1: float) -> dict:
        return {"run_id": run_id, "kind": "student", "method": method, "method_variant": variant,
                "teachers": R56, "student": R20, "seed": seed, "top1_last": top1, "top1_best": top1,
                "test_size": 10_000, "schedule": "crd, 240 epochs"}

    rows = pd.DataFrame([
        row("kd-0", "kd", "", 0, 70.0), row("kd-1", "kd", None, 1, 70.2),     # no variant, also as NaN
        row("kdls-0", "kd", "ls", 0, 71.5), row("kdls-1", "kd", "ls", 1, 71.7),
        row("dkd-0", "dkd", "", 0, 72.0), row("dkdls-0", "dkd", "ls", 0, 72.4),
    ])

    def cell(method: str) -> Cell:
        return Cell(teachers=(R56,), student=R20, method=method, paper_method=method.replace("+", "_"),
                    metric="top1", value=71.0, selection="best", source="LS")

    ids = lambda method: sorted(matching_rows(compare_ready(rows), cell(method))["run_id"])  # noqa: E731
    assert ids("kd") == ["kd-0", "kd-1"]            # plain kd never takes a standardized run
    assert ids("kd+ls") == ["kdls-0", "kdls-1"]
    assert ids("dkd") == ["dkd-0"] and ids("dkd+ls") == ["dkdls-0"]
    assert ids("kd+xx") == []                        # a variant no run has: not run
    # rows without the column (written before it existed) count as no variant
    old = compare_ready(rows[rows["method_variant"].fillna("") == ""].drop(columns="method_variant"))
    assert sorted(matching_rows(old, cell("kd"))["run_id"]) == ["kd-0", "kd-1"]
    assert matching_rows(old, cell("kd+ls")).empty
    table = compare(rows, [cell("kd"), cell("kd+ls"), cell("mlkd")], Tolerance())
    assert list(table["seeds"]) == [2, 2, 0] and list(table["verdict"])[2] == "not run"
    assert table["kdbench"].iloc[:2].round(2).tolist() == [70.1, 71.6]
    assert method_and_variant("dkd+ls") == ("dkd", "ls") and method_and_variant("ce") == ("ce", "")


def compare_ready(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the transfer column compare() fills in (matching_rows reads it)."""
    return rows.assign(transfer="")
