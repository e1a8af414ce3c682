"""`kdbench reproduce` end to end: real models, synthetic CIFAR-shaped data where CIFAR is absent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.errors import KdbenchError

FAST = ["--synthetic", "--epochs", "1", "--seeds", "0", "--limit", "64", "--throughput-batch", "4", "-q"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


#: Three pairs of each CRD table (every method of the suite on each; the dry-run test below plans every pair of
#: table 2, whose ResNet50 pairs cost most): the 5-stage models with their per-pair stages, the wrn pair FSP
#: cannot take, the lr 0.01 students.
SUITE_PAIRS = {
    "crd-table1": "wrn_40_2:wrn_40_1,resnet32x4:resnet8x4,vgg13:vgg8",
    "crd-table2": "cifar_vgg13:cifar_mobilenetv2,cifar_resnet32x4:cifar_shufflenetv2,cifar_wrn_40_2:cifar_shufflenetv1",
}


@pytest.mark.parametrize("suite", ["crd-table1", "crd-table2"])
def test_crd_suite_on_synthetic_data_produces_the_comparison(suite, tmp_path, capsys):
    """Every method of the suite runs on three of its pairs (one step per cell) and the published column is
    filled: every cell of a method the suite runs is judged (as not real data)."""
    res = tmp_path / "res"
    fast = [*FAST, "--pairs", SUITE_PAIRS[suite]]
    code, out, err = run_cli(["reproduce", suite, *fast, "--results-dir", str(res)], capsys)
    assert code == 0, err
    assert "NOT REAL DATA" in out
    rows = rows_of(res)
    assert rows and all(r["real_data"] is False and r["dataset"] == "synthetic:cifar100[:64]" for r in rows)
    assert all(r["shortened"] and r["schedule"] == "crd, shortened: 1 of 240 epochs" for r in rows)
    out_dir = res / "reproduce" / suite
    table = pd.read_csv(out_dir / f"reproduce_{suite}.csv")
    md = (out_dir / f"reproduce_{suite}.md").read_text()
    assert "**kdbench column: NOT REAL DATA**" in md and "shortened" in md
    assert (out_dir / f"published_vs_kdbench_{suite}.png").stat().st_size > 10_000
    # every published cell of the suite's methods (all of the CRD table's) was run and judged as not real data,
    # never as within/outside; the paper's N/A cell (FSP on wrn_40_2 -> wrn_40_1) is not a cell at all. DKD's
    # dkd cells (read with its KD column) are the one method this suite does not run.
    ours = table["method"] != "dkd"
    assert set(table.loc[ours, "verdict"]) == {"not real data"} and table.loc[ours, "kdbench"].notna().all()
    assert set(table.loc[~ours, "verdict"]) <= {"not run"}
    assert {"ab", "ft", "crd"} <= set(table["method"]) and ("fsp" in set(table["method"])) == (suite == "crd-table1")
    assert table["published"].notna().all()
    assert table["pair"].nunique() == 3
    if suite == "crd-table1":
        kd = table[(table["pair"] == "cifar_resnet32x4→cifar_resnet8x4") & (table["method"] == "kd")]
        assert sorted(zip(kd["selection"], kd["published"])) == [("best", 73.33), ("last", 73.33)]
    else:
        # RepDistiller's lr 0.01 for ShuffleNet/MobileNetV2 students, 0.05 for their teachers
        lrs = {(r["kind"], r["student"]): json.loads(r["recipe_config"])["lr"] for r in rows}
        assert lrs[("student", "cifar_shufflenetv1")] == 0.01 and lrs[("student", "cifar_mobilenetv2")] == 0.01
        assert lrs[("teacher", "cifar_resnet32x4")] == 0.05 and lrs[("teacher", "cifar_vgg13")] == 0.05
    # a second invocation trains nothing and rewrites the same comparison
    code, out, _ = run_cli(["reproduce", suite, *fast, "--results-dir", str(res)], capsys)
    assert code == 0 and "0 runs finished" in out
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / f"reproduce_{suite}.csv"), table)


def test_every_cell_of_crd_table2_is_planned(tmp_path, capsys):
    """Every pair of table 2 takes every method of the suite (stages, preact maps, channel counts): a dry run
    plans 6 pairs x 13 methods and one ce per student (4)."""
    code, out, err = run_cli(["reproduce", "crd-table2", *FAST, "--results-dir", str(tmp_path / "r"), "--dry-run"],
                             capsys)
    assert code == 0, err
    listed = [line for line in out.splitlines() if re.match(r"\s+[0-9a-f]{16}\s", line)]
    assert len(listed) == 6 * 13 + 4, out
    assert "left out" not in out + err


def test_subset_of_pairs_by_crd_name_and_methods(tmp_path, capsys):
    res = tmp_path / "res"
    code, out, err = run_cli(["reproduce", "crd-table1", *FAST, "--pairs", "resnet56:resnet20", "--methods", "ce,kd",
                              "--results-dir", str(res), "--out", str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    assert sorted((r["kind"], r["method"]) for r in rows_of(res)) == [
        ("student", "ce"), ("student", "kd"), ("teacher", "teacher")]
    table = pd.read_csv(tmp_path / "cmp" / "reproduce_crd-table1.csv")
    assert set(table["pair"]) == {"cifar_resnet56→cifar_resnet20"}
    run = table[table["verdict"] == "not real data"]
    assert sorted(run["method"]) == ["ce", "kd", "kd", "teacher"]  # kd: CRD's last epoch and DKD's best
    assert set(table.loc[table["method"].isin(["fitnets", "rkd"]), "verdict"]) == {"not run"}


def test_a_pair_subset_keeps_the_pairs_own_hyperparameters(tmp_path, capsys):
    """DKD's beta is set per pair in its suite; --pairs must not lose it (nor --set lose to it)."""
    res = tmp_path / "res"
    code, _, err = run_cli(["reproduce", "dkd-cifar100", *FAST, "--pairs", "resnet56:resnet20", "--methods", "dkd",
                            "--results-dir", str(res)], capsys)
    assert code == 0, err
    (row,) = [r for r in rows_of(res) if r["method"] == "dkd"]
    assert (row["hp.beta"], row["hp.warmup"], row["pair"]) == (2.0, 20, "cifar_resnet56→cifar_resnet20")
    code, _, err = run_cli(["reproduce", "dkd-cifar100", *FAST, "--pairs", "resnet56:resnet20", "--methods", "dkd",
                            "--set", "dkd.beta=3", "--results-dir", str(tmp_path / "res2")], capsys)
    assert code == 0, err
    (row,) = [r for r in rows_of(tmp_path / "res2") if r["method"] == "dkd"]
    assert row["hp.beta"] == 3.0  # the user's --set wins over the suite's per-pair value


