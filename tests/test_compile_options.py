"""torch.compile around the step, without compiling anything (the CPU would take minutes): dynamo's limits
under old and new names, the fallback to eager under --compile auto, and the per-epoch times rows record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdbench import zoo
from kdbench.cli import main
from kdbench.data import load_dataset
from kdbench.recipe import get_recipe
from kdbench.sweep.columns import Col
from kdbench.sweep.request import Request
from kdbench.sweep.rows import epoch_time_columns
from kdbench.train import EngineOptions, train
from kdbench.train.step import RECOMPILE_LIMIT, raise_recompile_limits


def test_recompile_limits_new_names():
    # torch >= 2.7
    config = SimpleNamespace(recompile_limit=8, accumulated_recompile_limit=256)
    assert raise_recompile_limits(config) == ["recompile_limit", "accumulated_recompile_limit"]
    assert config.recompile_limit == config.accumulated_recompile_limit == RECOMPILE_LIMIT


def test_recompile_limits_old_names():
    # torch < 2.7 has only the old names; their accumulated default (64) would cap the other limit first.
    config = SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=64)
    assert raise_recompile_limits(config) == ["cache_size_limit", "accumulated_cache_size_limit"]
    assert config.cache_size_limit == config.accumulated_cache_size_limit == RECOMPILE_LIMIT


def test_recompile_limits_keep_higher_values_and_skip_missing_names():
    config = SimpleNamespace(recompile_limit=1000)  # set higher by the user; no accumulated limit at all
    assert raise_recompile_limits(config) == ["recompile_limit"]
    assert config.recompile_limit == 1000 and not hasattr(config, "accumulated_recompile_limit")
    assert raise_recompile_limits(SimpleNamespace()) == []


def test_recompile_limits_prefer_the_new_name_where_both_exist():
    # Newer torch keeps the old name as an alias: only the new one is written.
    config = SimpleNamespace(recompile_limit=8, cache_size_limit=8)
    assert raise_recompile_limits(config) == ["recompile_limit"]
    assert config.recompile_limit == RECOMPILE_LIMIT and config.cache_size_limit == 8


class CompileFailed(RuntimeError):
    """What the fake torch.compile's result raises on its first call, as a backend failure would."""


@pytest.fixture
def broken_compile(monkeypatch) -> list:
    """torch.compile returns a function that raises when called; the list counts the calls."""
    calls: list = []

    def fake_compile(module, **kwargs):
        def compiled(*args, **kw):
            calls.append(kwargs)
            raise CompileFailed("backend 'inductor' failed\nwith a long traceback\nbelow")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def _train_mlp(options: EngineOptions, epochs: int = 3):
    data = load_dataset("digits", limit=130)
    torch.manual_seed(1)
    model = zoo.create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
    return train(model, data, get_recipe("digits").with_epochs(epochs), seed=0, options=options)


def test_auto_falls_back_to_eager_with_one_warning(broken_compile, capsys):
    ref = _train_mlp(EngineOptions())
    res = _train_mlp(EngineOptions(compile=True, compile_fallback=True))
    err = capsys.readouterr().err
    assert len(broken_compile) == 1, "compiling is tried once, then the run stays eager"
    assert res.compile_error == "CompileFailed: backend 'inductor' failed"
    assert err.count("torch.compile failed") == 1 and "at epoch 0 (CompileFailed" in err and "eager" in err
    # The failed call ran nothing: the run equals an eager one.
    assert [h.losses for h in res.history] == [h.losses for h in ref.history]
    assert [h.top1 for h in res.history] == [h.top1 for h in ref.history]


def test_on_keeps_a_compile_failure_an_error(broken_compile):
    with pytest.raises(CompileFailed):
        _train_mlp(EngineOptions(compile=True))


