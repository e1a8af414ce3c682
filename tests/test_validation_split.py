"""A validation split and early stopping (recipe fields ``val_fraction`` and ``early_stop``).

The split is stratified, seeded by a fixed split seed and complementary to the training images; a run
records the validation top-1 of every epoch, the best validation epoch and the test top-1 there; early
stopping ends training after ``early_stop`` epochs without a new best; resuming gives the uninterrupted
result (an early-stopped run stays stopped); the teacher cache looks up the images a held-out run trains on;
bad settings are refused before anything trains; run ids of recipes without the fields do not change.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from test_resume import StopAfter  # the Ctrl-C stand-in the resume tests use
from tiny import TINY, TINY_SHAPE, TINY_STUDENT

from kdbench import zoo
from kdbench.cli import main
from kdbench.data import holdout, holdout_indices, load_dataset
from kdbench.errors import KdbenchError
from kdbench.features import probe
from kdbench.ids import digest
from kdbench.recipe import RECIPES, Recipe, get_recipe
from kdbench.registry import build_method, load_methods
from kdbench.sweep.columns import Col
from kdbench.sweep.rows import validation_columns
from kdbench.train import TrainResult, build_view_cache, freeze, train

RECIPE = Recipe(name="t", epochs=4, batch_size=64, lr=0.05, milestones=(3,), crop_padding=1, flip=True,
                val_fraction=0.2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit=250)


# -- the split ----------------------------------------------------------------------------------

def test_holdout_is_stratified_complementary_and_keeps_the_order():
    data = load_dataset("digits")
    train_part, val_images, val_labels = holdout(data, 0.1)
    counts, held = torch.bincount(data.train_labels), torch.bincount(val_labels, minlength=10)
    assert held.tolist() == [max(1, round(0.1 * int(c))) for c in counts]
    keep, val = holdout_indices(data.train_labels, 0.1)
    assert set(keep.tolist()).isdisjoint(val.tolist())
    assert sorted(keep.tolist() + val.tolist()) == list(range(len(data.train_labels)))
    assert torch.equal(keep, keep.sort().values) and torch.equal(val, val.sort().values)
    assert torch.equal(train_part.train_images, data.train_images[keep])  # the original order
    assert torch.equal(train_part.train_labels, data.train_labels[keep])
    assert torch.equal(val_images, data.train_images[val]) and torch.equal(val_labels, data.train_labels[val])
    assert val_images.dtype == torch.uint8 and val_labels.dtype == torch.int64
    assert train_part.info.train_size == len(keep) == len(data.train_labels) - len(val)
    assert train_part.test_images is data.test_images and train_part.info.test_size == data.info.test_size


def test_holdout_is_deterministic_and_its_seed_chooses():
    data = load_dataset("digits", limit=300)
    torch.manual_seed(123)  # the global RNG plays no part
    a = holdout_indices(data.train_labels, 0.25)
    torch.manual_seed(7)
    b = holdout_indices(data.train_labels, 0.25)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = holdout_indices(data.train_labels, 0.25, seed=1)
    assert not torch.equal(a[1], other[1])
    assert torch.bincount(data.train_labels[a[1]]).tolist() == torch.bincount(data.train_labels[other[1]]).tolist()


def test_holdout_keeps_one_image_of_each_class_at_a_small_fraction():
    data = load_dataset("digits", limit=40)  # ~4 per class: round(0.05 × 4) = 0, held out anyway
    _, _, labels = holdout(data, 0.05)
    assert sorted(labels.tolist()) == sorted(set(data.train_labels.tolist()))


# -- recipe fields and run ids ------------------------------------------------------------------

def test_run_ids_of_recipes_without_the_fields_are_unchanged():
    # sha256 of each named recipe's dict before val_fraction and early_stop existed
    before = {"crd": "0259ed5d6997b495", "digits": "94fcc0b8accf2c9b", "mnist_mlp": "1a515749d2dd81af"}
    assert {n: digest(r.to_dict()) for n, r in RECIPES.items() if n in before} == before  # later recipes are new
    d = get_recipe("digits").with_overrides({"val_fraction": 0.1, "early_stop": 3}, "t").to_dict()
    assert (d["val_fraction"], d["early_stop"]) == (0.1, 3)
    assert digest(d) != before["digits"]


def test_the_fields_are_set_from_a_suite_and_named_in_the_schedule():
    r = get_recipe("digits").with_overrides({"val_fraction": 0.1}, "suite [recipe]")
    r = r.with_overrides({"early_stop": 3}, "suite [recipe.by_model.m]")
    assert (r.val_fraction, r.early_stop) == (0.1, 3)
    assert r.label == "digits, 30 epochs, 10% held out for validation, early stopping (patience 3)"
    assert get_recipe("digits").label == "digits, 30 epochs"


@pytest.mark.parametrize("fields, expected", [
    ({"val_fraction": 0.6}, r"val_fraction must be 0 \(no validation split\) or in \(0, 0.5\], got 0.6; use e\.g\."),
    ({"val_fraction": -0.1}, r"val_fraction must be 0 .* got -0.1"),
    ({"early_stop": 3}, r"early_stop = 3 needs a validation split to watch; set val_fraction"),
    ({"early_stop": -1, "val_fraction": 0.1}, r"early_stop must be >= 0, got -1"),
])
def test_bad_settings_are_refused(fields, expected):
    with pytest.raises(KdbenchError, match=expected):
        get_recipe("digits").with_overrides(fields, "suite [recipe]")
    with pytest.raises(KdbenchError, match=expected):
        Recipe(name="x", epochs=1, batch_size=8, lr=0.1, milestones=(), **fields)


@pytest.mark.parametrize("flags, expected", [
    (["--val-fraction", "0.7"], r"val_fraction must be 0 \(no validation split\) or in \(0, 0.5\]"),
    (["--early-stop", "2"], r"early_stop = 2 needs a validation split to watch; set val_fraction"),
    (["--val-fraction", "0.1", "--early-stop", "-1"], r"--early-stop: expected a whole number >= 0"),
])
def test_bad_flags_train_nothing(flags, expected, tmp_path, capsys):
    code = None
    try:
        code = main(["run", "--methods", "ce", "--pairs", "cifar_resnet8:cifar_resnet8", "--limit", "64",
                     "--epochs", "1", "-q", "--no-report", "--results-dir", str(tmp_path), *flags])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "Traceback" not in err, err  # kdbench's, or argparse's
    assert re.search(expected, err), err
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.pt"))


# -- training -----------------------------------------------------------------------------------

def _student(model: str = TINY_STUDENT) -> torch.nn.Module:
    torch.manual_seed(1)
    return zoo.create(model, **TINY)


def test_a_run_records_validation_accuracy_and_the_test_top1_at_its_best_epoch(data):
    res = train(_student(), data, RECIPE, seed=3)
    vals = [h.val_top1 for h in res.history]
    assert len(vals) == RECIPE.epochs and all(0 <= v <= 100 for v in vals)
    best = vals.index(max(vals))  # the first epoch with the best validation top-1
    assert res.val_best_epoch == best and res.val_best_top1 == vals[best]
    assert res.top1_val_best == res.history[best].top1 and res.top5_val_best == res.history[best].top5
    assert res.best_top1 == max(h.top1 for h in res.history)  # the test-set rule stays
    assert res.stopped_epoch is None
    # 250 digits hold out round(0.2 × count) of each class: the run saw the rest, in order.
    keep, val = holdout_indices(data.train_labels, 0.2)
    assert len(keep) + len(val) == 250 and 40 <= len(val) <= 60


def _expected_stop(vals: list[float], patience: int) -> int | None:
    best = 0
    for e, v in enumerate(vals):
        if v > vals[best]:
            best = e
        if e - best >= patience:
            return e
    return None


def test_early_stopping_stops_after_patience_epochs_without_a_new_best(data):
    # An MLP (no BatchNorm statistics) at a vanishing learning rate: its predictions never change, so
    # the first epoch stays the best and training ends `patience` epochs later.
    recipe = Recipe(name="t", epochs=8, batch_size=64, lr=1e-12, milestones=(), crop_padding=0, flip=False,
                    val_fraction=0.2, early_stop=2)
    res = train(_student("hinton_mlp_30"), data, recipe, seed=0)
    assert res.val_best_epoch == 0 and res.stopped_epoch == 2 and len(res.history) == 3


def test_an_early_stopped_run_is_the_full_runs_prefix(data):
    # lr ×1e-4 after epoch 3: validation top-1 stalls, so patience 2 runs out before epoch 8
    recipe = Recipe(**{**vars(RECIPE), "epochs": 8, "milestones": (3,), "gamma": 1e-4})
    full = train(_student(), data, recipe, seed=3)
    vals = [h.val_top1 for h in full.history]
    stop = _expected_stop(vals, 2)
    assert stop is not None, vals
    res = train(_student(), data, Recipe(**{**vars(recipe), "early_stop": 2}), seed=3)
    assert res.stopped_epoch == stop and len(res.history) == stop + 1
    n = stop + 1
    assert [h.losses for h in res.history] == [h.losses for h in full.history[:n]]
    assert [h.val_top1 for h in res.history] == vals[:n]


def test_resume_equals_the_uninterrupted_run_and_an_early_stopped_run_stays_stopped(data, tmp_path):
    recipe = Recipe(name="t", epochs=8, batch_size=64, lr=1e-12, milestones=(), crop_padding=1, flip=False,
                    val_fraction=0.2, early_stop=3)

    def run(state: Path | None, progress=None) -> TrainResult:
        return train(_student("hinton_mlp_30"), data, recipe, seed=0, state_path=state, state_key="k",
                     progress=progress)

    ref = run(None)
    assert ref.stopped_epoch == 3
    state = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        run(state, StopAfter(2))
    res = run(state)  # resumed at epoch 2, stops at 3 as the uninterrupted run did
    assert res.resumed_from == 2 and res.stopped_epoch == 3
    assert [vars(h) for h in res.history] == [vars(h) for h in ref.history]
    again = run(state)  # the stopped run's checkpoint: nothing more to train
    assert again.stopped_epoch == 3 and len(again.history) == 4
    assert [vars(h) for h in again.history] == [vars(h) for h in ref.history]
    assert torch.equal(again.test_logits, ref.test_logits)


def test_resume_of_a_bn_model_with_a_split_is_bitwise_equal(data, tmp_path):
    ref_model = _student()
    ref = train(ref_model, data, RECIPE, seed=3)
    state = tmp_path / "c.pt"
    with pytest.raises(KeyboardInterrupt):
        train(_student(), data, RECIPE, seed=3, state_path=state, state_key="k", progress=StopAfter(2))
    model = _student()
    res = train(model, data, RECIPE, seed=3, state_path=state, state_key="k")
    assert res.resumed_from == 2
    assert [vars(h) for h in res.history] == [vars(h) for h in ref.history]
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_the_teacher_cache_of_the_whole_training_set_serves_a_held_out_run(data, name):
    """The runner builds one cache over every training image; a run with a split must look up its own
    images: the same numbers as running the teacher online. rkd also reads the pooled vector."""
    method_cls = load_methods()[name]

    def run(cached: bool) -> TrainResult:
        torch.manual_seed(0)
        teacher = freeze(zoo.create("cifar_resnet14", **TINY))
        student = _student()
        method = build_method(method_cls)
        taps = method.taps()
        method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
        caches = [build_view_cache(teacher, data, RECIPE, pooled=taps.pooled)] if cached else ()
        return train(student, data, RECIPE, seed=3, method=method, teachers=[teacher], teacher_caches=caches)

    online, cached = run(False), run(True)
    assert [h.losses for h in cached.history] == [h.losses for h in online.history]
    assert [h.val_top1 for h in cached.history] == [h.val_top1 for h in online.history]
    assert torch.equal(cached.test_logits, online.test_logits)


def test_a_cache_for_another_training_set_is_refused(data):
    torch.manual_seed(0)
    teacher = freeze(zoo.create("cifar_resnet14", **TINY))
    cache = build_view_cache(teacher, load_dataset("digits", limit=100), RECIPE)
    method = build_method(load_methods()["kd"])
    with pytest.raises(KdbenchError, match=r"teacher cache holds 100 images, the training set \d+"):
        train(_student(), data, RECIPE, seed=0, method=method, teachers=[teacher], teacher_caches=[cache])


# -- rows ---------------------------------------------------------------------------------------

def test_row_columns_are_filled_for_a_split_and_empty_without(data):
    recipe = Recipe(**{**vars(RECIPE), "epochs": 2})
    res = train(_student(), data, recipe, seed=3)
    cols = validation_columns(recipe, res, True)
    assert Col.top1("val_best") == Col.TOP1_VAL_BEST == "top1_val_best"
    assert cols[Col.VAL_FRACTION] == 0.2 and cols[Col.EARLY_STOP] == 0
    assert json.loads(cols[Col.HISTORY_VAL_TOP1]) == [round(h.val_top1, 4) for h in res.history]
    assert cols[Col.VAL_BEST_EPOCH] == res.val_best_epoch and cols[Col.VAL_TOP1_BEST] == res.val_best_top1
    assert cols[Col.TOP1_VAL_BEST] == res.history[res.val_best_epoch].top1
    assert math.isnan(cols[Col.STOPPED_AT])
    plain = Recipe(**{**vars(recipe), "val_fraction": 0.0})
    empty = validation_columns(plain, train(_student(), data, plain, seed=3), True)
    assert empty[Col.VAL_FRACTION] == 0.0 and empty[Col.HISTORY_VAL_TOP1] == ""
    assert all(math.isnan(empty[c]) for c in (Col.VAL_BEST_EPOCH, Col.VAL_TOP1_BEST, Col.TOP1_VAL_BEST,
                                               Col.TOP5_VAL_BEST, Col.STOPPED_AT))


def test_a_sweep_writes_the_columns(tmp_path):
    results = tmp_path / "res"
    code = main(["run", "--seeds", "0", "--methods", "ce", "--pairs", "cifar_resnet8:cifar_resnet8", "--limit", "96",
                 "--epochs", "3",
                 "--val-fraction", "0.25", "--early-stop", "1", "-q", "--no-report", "--throughput-batch", "8",
                 "--results-dir", str(results)])
    assert code == 0
    (row,) = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert row[Col.VAL_FRACTION] == 0.25 and row[Col.EARLY_STOP] == 1
    history = json.loads(row[Col.HISTORY_VAL_TOP1])
    assert len(history) == len(json.loads(row[Col.HISTORY_TOP1])) and 1 <= len(history) <= 3
    assert abs(row[Col.TOP1_VAL_BEST] - json.loads(row[Col.HISTORY_TOP1])[row[Col.VAL_BEST_EPOCH]]) < 1e-3
    assert "25% held out for validation, early stopping (patience 1)" in row[Col.SCHEDULE]
    assert json.loads(row[Col.RECIPE_CONFIG])["val_fraction"] == 0.25