def test_dry_run_estimates_time_and_trains_nothing(tmp_path, capsys):
    res = tmp_path / "res"
    code, out, err = run_cli(["reproduce", "crd-table1", "--synthetic", "--epochs-scale", "0.1", "--pairs",
                              "resnet56:resnet20", "--seeds", "0", "--results-dir", str(res), "--dry-run", "-q"], capsys)
    assert code == 0, err
    assert "schedule crd, shortened: 24 of 240 epochs" in out
    lines = [ln for ln in out.splitlines() if "24 epochs  ~" in ln]
    assert len(lines) == 15  # ce, kd, fitnets, rkd, at, sp, cc, vid, pkt, nst, ab, ft, fsp, crd, crd_kd
    assert "kdbench: estimated" in out and "on cpu" in out
    assert not (res / "runs").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["reproduce", "digits"], r"suite 'digits' has no published numbers.*crd-table1"),
    (["reproduce", "crd-table1", "--pairs", "resnet56:resnet8"], r"pair cifar_resnet56→cifar_resnet8 is not in suite"),
    (["reproduce", "crd-table1", "--epochs", "2", "--epochs-scale", "0.5"], r"--epochs or --epochs-scale, not both"),
    (["reproduce", "crd-tabel1"], r"unknown suite 'crd-tabel1'; did you mean 'crd-table1'\?"),
    (["reproduce", "crd-table1", "--pairs", "resnet56:resnet20", "--methods", "kd,crdd"],
     r"unknown method 'crdd'"),
])
def test_reproduce_bad_input(args, message, tmp_path, capsys):
    # --limit and a short schedule: an input that wrongly passed would still finish fast
    code, _, err = run_cli([*args, "--results-dir", str(tmp_path / "res"), "--synthetic", "--limit", "32",
                            "--throughput-batch", "2", *([] if "--epochs" in args else ["--epochs", "1"])], capsys)
    assert code == 2
    assert re.search(message, err), err
    assert not (tmp_path / "res").exists()  # nothing written


