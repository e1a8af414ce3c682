"""Declared student ensembles (issue 16, item 3): a pair ``T:S*K`` or ``T:A+B`` trains K students from one teacher,
member 0 times the ensemble as deployed, and the report judges each seed's members as one model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import kdbench.models  # noqa: F401  (registers the CIFAR models and Hinton's MLPs into timm)
from kdbench.cli import main
from kdbench.ensemble import deployed, ensemble_size, ensemble_text, timed_deployments
from kdbench.errors import KdbenchError
from kdbench.suites import Pair
from kdbench.sweep.spec import MEMBER_SEED_STRIDE
from kdbench.sweep.store import ResultsStore


# -- the pair form ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, members, label", [
    ("t:s*3", ("s", "s", "s"), "t→s×3"),
    ("t@1:a+b", ("a", "b"), "t@1→a+b"),
    ("t:a*2+b", ("a", "a", "b"), "t→a×2+b"),
    ("t1+t2:s*2", ("s", "s"), "t1+t2→s×2"),
])
def test_a_pair_declares_a_student_ensemble(text, members, label):
    pair = Pair.parse(text)
    assert pair.members == members and pair.label == label and ensemble_size(pair.student_text) == len(members)
    expanded = pair.expand()
    assert [p.student for p in expanded] == list(members) and [p.member for p in expanded] == list(range(len(members)))
    assert {p.label for p in expanded} == {label}  # every member is looked up (hyperparameters) by the ensemble's label


def test_one_student_is_no_ensemble():
    assert Pair.parse("t:s").members == () and Pair.parse("t:s*1").members == ()
    assert Pair.parse("t:s").expand() == (Pair.parse("t:s"),)
    assert ensemble_text(["a", "a", "b", "a"]) == "a×2+b+a"


@pytest.mark.parametrize("text", ["t:s*0", "t:s*x", "t:*3", "t:s+", "t:s*-1", "t:s*2.5"])
def test_a_malformed_ensemble_is_refused(text):
    with pytest.raises(KdbenchError, match="MODEL or MODEL\\*K"):
        Pair.parse(text)


# -- the plan --------------------------------------------------------------------------------------------------------
def test_members_share_one_teacher_and_train_with_their_own_seeds(tmp_path):
    specs = _specs(tmp_path, "hinton_mlp_300:hinton_mlp_30*3+cifar_resnet8", seeds=(0, 1))
    by_seed: dict[int, list] = {}
    for s in specs:
        by_seed.setdefault(s.seed, []).append(s)
    for seed, members in by_seed.items():
        members.sort(key=lambda s: s.member)
        assert [s.member for s in members] == [0, 1, 2, 3]
        assert len({s.teachers[0].run_id for s in members}) == 1 and members[0].teachers[0].seed == seed
        # the three MLPs differ by their seed; the ResNet, alone of its model, trains as a single student would
        assert [s.train_seed for s in members] == [seed, seed + MEMBER_SEED_STRIDE, seed + 2 * MEMBER_SEED_STRIDE,
                                                   seed]
        assert len({s.run_id for s in members}) == 4
        assert {s.pair for s in members} == {"hinton_mlp_300→hinton_mlp_30×3+cifar_resnet8"}
    single = _specs(tmp_path, "hinton_mlp_300:hinton_mlp_30")[0]
    assert single.run_id not in {s.run_id for s in specs}  # a member is a run of its own, not the single student's


def _specs(tmp_path: Path, pair: str, seeds: tuple[int, ...] = (0,)) -> list:
    from kdbench.data import load_dataset
    from kdbench.recipe import get_recipe
    from kdbench.registry import load_methods
    from kdbench.sweep.plan import build_plan
    from kdbench.sweep.request import Request

    methods = load_methods()
    req = Request(methods=("kd",), pairs=(Pair.parse(pair),), dataset="digits", recipe=get_recipe("digits"),
                  seeds=seeds, results_dir=tmp_path, device="cpu")
    return [s for s in build_plan(req, methods, load_dataset("digits")).specs]


# -- the deployed ensemble -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [True, False])
def test_the_deployed_ensemble_is_the_mean_of_its_members_probabilities(batched):
    made: list[torch.nn.Module] = []

    def create(name: str) -> torch.nn.Module:
        made.append(timm.create_model(name, num_classes=10, in_chans=1).eval())
        return made[-1]

    x = torch.randn(5, 1, 28, 28)
    ens = deployed(["cifar_resnet8", "hinton_mlp_30", "cifar_resnet8"], create, batched=batched, sample=x[:2]).eval()
    with torch.inference_mode():
        want = torch.stack([m(x).softmax(-1) for m in made]).mean(0)
        assert torch.allclose(ens(x), want, atol=1e-6)
    assert ("batched (torch.vmap)" in ens.how) == batched and "hinton_mlp_30" in ens.how


def test_timing_keeps_the_faster_deployment_and_names_both():
    speeds = iter([100.0, 250.0])  # one after another, then batched
    tp, how = timed_deployments(["hinton_mlp_30"] * 2, lambda n: timm.create_model(n, num_classes=10, in_chans=1),
                                lambda m: next(speeds), torch.zeros(2, 1, 28, 28))
    assert tp == 250.0
    assert how == ("2 × hinton_mlp_30 one after another: 100 img/s; "
                   "2 × hinton_mlp_30 batched (torch.vmap): 250 img/s (used)")


# -- end to end: the CLI trains the members, the report judges them as one model -----------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ens")
    assert main(["run", "--methods", "kd,ce", "--pairs", "hinton_mlp_300:hinton_mlp_30,hinton_mlp_300:hinton_mlp_30*3",
                 "--seeds", "0", "--limit", "96", "--epochs", "2", "--throughput-batch", "8", "-q", "--no-report",
                 "--results-dir", str(root)]) == 0
    return root


def test_each_seed_of_an_ensemble_is_one_row_of_the_report(results, tmp_path):
    rows = [r for r in ResultsStore(results).rows() if r.get("ensemble") and r["method"] == "kd"]
    rows.sort(key=lambda r: r["member"])
    assert [r["member"] for r in rows] == [0, 1, 2] and [r["member_seed"] for r in rows] == [0, 1000, 2000]
    assert rows[0]["ensemble_throughput_img_s"] > 0 and "hinton_mlp_30" in rows[0]["ensemble_throughput_how"]
    assert "ensemble_throughput_img_s" not in rows[1]  # member 0 alone times the deployed ensemble
    logits = [torch.load(results / r["predictions"], weights_only=True)["logits"].double() for r in rows]
    labels = torch.load(results / rows[0]["predictions"], weights_only=True)["labels"]
    mean = sum(torch.softmax(x, 1) for x in logits) / 3  # by hand
    top1 = 100 * float((mean.argmax(1) == labels).double().mean())

    out = tmp_path / "rep"
    assert main(["report", "--results-dir", str(results), "--out", str(out), "--metric", "top1_last,nll"]) == 0
    csv = next(out.glob("declared_ensembles_*.csv")).read_text().splitlines()
    assert csv[0].startswith("method,pair,seeds,member_top1,top1,diversity,params,throughput,how")
    kd = next(line for line in csv if line.startswith("kd,"))
    assert float(kd.split(",")[4]) == pytest.approx(top1)
    assert float(kd.split(",")[6]) == sum(r["params"] for r in rows)
    assert float(kd.split(",")[7]) == pytest.approx(rows[0]["ensemble_throughput_img_s"])
    table = next(out.glob("table_*.md")).read_text()
    # the ensemble is a column of the main table beside the single student, and has its own section
    assert "hinton_mlp_300 → hinton_mlp_30×3" in table and "hinton_mlp_300 → hinton_mlp_30 |" in table
    assert "## Student ensembles (declared)" in table
    frame = pd.read_csv(next(out.glob("table_*.csv")))
    cell = frame[(frame.method == "kd") & (frame.model == "hinton_mlp_30×3")].set_index("metric")["mean"]
    assert cell["top1_last"] == pytest.approx(top1)
    # the derived metric of the ensemble, from the mean of its members' probabilities (fp16 logits stored)
    assert cell["nll"] == pytest.approx(float(-(mean[torch.arange(len(labels)), labels]).log().mean()), rel=1e-3)


def test_an_ensemble_with_a_member_missing_is_left_out_with_a_note(results, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(results, root)
    store = ResultsStore(root)
    gone = next(r for r in store.rows() if r.get("ensemble") and r["method"] == "kd" and r["member"] == 2)
    store.row_path(gone["run_id"]).unlink()
    assert main(["report", "--results-dir", str(root), "--out", str(tmp_path / "rep")]) == 0
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "## Student ensembles left out" in index and "2 of its 3 members" in index
    table = next((tmp_path / "rep").glob("table_*.md")).read_text()
    assert "| `kd` | hinton_mlp_300→hinton_mlp_30×3 |" not in table  # no ensemble row from two members