def test_compile_auto_means_fallback_on_and_on_means_strict():
    def options(compile: str, device: str) -> EngineOptions:
        return Request(None, (), "digits", get_recipe("digits"), compile=compile).engine_options(device)

    assert options("auto", "cuda").compile and options("auto", "cuda").compile_fallback
    assert options("on", "cuda").compile and not options("on", "cuda").compile_fallback
    assert not options("on", "cpu").compile_fallback
    assert not options("auto", "cpu").compile  # auto is eager on the CPU


def test_epoch_times_are_recorded():
    res = _train_mlp(EngineOptions(), epochs=4)
    assert sorted(res.epoch_train_s) == [0, 1, 2, 3] and all(t > 0 for t in res.epoch_train_s.values())
    assert res.warm_up_epochs == [0]
    assert sum(res.epoch_train_s.values()) <= res.train_time_s
    cols = epoch_time_columns(res)
    assert cols[Col.FIRST_EPOCH_TIME] == res.epoch_train_s[0]
    assert cols[Col.EPOCH_TIME] == sorted(res.epoch_train_s[e] for e in (1, 2, 3))[1]


def test_resumed_epochs_after_a_restart_count_as_warm_up(tmp_path):
    """The first epoch after resuming pays compiling again: left out of the steady-state median."""
    from test_resume import StopAfter

    data = load_dataset("digits", limit=130)
    recipe = get_recipe("digits").with_epochs(4)

    def run(progress=None):
        torch.manual_seed(1)
        model = zoo.create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
        return train(model, data, recipe, seed=0, state_path=tmp_path / "c.pt", state_key="k", progress=progress)

    with pytest.raises(KeyboardInterrupt):
        run(StopAfter(2))
    res = run()
    assert res.resumed_from == 2 and res.warm_up_epochs == [0, 2] and sorted(res.epoch_train_s) == [0, 1, 2, 3]
    assert epoch_time_columns(res)[Col.EPOCH_TIME] == (res.epoch_train_s[1] + res.epoch_train_s[3]) / 2