def test_epochs_scale_must_be_a_fraction(capsys):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "crd-table1", "--epochs-scale", "2"])
    assert info.value.code == 2
    assert "--epochs-scale must be in (0, 1]" in capsys.readouterr().err


def test_hinton_mnist_on_real_mnist(mnist_root, tmp_path, capsys):
    """A shortened, limited run on real MNIST: error counts, verdicts and the ordering line are produced."""
    res = tmp_path / "res"
    code, out, err = run_cli(["reproduce", "hinton-mnist", "--data-dir", str(mnist_root), "--limit", "1000",
                              "--epochs", "1", "--seeds", "0", "--throughput-batch", "8", "--results-dir", str(res),
                              "-q"], capsys)
    assert code == 0, err
    assert "hinton_mlp_1200→hinton_mlp_800: teacher" in out and "test errors" in out
    everything = rows_of(res)
    rows = {r["method"]: r for r in everything if not r.get("transfer")}
    assert rows["teacher"]["real_data"] is True and json.loads(rows["teacher"]["model_kwargs"]) == {
        "drop_rate": 0.5, "input_drop_rate": 0.2}
    assert json.loads(rows["teacher"]["recipe_config"])["max_norm"] == 3.5
    assert "max_norm" not in json.loads(rows["kd"]["recipe_config"])
    table = pd.read_csv(res / "reproduce" / "hinton-mnist" / "reproduce_hinton-mnist.csv", keep_default_na=False)
    assert list(table["published"]) == [67, 146, 74, 206, 133, 109, 14, 47.3, 13.2]
    for method, r in rows.items():
        line = table[(table["method"] == method) & (table["measured_on"] == "")].iloc[0]
        assert line["kdbench"] == round((100 - r["top1_last"]) * 1000 / 100)  # errors out of 1,000 test images
        assert line["verdict"] in ("within", "outside")
    no3 = next(r for r in everything if r.get("transfer") == "without 3")
    assert no3["transfer_train_size"] < 1000 and json.loads(no3["bias_given"]) == {"3": 3.5}
    lines = table[table["measured_on"].str.startswith("transfer without 3")].set_index("measured_on")["kdbench"]
    assert lines["transfer without 3 · bias offsets given · on class 3"] == no3["class_errors_bias_given.3"]
    assert lines["transfer without 3 · bias offsets given"] == no3["test_errors_bias_given"]
    seven = next(r for r in everything if r.get("transfer") == "only 7, 8")
    pct = table[table["measured_on"] == "transfer only 7, 8"]["kdbench"].iloc[0]
    assert pct == pytest.approx(100 - seven["top1_last"])  # test error %, from the same run


