"""Suite files: the built-in ones follow the papers' protocols, and bad files get clear errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import REPO

from kdbench.data import NORMALISATION, load_dataset
from kdbench.errors import KdbenchError
from kdbench.models.crd_names import timm_name
from kdbench.recipe import get_recipe
from kdbench.registry import build_method, load_methods
from kdbench.suites import (
    Pair,
    all_suites,
    builtin_dir,
    builtin_names,
    get_suite,
)
from kdbench.published_csv import read_published
from kdbench.sweep import HParams, Request, Sweep
from kdbench.sweep.hparams import parse_table
from kdbench.train import apply_max_norm, train
from kdbench.zoo import check_model_name, create

SUITES_DIR = REPO / "benchmarks" / "suites"
SHARED = Path(os.environ.get("KDBENCH_SHARED", REPO.parent / "shared"))
REFERENCE_CSV = SHARED / "reference" / "crd_cifar100.csv"
PUBLISHED_CSV = SUITES_DIR / "published" / "crd_cifar100.csv"


def published_rows(table: str) -> list[dict[str, str]]:
    with PUBLISHED_CSV.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["table"] == table]


def pairs_of(rows: list[dict[str, str]]) -> set[tuple[tuple[str, ...], str]]:
    return {((timm_name(r["teacher"]),), timm_name(r["student"])) for r in rows}


def test_builtin_suites_are_the_installed_files():
    assert builtin_dir().resolve() == SUITES_DIR.resolve()
    assert builtin_names() == ["crd-table1", "crd-table2", "digits", "dist-cifar100", "dkd-cifar100", "ensemble-mnist",
                               "fashion-mnist", "hinton-mnist", "hinton-mnist-temperature", "imagenet-r34-r18",
                               "ls-cifar100", "which-student"]
    for suite in all_suites():
        assert suite.name == suite.path.stem
        for pair in suite.pairs:
            for model in (*pair.teachers, pair.student):
                check_model_name(model)
    # '_' and '-' alike, so the old spelling still works
    assert get_suite("hinton_mnist").name == "hinton-mnist"


def test_published_numbers_are_the_reference_file():
    if not REFERENCE_CSV.is_file():
        pytest.skip(f"{REFERENCE_CSV} is not present (no shared reference folder here), so the vendored copy "
                    "cannot be compared with it")
    assert PUBLISHED_CSV.read_bytes() == REFERENCE_CSV.read_bytes()


@pytest.mark.parametrize(("suite", "table", "n_pairs"), [("crd-table1", "1", 7), ("crd-table2", "2", 6)])
def test_crd_suites_have_every_pair_and_cell_of_their_table(suite, table, n_pairs):
    s = get_suite(suite)
    rows = published_rows(table)
    assert {(p.teachers, p.student) for p in s.pairs} == pairs_of(rows)
    rows = [r for r in rows if r["top1"] != "N/A"]  # cells the paper left empty
    assert len(s.pairs) == n_pairs
    cells = [c for c in read_published(s, timm_name) if c["table"] == table]
    assert len(cells) == len(rows)  # every published cell of the table, none dropped
    assert {c["selection"] for c in cells} == {"last"}  # CRD reports the last epoch
    by_key = {(c["teachers"], c["student"], c["paper_method"]): c for c in cells}
    for r in rows:
        c = by_key[((timm_name(r["teacher"]),), timm_name(r["student"]), r["method"])]
        assert c["value"] == float(r["top1"]) and c["metric"] == "top1"
    methods = {c["method"] for c in cells}
    assert {"teacher", "ce", "kd", "fitnets", "rkd"} <= methods  # paper names mapped to kdbench's
    assert "student_ce" not in methods and "fitnet" not in methods


def test_table1_kd_cells_also_carry_dkd_best_epoch_numbers():
    cells = [c for c in read_published(get_suite("crd-table1"), timm_name) if c["table"] == "DKD"]
    kd = {(c["teachers"][0], c["student"]): c for c in cells if c["method"] == "kd"}
    assert len(kd) == 6 and {c["selection"] for c in cells} == {"best"}
    assert kd[("cifar_resnet32x4", "cifar_resnet8x4")]["value"] == 73.33
    assert all(c["note"].startswith("mean of 5 runs") for c in cells)


def test_dkd_suite_has_the_papers_pairs_and_betas():
    s = get_suite("dkd-cifar100")
    cells = read_published(s, timm_name)
    assert {(c["teachers"], c["student"]) for c in cells} == {(p.teachers, p.student) for p in s.pairs}
    assert len(s.pairs) == 6 and s.seeds == (0, 1, 2, 3, 4) and s.methods == ("kd", "dkd")
    assert {c["selection"] for c in cells} == {"best"} and len(cells) == 12
    beta = {(p.teachers[0], p.student): dict(p.hparams)["dkd.beta"] for p in s.pairs}
    assert beta == {("cifar_resnet56", "cifar_resnet20"): 2.0, ("cifar_resnet110", "cifar_resnet32"): 2.0,
                    ("cifar_resnet32x4", "cifar_resnet8x4"): 8.0, ("cifar_wrn_40_2", "cifar_wrn_16_2"): 6.0,
                    ("cifar_wrn_40_2", "cifar_wrn_40_1"): 6.0, ("cifar_vgg13", "cifar_vgg8"): 6.0}
    dkd = suite_methods("dkd-cifar100")["dkd"].config()
    assert (dkd["ce_weight"], dkd["alpha"], dkd["temperature"], dkd["warmup"]) == (1.0, 1.0, 4.0, 20)
    assert s.recipe == get_suite("crd-table1").recipe


def test_crd_protocol_recipe_and_lr_exceptions():
    for name in ("crd-table1", "crd-table2"):
        s = get_suite(name)
        r = s.recipe
        assert (r.epochs, r.batch_size, r.lr, r.milestones, r.gamma) == (240, 64, 0.05, (150, 180, 210), 0.1)
        assert (r.momentum, r.weight_decay, r.crop_padding, r.flip, r.max_norm) == (0.9, 5e-4, 4, True, 0.0)
        assert r.lr_milestones == (150, 180, 210)
    t2 = get_suite("crd-table2")

    def recipe_for(model: str, recipe=t2.recipe):  # as a sweep of this suite resolves it
        return Request(methods=None, pairs=t2.pairs, dataset=t2.dataset, recipe=recipe,
                       recipe_by_model=t2.recipe_by_model).recipe_for(model)

    for student in ("cifar_mobilenetv2", "cifar_shufflenetv1", "cifar_shufflenetv2"):
        assert recipe_for(student).lr == 0.01
    for other in ("cifar_vgg8", "cifar_resnet32x4", "cifar_resnet50", "cifar_vgg13", "cifar_wrn_40_2"):
        assert recipe_for(other).lr == 0.05
    # a shortened run keeps the per-model lr and scales the milestones
    short = recipe_for("cifar_shufflenetv2", t2.recipe.with_epochs(24))
    assert (short.lr, short.epochs, short.lr_milestones, short.shortened) == (0.01, 24, (15, 18, 21), True)


def test_crd_cifar100_normalisation_matches_the_protocol():
    assert NORMALISATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


def suite_methods(suite_name: str) -> dict[str, object]:
    methods = load_methods([])
    s = get_suite(suite_name)
    overrides = parse_table(s.hparams, methods, s.name)
    return {n: build_method(methods[n], overrides.get(n)) for n in s.methods}


@pytest.mark.parametrize("suite", ["crd-table1", "crd-table2"])
def test_crd_per_method_weights(suite):
    m = suite_methods(suite)
    table1_only = {"fsp"} if suite == "crd-table1" else set()  # FSP has no cross-family cell (channels differ)
    assert set(m) == {"ce", "kd", "fitnets", "rkd", "at", "sp", "cc", "vid", "pkt", "nst", "ab", "ft", "crd",
                      "crd_kd"} | table1_only
    kd, fit, rkd = m["kd"].config(), m["fitnets"].config(), m["rkd"].config()
    assert (kd["ce_weight"], kd["kd_weight"], kd["temperature"]) == (0.1, 0.9, 4.0)
    assert (fit["ce_weight"], fit["hint_weight"], fit["stage"], fit["schedule"]) == (1.0, 100.0, 2, "joint")
    assert (rkd["ce_weight"], rkd["distance_weight"], rkd["angle_weight"]) == (1.0, 25.0, 50.0)
    # run_cifar_distill.sh's -b for the rest, all with CE weight 1 and no KD term
    weights = {"at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0, "pkt": 30000.0, "nst": 50.0}
    assert {n: (m[n].config()["ce_weight"], m[n].config()[f"{n}_weight"]) for n in weights} == \
        {n: (1.0, w) for n, w in weights.items()}
    # CRD 0.8 (CRD+KD adds KD 1 at T 4); AB, FT and FSP with their 30-epoch init stages, FT at weight 200
    crd, crd_kd = m["crd"].config(), m["crd_kd"].config()
    assert (crd["ce_weight"], crd["crd_weight"], crd["kd_weight"], crd["nce_k"]) == (1.0, 0.8, 0.0, 16384)
    assert (crd_kd["crd_weight"], crd_kd["kd_weight"], crd_kd["temperature"]) == (0.8, 1.0, 4.0)
    assert all(m[n].init_epochs == 30 for n in ("ab", "ft", *table1_only))
    assert m["ft"].config()["ft_weight"] == 200.0
    # FT's init stage at 0.01: 0.2 x 0.05 for ResNet/WRN students (table 1), the students' own rate in table 2
    assert m["ft"].init_lr_scale == (0.2 if suite == "crd-table1" else 1.0)


@pytest.mark.parametrize("suite", ["crd-table1", "crd-table2"])
def test_crd_feature_methods_tap_repdistillers_stages(suite):
    """AT, NST and VID use feat[1:-1]: the last three stages of 4-stage models, the last four of 5-stage ones."""
    from kdbench.features import stage_count
    from kdbench.sweep.hparams import settings

    s = get_suite(suite)
    methods = load_methods([])
    req = Request(methods=None, pairs=s.pairs, dataset=s.dataset, recipe=s.recipe,
                  hparams=HParams(pairs={p.label: parse_table(p.hparams, methods, s.name) for p in s.pairs}))
    for pair in s.pairs:
        stages = {stage_count(create(m, num_classes=100, in_chans=3, img_size=32)) for m in (*pair.teachers, pair.student)}
        assert len(stages) == 1, pair.label  # RepDistiller pairs feat lists of equal length
        want = tuple(range(-(stages.pop() - 1), 0))
        for name in ("at", "nst", "vid"):
            [hp] = settings(req.hparams, name, pair.label)
            assert build_method(methods[name], hp).config()["stages"] == want, (pair.label, name)


def test_hinton_suite_regularises_the_teacher_only():
    s = get_suite("hinton-mnist")
    teacher, student = "hinton_mlp_1200", "hinton_mlp_800"
    assert [(p.teachers, p.student) for p in s.pairs] == [((teacher,), student)] * 3  # full set, no 3s, 7s and 8s
    assert [p.transfer.label for p in s.pairs] == ["", "without 3", "only 7, 8"]
    assert [p.bias.offsets for p in s.pairs] == [{}, {3: 3.5}, {7: -7.6, 8: -7.6}]  # the paper's offsets
    req = Request(methods=None, pairs=s.pairs, dataset=s.dataset, recipe=s.recipe, recipe_by_model=s.recipe_by_model)
    t, st = req.recipe_for(teacher), req.recipe_for(student)
    assert (t.crop_padding, t.max_norm) == (2, 3.5)       # jittered by up to 2 pixels, max-norm
    assert (st.crop_padding, st.max_norm, st.weight_decay) == (0, 0.0, 0.0)  # no regularisation
    assert dict(s.model_kwargs) == {teacher: {"drop_rate": 0.5, "input_drop_rate": 0.2}}
    kd = suite_methods("hinton-mnist")["kd"].config()
    assert kd["temperature"] == 20.0
    cells = read_published(s, lambda n: n)
    plain = [c for c in cells if not c["transfer"]]
    assert {c["method"]: c["value"] for c in plain} == {"teacher": 67.0, "ce": 146.0, "kd": 74.0}
    assert {c["metric"] for c in plain} == {"test_errors"}
    transfer = {(c["transfer"], c["bias"], c["of_class"], c["metric"]): c["value"] for c in cells if c["transfer"]}
    assert transfer == {("without 3", "", None, "test_errors"): 206.0, ("without 3", "", 3, "test_errors"): 133.0,
                        ("without 3", "given", None, "test_errors"): 109.0, ("without 3", "given", 3, "test_errors"): 14.0,
                        ("only 7, 8", "", None, "test_error_pct"): 47.3,
                        ("only 7, 8", "given", None, "test_error_pct"): 13.2}
    assert t.val_fraction == 0.0 and st.val_fraction == 0.05  # the teacher trains on all 60,000 images
    tol = s.reproduce.tolerance
    assert (tol.relative, tol.ordering) == (0.15, ("teacher", "kd", "ce"))


def test_pair_syntax_with_teacher_seeds():
    p = Pair.parse("hinton_mlp_1200@0+hinton_mlp_1200@2+cifar_resnet8:hinton_mlp_800")
    assert p.teachers == ("hinton_mlp_1200", "hinton_mlp_1200", "cifar_resnet8")
    assert p.teacher_seeds == (0, 2, None)
    assert p.label == "hinton_mlp_1200@0+hinton_mlp_1200@2+cifar_resnet8→hinton_mlp_800"
    assert Pair.parse("a:b").teacher_seeds == (None,)
    for bad in ("a@x:b", "a@:b", "a@1.5:b", ":b", "a:"):
        with pytest.raises(KdbenchError):
            Pair.parse(bad)


def test_ensemble_suite_sweeps_the_combination_rules_on_three_teacher_seeds():
    s = get_suite("ensemble-mnist")
    single, ens = s.pairs
    assert single.teacher_seeds == (0,) and single.methods == ("ce", "kd")
    assert ens.teacher_seeds == (0, 1, 2) and set(ens.teachers) == {"hinton_mlp_1200"} and ens.methods == ("ensemble_kd",)
    assert s.sweeps == (("ensemble_kd.combine", ("mean_probs", "mean_kl", "mean_logits")),)


def test_fashion_suite_pads_to_32():
    s = get_suite("fashion-mnist")
    assert (s.dataset, s.pad_to, s.seeds) == ("fashion_mnist", 32, (0, 1, 2))
    assert (s.recipe.name, s.recipe.epochs, s.recipe.full_epochs, s.recipe.shortened) == ("fashion", 30, 30, False)


# -- bad suite files ----------------------------------------------------------------------------

GOOD = """name = "mine"
dataset = "digits"
pairs = ["cifar_resnet14:cifar_resnet8"]
[recipe]
base = "digits"
"""


@pytest.mark.parametrize(("text", "message"), [
    ("name = 'x'\ndataset = [", r"is not valid TOML"),
    (GOOD.replace('dataset = "digits"\n', ""), r"missing required key 'dataset'"),
    ("seed = [1]\n" + GOOD, r"unknown key 'seed'; did you mean 'seeds'\?"),
    ("seeds = 3\n" + GOOD, r"'seeds' must be list"),
    (GOOD.replace('"cifar_resnet14:cifar_resnet8"', '"cifar_resnet14"'), r"is not of the form TEACHER"),
    (GOOD + "epoch = 3\n", r"unknown recipe field 'epoch'; did you mean 'epochs'\?"),
    (GOOD + "lr = 'fast'\n", r"recipe field 'lr' must be a number like 0.05, got 'fast'"),
    (GOOD + "lr = -1.0\n", r"lr must be positive"),
    (GOOD + "[recipe.by_model.cifar_resnet8]\nmomentun = 0.5\n", r"unknown recipe field 'momentun'"),
    (GOOD + "[reproduce]\npublished = ['nowhere.csv']\n", r"'nowhere.csv' was found neither"),
    (GOOD.replace('base = "digits"', 'base = "crdd"'), r"unknown recipe 'crdd'; did you mean 'crd'\?"),
])
def test_bad_suite_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(KdbenchError, match=message) as info:
        get_suite(str(path))
    assert str(path) in str(info.value)  # the message names the file to fix


def test_a_copied_and_edited_suite_file_runs_and_finds_its_published_numbers(tmp_path):
    mine = tmp_path / "my-table1.toml"
    text = (SUITES_DIR / "crd-table1.toml").read_text().replace('name = "crd-table1"', 'name = "my-table1"')
    mine.write_text(text.replace("seeds = [0, 1, 2]", "seeds = [7]"))
    s = get_suite(str(mine))
    assert (s.name, s.seeds, s.path) == ("my-table1", (7,), mine)
    n_table1 = len([r for r in published_rows("1") if r["top1"] != "N/A"])
    assert len(read_published(s, timm_name)) == n_table1 + 12  # CRD Table 1 + DKD
    shutil.copytree(SUITES_DIR / "published", tmp_path / "published")
    edited = tmp_path / "published" / "crd_cifar100.csv"
    edited.write_text(edited.read_text().replace(",kd,73.33,", ",kd,99.99,"))
    cells = read_published(get_suite(str(mine)), timm_name)  # the copy beside the file wins
    assert any(c["value"] == 99.99 for c in cells)


# -- recipe mechanics the suites rely on -----------------------------------------------------------

def test_max_norm_bounds_every_units_incoming_weights():
    torch.manual_seed(0)
    model = create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    assert model.fc1.weight.norm(dim=1).max() > 1.0
    bias = model.fc1.bias.clone()
    apply_max_norm(model, 1.0)
    for w in (model.fc1.weight, model.fc2.weight, model.classifier.weight):
        assert w.norm(dim=1).max() <= 1.0 + 1e-5
    torch.testing.assert_close(model.fc1.bias, bias)  # biases untouched


def test_engine_applies_the_recipes_max_norm():
    data = load_dataset("digits", limit=128)
    recipe = get_recipe("digits").with_overrides({"epochs": 1, "milestones": [], "lr": 0.5, "max_norm": 0.3},
                                                    "test")
    free = recipe.with_overrides({"max_norm": 0.0}, "test")
    norms = {}
    for r in (recipe, free):
        torch.manual_seed(0)
        model = create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
        train(model, data, r, seed=0)
        norms[r.max_norm] = model.fc1.weight.norm(dim=1).max().item()
    assert norms[0.3] <= 0.3 + 1e-5 < norms[0.0]


def test_clip_grad_bounds_the_step_of_every_trained_weight():
    # One step of plain SGD (lr 1, no momentum or decay) moves the weights by exactly the gradient: with
    # clipping, by a vector of global norm clip_grad; without, by the (larger) raw gradient.
    data = load_dataset("digits", limit=128)
    base = get_recipe("digits").with_overrides({"epochs": 1, "milestones": [], "lr": 1.0, "momentum": 0.0,
                                                "weight_decay": 0.0, "batch_size": 128}, "test")
    moved = {}
    for clip in (0.0, 0.01):
        torch.manual_seed(0)
        model = create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(model, data, base.with_overrides({"clip_grad": clip}, "test"), seed=0)
        moved[clip] = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
    assert moved[0.0] > 0.1
    assert moved[0.01] == pytest.approx(0.01, rel=1e-3)
    assert "gradients clipped at norm 0.01" in base.with_overrides({"clip_grad": 0.01}, "t").label
    with pytest.raises(KdbenchError, match="clip_grad must be >= 0"):
        base.with_overrides({"clip_grad": -1.0}, "t")


def test_recipe_ids_unchanged_by_new_fields():
    # max_norm left out at its default, so run ids of results stored before it existed still match
    assert "max_norm" not in get_recipe("crd").to_dict()
    assert get_recipe("crd").with_overrides({"max_norm": 2.0}, "t").to_dict()["max_norm"] == 2.0


def test_committed_digits_results_are_the_default_suites_runs():
    """results/digits holds the default command's rows: its teachers are the suite's teachers, and
    each student run is the plan's run of that method except, at most, for the method's code (its
    fingerprint, ``method_source``, is part of the id, so an edited method runs again)."""
    rows = [json.loads(p.read_text()) for p in (REPO / "results" / "digits" / "runs").glob("*.json")]
    assert rows
    from kdbench.cli.args import build_parser
    from kdbench.cli.build import build_request

    s = get_suite("digits")
    req = build_request(build_parser().parse_args(["run"]), s, dataset=s.dataset, recipe=s.recipe, pairs=list(s.pairs))
    plan = Sweep.prepare(replace(req, device="cpu")).plan
    teachers = {t.run_id for spec in plan.specs for t in spec.teachers}
    assert {r["run_id"] for r in rows if r["kind"] == "teacher"} == teachers
    by_key = {(spec.method, spec.pair, spec.seed): spec for spec in plan.specs}
    for row in (r for r in rows if r["kind"] == "student"):
        spec = by_key[(row["method"], row["pair"], row["seed"])]
        assert replace(spec, method_source=row.get("method_source", "")).run_id == row["run_id"], row["method"]


def test_model_arguments_a_model_does_not_take_are_refused_before_training(tmp_path, capsys):
    from kdbench.cli import main

    path = tmp_path / "kw.toml"
    path.write_text(GOOD + "[models.cifar_resnet8]\ndropout = 0.5\n")
    code = main(["run", "--suite", str(path), "--results-dir", str(tmp_path / "res"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "model 'cifar_resnet8' does not take the arguments {'dropout': 0.5}" in err
    assert not (tmp_path / "res").exists()


def test_the_temperature_suite_distils_from_hinton_mnists_own_teacher():
    """Run into one results folder, the two suites train the 784-1200-1200 teacher once: its model
    arguments, recipe and seed must be the same, or the temperature curve would be of another teacher."""
    main, temps = get_suite("hinton-mnist"), get_suite("hinton-mnist-temperature")
    teacher = "hinton_mlp_1200"
    assert main.model_kwargs[teacher] == temps.model_kwargs[teacher]
    assert main.recipe.with_overrides(main.recipe_by_model[teacher], "") == \
        temps.recipe.with_overrides(temps.recipe_by_model[teacher], "")
    assert main.recipe == temps.recipe  # the students' schedule too: the T = 20 cell is comparable
    assert {p.teacher_seeds for p in temps.pairs} == {(0,)}
    assert dict(main.hparams)["kd.ce_weight"] == dict(temps.hparams)["kd.ce_weight"]


def test_the_hinton_teacher_keeps_its_run_id_when_the_students_schedule_changes():
    """The students' [recipe] fields reach the teacher unless its [recipe.by_model] sets them: a student
    learning rate, warm-up or split added to the suite must not quietly retrain the 300-epoch teacher
    (results/hinton-mnist holds its row and its weights under this id)."""
    from kdbench.sweep.spec import TeacherSpec

    s = get_suite("hinton-mnist")
    teacher = "hinton_mlp_1200"
    spec = TeacherSpec(model=teacher, dataset="mnist", seed=0, device="cpu",
                       recipe=s.recipe.with_overrides(s.recipe_by_model[teacher], "teacher"),
                       model_kwargs=tuple(sorted(s.model_kwargs[teacher].items())))
    assert spec.run_id == "331bdb22601db9bb"
    results = Path(__file__).resolve().parents[1] / "results" / "hinton-mnist"
    assert (results / "runs" / f"{spec.run_id}.json").is_file()
    assert (results / "teachers" / f"{spec.run_id}.pt").is_file()