def test_rows_record_the_fallback_and_epoch_times(broken_compile, monkeypatch, tmp_path):
    """Through the CLI, with --compile auto made to compile on the CPU: the row says it ran eagerly and why,
    and its epoch times are consistent with train_time_s."""
    monkeypatch.setattr(EngineOptions, "fast_for", classmethod(lambda cls, device: cls(compile=True)))
    args = ["run", "--seeds", "0", "--methods", "kd", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "96",
            "--epochs", "3", "--quiet", "--no-report", "--throughput-batch", "8", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert {r["kind"] for r in rows} == {"teacher", "student"}
    for r in rows:
        assert r[Col.COMPILED] is False and r[Col.COMPILE_ERROR] == "CompileFailed: backend 'inductor' failed"
        assert 0 < r[Col.FIRST_EPOCH_TIME] <= r[Col.TRAIN_TIME]
        assert 0 < r[Col.EPOCH_TIME] and r[Col.FIRST_EPOCH_TIME] + 2 * r[Col.EPOCH_TIME] <= r[Col.TRAIN_TIME] * 1.5
        assert r[Col.EPOCH_TIME] <= r[Col.TRAIN_TIME] / 2


def test_rows_without_compile_or_steady_epochs(tmp_path):
    args = ["run", "--seeds", "0", "--methods", "ce", "--pairs", "hinton_mlp_1200:hinton_mlp_800", "--limit", "48",
            "--epochs", "1", "--quiet", "--no-report", "--throughput-batch", "8", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    for p in (tmp_path / "runs").glob("*.json"):
        r = json.loads(p.read_text())
        assert r[Col.COMPILED] is False and r[Col.COMPILE_ERROR] == ""
        assert 0 < r[Col.FIRST_EPOCH_TIME] <= r[Col.TRAIN_TIME]
        assert r[Col.EPOCH_TIME] is None  # one epoch: no steady state to measure (NaN, stored as null)


@pytest.mark.parametrize("device, world, mode", [("cuda", 1, "reduce-overhead"), ("cuda", 2, None),
                                                 ("cpu", 1, None), ("cpu", 2, None)])
def test_no_cuda_graphs_under_ddp(monkeypatch, device, world, mode):
    """Issue 17, item 8: DDP (find_unused_parameters) with CUDA graphs has known upstream failures, so with more
    than one rank the step compiles in the default mode. Nothing is compiled: torch.compile records its kwargs."""
    from kdbench.train import step as step_module

    seen: list = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.append(kwargs) or module)
    monkeypatch.setattr(step_module.distributed, "world_size", lambda: world)
    model = zoo.create("hinton_mlp_800", num_classes=10, in_chans=1, img_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = step_module.TrainStep(model, None, [], opt, recipe=get_recipe("digits"), device=torch.device(device))
    assert step.world == world
    step.compile()
    assert seen == [{"mode": mode}] and step.compiled
    assert step_module.compile_mode(torch.device(device), world) == mode


@pytest.mark.parametrize("name", ["fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"])
def test_hitting_a_recompile_limit_is_an_error(name):
    """Issue 17, item 3: dynamo would silently go on eagerly at the limit while the row says compiled."""
    config = SimpleNamespace(recompile_limit=8, **{name: False})
    assert raise_recompile_limits(config) == ["recompile_limit", name] and getattr(config, name) is True
    both = SimpleNamespace(fail_on_recompile_limit_hit=False, fail_on_cache_limit_hit=False)  # new name first
    assert raise_recompile_limits(both) == ["fail_on_recompile_limit_hit"]


def test_a_recompile_limit_hit_falls_back_to_eager_and_is_recorded(monkeypatch, capsys):
    """A real limit hit (dynamo with the 'eager' backend, nothing compiled, and a limit of 1 graph) under
    --compile auto: the step records the fallback instead of running eagerly in silence."""
    import torch._dynamo

    from kdbench.train import step as step_module

    real_compile, real_raise = torch.compile, step_module.raise_recompile_limits
    # Restored with dynamo's own snapshot: monkeypatch's undo of its config module left the accumulated
    # limit hidden ("does not exist") for every later test that compiles.
    saved = torch._dynamo.config.save_config()

    def tiny_limits(config):
        real_raise(config)
        config.recompile_limit = 1

    monkeypatch.setattr(step_module, "raise_recompile_limits", tiny_limits)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend="eager"))
    torch._dynamo.reset()
    try:
        res = _train_mlp(EngineOptions(compile=True, compile_fallback=True))
    finally:
        torch._dynamo.reset()
        torch._dynamo.config.load_config(saved)
    assert "recompil" in res.compile_error.lower() or "limit" in res.compile_error.lower(), res.compile_error
    assert capsys.readouterr().err.count("torch.compile failed") == 1


def test_compile_time_is_the_time_of_the_steps_that_compiled(monkeypatch):
    """Issue 17, item 1: compile time is recorded apart from the steady state. Dynamo traces for real; its backend
    sleeps 0.3 s per graph, as code generation would take. 3 epochs of 130 images in batches of 64: two graphs
    (a full and the short last batch) in epoch 0 and none after, so compile_time_s is at least 0.6 s and at most
    epoch 0's time, and the later epochs (whose steps compile nothing) are far shorter."""
    import time

    import torch._dynamo

    def slow_backend(gm, example_inputs):
        time.sleep(0.3)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend=slow_backend))
    torch._dynamo.reset()
    try:
        res = _train_mlp(EngineOptions(compile=True))
    finally:
        torch._dynamo.reset()
    assert 0.6 <= res.compile_time_s <= res.epoch_train_s[0] <= res.train_time_s
    assert max(res.epoch_train_s[1], res.epoch_train_s[2]) < 0.3  # no compiling after epoch 0
    assert _train_mlp(EngineOptions()).compile_time_s == 0.0  # eager: nothing compiled
    assert epoch_time_columns(res)[Col.COMPILE_TIME] == res.compile_time_s