def test_suite_sweep_and_teacher_seeds_make_an_ensemble_table(tmp_path, capsys):
    suite = tmp_path / "ens.toml"
    suite.write_text("""name = "ens"
dataset = "digits"
methods = ["kd", "ensemble_kd"]
pairs = [
    { pair = "cifar_resnet8@0:hinton_mlp_800", methods = ["kd"] },
    { pair = "cifar_resnet8@0+cifar_resnet8@1:hinton_mlp_800", methods = ["ensemble_kd"] },
]
[recipe]
base = "digits"
[sweep.ensemble_kd]
combine = ["mean_probs", "mean_logits"]
""")
    res = tmp_path / "res"
    code, out, err = run_cli(["run", "--suite", str(suite), "--epochs", "1", "--limit", "64", "--seeds", "3",
                              "--throughput-batch", "4", "-q", "--results-dir", str(res)], capsys)
    assert code == 0, err
    rows = rows_of(res)
    teachers = sorted(r["seed"] for r in rows if r["kind"] == "teacher")
    assert teachers == [0, 1]  # fixed by @N, not the run seed 3
    ens = sorted((r for r in rows if r["method"] == "ensemble_kd"), key=lambda r: r["hp.combine"])
    assert [r["hp.combine"] for r in ens] == ["mean_logits", "mean_probs"]
    assert all(r["teacher_seeds"] == "0+1" and r["seed"] == 3 for r in ens)
    assert all(0 <= r["teacher_ensemble_top1"] <= 100 for r in ens)
    kd = [r for r in rows if r["method"] == "kd"]
    assert len(kd) == 1 and kd[0]["teacher_seeds"] == "0" and "teacher_ensemble_top1" not in kd[0]
    assert kd[0]["teacher_ids"] == ens[0]["teacher_ids"].split("+")[0]  # the same seed-0 teacher, trained once
    md = next((res / "report").glob("table_*.md")).read_text()
    assert "combine=mean_logits" in md and "combine=mean_probs" in md
    # the two seeds of one architecture are two teachers in the table, never averaged as seeds
    assert "| method | cifar_resnet8@0 → hinton_mlp_800 | cifar_resnet8@0+cifar_resnet8@1 → hinton_mlp_800 |" in md
    by_id = {r["run_id"]: r["top1_last"] for r in rows}
    t0, t1 = (by_id[i] for i in ens[0]["teacher_ids"].split("+"))
    assert f"| teacher | {t0:.2f} | {t0:.2f} / {t1:.2f} |" in md
    assert "## Teacher ensembles" in md and f"cifar_resnet8@1 {t1:.2f} | {ens[0]['teacher_ensemble_top1']:.2f} |" in md


def test_pad_to_centres_the_images_on_a_black_border():
    plain = load_dataset("synthetic:mnist", limit=8)
    padded = load_dataset("synthetic:mnist", limit=8, pad_to=32)
    assert padded.info.img_size == 32 and padded.train_images.shape == (8, 1, 32, 32)
    torch.testing.assert_close(padded.train_images[:, :, 2:30, 2:30], plain.train_images)
    border = padded.train_images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    with pytest.raises(KdbenchError, match="--pad-to 16 is smaller"):
        load_dataset("synthetic:mnist", pad_to=16)


def test_synthetic_data_is_marked_and_deterministic():
    a, b = load_dataset("synthetic:cifar100"), load_dataset("synthetic:cifar100")
    assert a.info.real_data is False and "NOT REAL DATA" in a.info.source
    assert (a.info.num_classes, a.info.in_chans, a.info.img_size) == (100, 3, 32)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert load_dataset("digits").info.real_data is True
    with pytest.raises(KdbenchError, match="unknown dataset to make synthetic 'cifar1000'"):
        load_dataset("synthetic:cifar1000")


def test_the_kept_hinton_teacher_makes_its_rows_errors_on_real_mnist(mnist_root):
    """results/hinton-mnist/teachers keeps the suite's teacher (37 minutes of 2 cores) so that its students re-run
    without it: the weights must be the ones its row and stored test logits came from."""
    import timm

    import kdbench.models  # noqa: F401  (registers the hinton MLPs into timm)
    from kdbench.data.loader import normalize

    results = Path(__file__).resolve().parents[1] / "results" / "hinton-mnist"
    run_id = "331bdb22601db9bb"
    row = json.loads((results / "runs" / f"{run_id}.json").read_text())
    model = timm.create_model("hinton_mlp_1200", num_classes=10, **json.loads(row["model_kwargs"])).eval()
    model.load_state_dict(torch.load(results / "teachers" / f"{run_id}.pt", map_location="cpu"))
    data = load_dataset("mnist", data_dir=mnist_root)
    with torch.no_grad():
        logits = model(normalize(data.test_images, data.info))
    errors = int((logits.argmax(1) != data.test_labels).sum())
    assert errors == round((100 - row["top1_last"]) * 100) == 63
    stored = torch.load(results / "predictions" / f"{run_id}.pt", map_location="cpu")
    assert torch.equal(stored["labels"], data.test_labels)
    torch.testing.assert_close(logits, stored["logits"].float(), atol=1e-3, rtol=1e-3)
