"""The engine's promises, checked on real data and models: frozen teachers, trained adapters."""

from __future__ import annotations

import pytest
import torch

from kdbench import zoo
from kdbench.data import load_dataset
from kdbench.errors import KdbenchError
from kdbench.method import Method
from kdbench.recipe import get_recipe
from kdbench.registry import build_method, load_methods
from kdbench.train import train

METHODS = load_methods()
KW = dict(num_classes=10, in_chans=1, img_size=8)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit=64)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_teachers_stay_frozen_and_adapters_train(data):
    from kdbench.features import probe

    teacher = zoo.create("cifar_resnet14", **KW)  # BatchNorm: eval mode must keep its running stats
    student = zoo.create("cifar_resnet8", **KW)
    method = build_method(METHODS["fitnets"])
    shape = (1, 8, 8)
    method.setup(probe(student, method.taps(), shape), [probe(teacher, method.taps(), shape)])
    t_before, s_before, m_before = snapshot(teacher), snapshot(student), snapshot(method)
    result = train(student, data, get_recipe("digits").with_epochs(1), seed=0, method=method,
                   teachers=[teacher])
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, t_before[k], msg=f"teacher {k} changed")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, m_before[k])]
    assert any(k.endswith("weight") for k in changed), "the regressor was not optimised"
    assert set(result.last.losses) == {"ce", "hint"}


def test_hint_stage_trains_only_the_lower_student(data):
    """FitNets' two-stage schedule: CE is skipped in the hint stage, so layers above the hint stay put."""
    from kdbench.features import probe

    teacher = zoo.create("hinton_mlp_1200", **KW)
    student = zoo.create("hinton_mlp_800", **KW)
    method = build_method(METHODS["fitnets"], {"schedule": "two_stage", "hint_fraction": 1.0, "stage": 0})
    shape = (1, 8, 8)
    method.setup(probe(student, method.taps(), shape), [probe(teacher, method.taps(), shape)])
    before = snapshot(student)
    result = train(student, data, get_recipe("digits").with_epochs(1), seed=0, method=method,
                   teachers=[teacher])
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    # Stage 0 is the first hidden layer: only it moves; fc2 and the classifier get no gradient.
    assert moved == {"fc1.weight", "fc1.bias"}, moved
    assert set(result.last.losses) == {"hint"}


def test_non_scalar_term_is_refused(data):
    class Bad(Method):
        name = "bad"
        paper = "none"

        def forward(self, student, teachers, batch):
            return {"vector": student.logits.mean(0)}

    with pytest.raises(KdbenchError, match="loss term 'vector' that is not a scalar"):
        train(zoo.create("hinton_mlp_800", **KW), data, get_recipe("digits").with_epochs(1), seed=0,
              method=Bad(), teachers=[zoo.create("hinton_mlp_800", **KW)])


def test_shortened_recipe_scales_milestones():
    crd = get_recipe("crd")
    assert crd.lr_milestones == (150, 180, 210) and not crd.shortened
    short = crd.with_epochs(24)
    assert short.lr_milestones == (15, 18, 21) and short.shortened
    assert short.label == "crd, shortened: 24 of 240 epochs"


def test_warm_up_ramps_the_rate_linearly_then_the_steps_apply():
    from kdbench.recipe import Recipe
    from kdbench.train.engine import make_optimizer

    recipe = Recipe(name="w", epochs=8, batch_size=4, lr=0.1, milestones=(6,), warmup_epochs=4)
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe)
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01])
    plain = Recipe(name="w", epochs=8, batch_size=4, lr=0.1, milestones=(6,))
    assert "warmup_epochs" not in plain.to_dict()  # a later field: recipes without it keep their run ids
    assert recipe.to_dict()["warmup_epochs"] == 4


def test_init_stage_runs_at_its_rate_then_the_schedule():
    """A method's init stage: its epochs come first at init_lr_scale × the base rate, and the schedule's
    milestones count from its end."""
    from kdbench.recipe import RECIPES
    from kdbench.train.engine import make_optimizer

    recipe = RECIPES["digits"].with_overrides({"epochs": 6, "milestones": [3]}, "test")
    w = torch.nn.Parameter(torch.ones(2))
    opt, sched = make_optimizer([w], recipe, init_epochs=2, init_lr_scale=0.2)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    base = recipe.lr
    assert rates == pytest.approx([0.2 * base] * 2 + [base] * 3 + [base * recipe.gamma] * 3)


# -- optimiser, cosine schedule, label smoothing (issue 12, item 6) ---------------------------------------------------
def test_cosine_after_warm_up_and_adamw_or_nesterov():
    import math

    from kdbench.recipe import Recipe
    from kdbench.train.engine import make_optimizer

    recipe = Recipe(name="c", epochs=6, batch_size=4, lr=0.1, milestones=(), warmup_epochs=2, schedule="cosine",
                    optimizer="adamw", weight_decay=0.05)
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.05
    lrs = []
    for _ in range(recipe.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # warm-up 0.05, 0.1; then 0.1 * (1 + cos(pi * k / 4)) / 2 for k = 0..3
    assert lrs == pytest.approx([0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    sgd, _ = make_optimizer([torch.nn.Parameter(torch.zeros(1))],
                            Recipe(name="n", epochs=2, batch_size=4, lr=0.1, milestones=(), nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    plain = Recipe(name="p", epochs=2, batch_size=4, lr=0.1, milestones=())
    assert not {"optimizer", "schedule", "nesterov", "label_smoothing"} & set(plain.to_dict())  # ids unchanged
    assert recipe.label == "c, 6 epochs, adamw cosine schedule"


@pytest.mark.parametrize("fields, message", [
    (dict(optimizer="lamb"), "optimizer 'lamb' is not one of sgd, adamw"),
    (dict(schedule="poly"), "schedule 'poly' is not one of step, cosine"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(optimizer="adamw", nesterov=True), "nesterov needs optimizer 'sgd' with momentum > 0"),
])
def test_bad_optimiser_settings_are_refused(fields, message):
    from kdbench.recipe import Recipe

    with pytest.raises(KdbenchError, match=message):
        Recipe(name="b", epochs=2, batch_size=4, lr=0.1, milestones=(), **fields)


def test_label_smoothing_reaches_the_engines_cross_entropy(data):
    """The first batch's logged ce term is the smoothed cross-entropy of the untrained model's logits."""
    from kdbench.recipe import Recipe
    from kdbench.train.step import TrainStep

    recipe = Recipe(name="s", epochs=1, batch_size=16, lr=0.1, milestones=(), label_smoothing=0.2, crop_padding=0,
                    flip=False)
    torch.manual_seed(0)
    model = zoo.create("cifar_resnet8", num_classes=10, in_chans=1, img_size=8).eval()  # eval: BN as in the check
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(model, None, [], opt, recipe=recipe, device=torch.device("cpu"))
    from kdbench.data import Loader

    batch = next(Loader(data.train_images, data.train_labels, data.info, batch_size=16, shuffle=False).batches())
    expected = torch.nn.functional.cross_entropy(model(batch.images), batch.labels, label_smoothing=0.2)
    terms = step(batch, 0)
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].item() != pytest.approx(
        torch.nn.functional.cross_entropy(model(batch.images), batch.labels).item(), rel=1e-3)
