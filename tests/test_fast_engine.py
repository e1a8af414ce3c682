"""The fast engine's promises on the CPU: the teacher cache is exact, the speed options keep the
mathematics (fp32 losses under bf16, channels_last and compile within float tolerance), and nothing
inside an epoch waits for the device. GPU-only behaviour (CUDA graphs, sync-free kernels) is
checked where a GPU exists, and skipped with the reason elsewhere."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from kdbench import zoo
from kdbench.data import Loader, draw_views, fixed_views, load_dataset, view_count, view_index
from kdbench.errors import KdbenchError
from kdbench.features import probe
from kdbench.method import Method
from kdbench.recipe import Recipe
from kdbench.registry import build_method, load_methods
from kdbench.train import EngineOptions, TrainResult, build_view_cache, cacheable, freeze, train
from tiny import TINY as KW
from tiny import TINY_SHAPE, TINY_STUDENT

METHODS = load_methods()
TEACHERS = ("cifar_resnet14", "cifar_wrn_16_1")
# Crop and flip on: the cache must get every one of the (2·1+1)² × 2 = 18 views right.
RECIPE = Recipe(name="t", epochs=2, batch_size=64, lr=0.05, milestones=(1,), crop_padding=1, flip=True)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", limit=150)  # 150 = 2 full batches + a short one


def _models(n_teachers: int) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    torch.manual_seed(0)
    teachers = [freeze(zoo.create(name, **KW)) for name in TEACHERS[:n_teachers]]
    torch.manual_seed(1)
    return zoo.create(TINY_STUDENT, **KW), teachers


def _train(name: str, data, *, cached: bool = False, options: EngineOptions = EngineOptions(),
           method: Method | None = None, recipe: Recipe = RECIPE, progress=None) -> TrainResult:
    cls = METHODS[name] if method is None else type(method)
    student, teachers = _models(min(cls.max_teachers, 2))
    method = method or build_method(cls)
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(t, taps, TINY_SHAPE) for t in teachers])
    caches = [build_view_cache(t, data, recipe, pooled=taps.pooled, options=options) for t in teachers] \
        if cached else ()
    return train(student, data, recipe, seed=3, method=method, teachers=teachers, options=options,
                 teacher_caches=caches, progress=progress)


def _losses(result: TrainResult) -> list[dict[str, float]]:
    return [h.losses for h in result.history]


# -- views --------------------------------------------------------------------------------------

def test_view_numbers_cover_every_view_once():
    assert view_count(4, True) == 162 and view_count(0, False) == 1 and view_count(2, False) == 25
    for pad, flip in ((4, True), (1, False), (0, True)):
        n = view_count(pad, flip)
        got = [int(view_index(fixed_views(v, 1, pad, flip, "cpu"), pad, 1, "cpu")) for v in range(n)]
        assert got == list(range(n))


def test_drawn_view_numbers_name_the_crop_and_flip_applied():
    gen = torch.Generator().manual_seed(0)
    views = draw_views(500, crop_padding=4, flip=True, generator=gen, device="cpu")
    index = view_index(views, 4, 500, "cpu")
    for i in range(0, 500, 37):
        again = fixed_views(int(index[i]), 1, 4, True, "cpu")
        assert again.offsets[:, 0].tolist() == views.offsets[:, i].tolist()
        assert bool(again.mirror[0]) == bool(views.mirror[i])


def test_loader_batches_draw_the_same_random_numbers_as_before():
    """The index/view-returning batches equal the plain iteration (and so every stored result)."""
    data = load_dataset("digits", limit=100)

    def loader():
        return Loader(data.train_images, data.train_labels, data.info, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(5), crop_padding=1, flip=True)

    plain = list(loader())
    rich = list(loader().batches(views=True))
    assert len(plain) == len(rich) == 4
    for (x, y), b in zip(plain, rich):
        assert torch.equal(x, b.images) and torch.equal(y, b.labels)
        assert torch.equal(data.train_labels[b.index], b.labels)


# -- the teacher cache --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kd", "rkd", "ensemble_kd", "dkd"])
def test_cached_teacher_outputs_train_exactly_as_online(data, name):
    """Same seed, same losses and accuracies, bit for bit, with and without the cache (fp32, CPU).

    rkd reads the pooled vector, ensemble_kd two teachers: both come from the cache too.
    """
    assert cacheable(build_method(METHODS[name]).taps())
    online, cached = _train(name, data), _train(name, data, cached=True)
    assert _losses(cached) == _losses(online)
    assert torch.equal(cached.test_logits, online.test_logits)


def test_methods_with_stage_maps_are_not_cacheable():
    assert not cacheable(build_method(METHODS["fitnets"]).taps())


def test_cache_holds_every_view_of_every_image(data):
    _, (teacher,) = _models(1)
    cache = build_view_cache(teacher, data, RECIPE)
    assert cache.logits.shape == (150, 18, 10) and cache.pooled is None
    # Spot check against the teacher itself on the view's image.
    from kdbench.data import apply_views, normalize

    for v in (0, 7, 17):
        x = apply_views(data.train_images[:5], fixed_views(v, 5, 1, True, "cpu"), 1)
        with torch.no_grad():
            assert torch.equal(teacher(normalize(x, data.info)), cache.logits[:5, v])


def test_a_cache_for_other_augmentation_or_data_is_refused(data):
    _, (teacher,) = _models(1)
    cache = build_view_cache(teacher, data, RECIPE)
    student, _ = _models(0)
    other = Recipe(name="t", epochs=1, batch_size=64, lr=0.05, milestones=(), crop_padding=2, flip=True)
    with pytest.raises(KdbenchError, match="crop padding 1"):
        train(student, data, other, seed=0, method=build_method(METHODS["kd"]), teachers=[teacher],
              teacher_caches=[cache])
    with pytest.raises(KdbenchError, match="holds 150 images"):
        train(student, load_dataset("digits", limit=100), RECIPE, seed=0, method=build_method(METHODS["kd"]),
              teachers=[teacher], teacher_caches=[cache])


# -- speed options keep the mathematics ---------------------------------------------------------

class DtypeProbe(Method):
    """A test plugin that records the dtypes the engine hands a method."""

    name = "dtype_probe"
    paper = "test"
    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, student, teachers, batch):
        DtypeProbe.seen.append((student.logits.dtype, teachers[0].logits.dtype))
        return {"kd_like": (student.logits.log_softmax(1) * teachers[0].logits.softmax(1)).sum(1).mean().neg()}


def test_bf16_keeps_weights_batchnorm_and_losses_in_fp32(data):
    DtypeProbe.seen.clear()
    student, (teacher,) = _models(1)
    result = train(student, data, RECIPE, seed=3, method=DtypeProbe(), teachers=[teacher],
                   options=EngineOptions("bf16"))
    assert DtypeProbe.seen and set(DtypeProbe.seen) == {(torch.float32, torch.float32)}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {b.dtype for n, b in student.named_buffers() if "running" in n} == {torch.float32}
    # Close to fp32 (the first epoch's losses), yet not identical: autocast really ran in bf16.
    fp32 = train(_models(1)[0], data, RECIPE, seed=3, method=DtypeProbe(), teachers=[teacher])
    first, ref = result.history[0].losses, fp32.history[0].losses
    assert first != ref
    for k in ref:
        assert first[k] == pytest.approx(ref[k], rel=0.05)


def test_channels_last_matches_plain_fp32(data):
    plain = _train("kd", data)
    fast = _train("kd", data, options=EngineOptions(channels_last=True))
    for a, b in zip(_losses(fast), _losses(plain)):
        assert a == pytest.approx(b, rel=1e-4)
    assert next(iter(_models(1)[0].parameters())).is_contiguous()  # fresh models untouched


def test_compiled_step_matches_eager_within_float_tolerance(data):
    """torch.compile (inductor on the CPU) over one epoch, with a short last batch (its own graph)."""
    recipe = Recipe(name="t", epochs=1, batch_size=64, lr=0.05, milestones=(), crop_padding=1, flip=True)
    eager = _train("kd", data, recipe=recipe)
    compiled = _train("kd", data, recipe=recipe, options=EngineOptions(compile=True))
    for k, v in eager.history[0].losses.items():
        assert compiled.history[0].losses[k] == pytest.approx(v, rel=1e-4)
    assert compiled.last.top1 == pytest.approx(eager.last.top1, abs=1.0)


def test_options_defaults_by_device_and_bad_precision():
    assert EngineOptions.fast_for("cpu") == EngineOptions()
    assert EngineOptions.fast_for("cuda") == EngineOptions("bf16", channels_last=True, compile=True)
    with pytest.raises(KdbenchError, match="fp16"):
        EngineOptions("fp16")


# -- no host synchronisation inside an epoch ----------------------------------------------------

def test_reads_from_the_device_do_not_grow_with_steps(monkeypatch):
    """Every tensor->Python read (.item(), float(), bool(), .tolist()) is counted: 2 batches per
    epoch and 8 per epoch must read the same number of times (once per epoch, not per step)."""
    counts = {"n": 0}
    for attr in ("item", "__float__", "__bool__", "__int__", "tolist"):
        original = getattr(torch.Tensor, attr)

        def counting(self, *a, _original=original, **k):
            counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counting)

    def reads(limit: int) -> int:
        data = load_dataset("digits", limit=limit)
        student, (teacher,) = _models(1)
        recipe = Recipe(name="t", epochs=2, batch_size=16, lr=0.05, milestones=(), crop_padding=1, flip=True)
        counts["n"] = 0
        train(student, data, recipe, seed=0, method=build_method(METHODS["kd"]), teachers=[teacher])
        return counts["n"]

    few, many = reads(32), reads(128)
    assert few == many, f"{few} reads with 2 steps per epoch, {many} with 8: something syncs every step"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: device syncs exist only there")
@pytest.mark.parametrize("options", [EngineOptions(), EngineOptions.fast_for("cuda")], ids=lambda o: o.label)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_gpu_syncs_do_not_grow_with_steps(options, name):
    """CUDA's sync debug mode warns at every host synchronisation: 2 and 8 steps per epoch must
    warn equally often (the epoch-end reads and evaluation only), for every method (a boolean
    mask in a loss, e.g. ``x[x > 0]``, would sync every step)."""
    import warnings

    def syncs(limit: int) -> int:
        data = load_dataset("digits", limit=limit).to("cuda")
        student, (teacher,) = _models(1)
        recipe = Recipe(name="t", epochs=2, batch_size=16, lr=0.05, milestones=(), crop_padding=1, flip=True)
        method = build_method(METHODS[name])
        taps = method.taps()
        method.setup(probe(student, taps, TINY_SHAPE), [probe(teacher, taps, TINY_SHAPE)])
        method.cuda()
        train(student.cuda(), data, recipe, seed=0, method=method, teachers=[teacher.cuda()], options=options)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(student, data, recipe, seed=0, method=method, teachers=[teacher], options=options)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    few, many = syncs(32), syncs(128)
    assert few == many, f"{few} syncs with 2 steps per epoch, {many} with 8: something syncs every step"


# -- the CLI ------------------------------------------------------------------------------------

def _cli(args: list[str], capsys) -> tuple[int, str]:
    from kdbench.cli import main

    code = main(args)
    return code, capsys.readouterr().err


SWEEP = ["run", "--seeds", "0", "--pairs", "cifar_resnet14:cifar_resnet8", "--limit", "96", "--epochs", "2", "--quiet",
         "--throughput-batch", "16", "--no-report"]


def _rows_all(results) -> list[dict]:
    from kdbench.sweep.store import ResultsStore

    return ResultsStore(results).rows()


def _rows(results) -> dict[str, dict]:
    return {r["method"]: r for r in _rows_all(results)}


def test_teacher_cache_is_built_once_and_reused_across_sweeps(tmp_path, capsys, monkeypatch):
    import kdbench.sweep.runner as runner_mod

    builds: list[str] = []
    real = runner_mod.build_view_cache

    def counting(teacher, *a, **k):
        builds.append(type(teacher).__name__)
        return real(teacher, *a, **k)

    monkeypatch.setattr(runner_mod, "build_view_cache", counting)
    res = tmp_path / "res"
    assert _cli([*SWEEP, "--methods", "kd,dkd", "--teacher-cache", "on", "--results-dir", str(res)], capsys)[0] == 0
    assert len(builds) == 1  # kd and dkd share the logits cache
    rows = _rows(res)
    assert rows["kd"]["teacher_cache"] and rows["dkd"]["teacher_cache"]
    assert rows["kd"]["precision"] == "fp32" and rows["kd"]["compiled"] is False
    assert list((res / "cache").glob("*.pt"))
    # A later sweep (new runs of the same teacher) loads the cache file instead of building it again.
    again = [*SWEEP, "--methods", "kd", "--set", "kd.temperature=2"]
    assert _cli([*again, "--teacher-cache", "on", "--results-dir", str(res)], capsys)[0] == 0
    assert len(builds) == 1
    # ... and gets the same numbers as running the teacher online.
    off = tmp_path / "off"
    assert _cli([*again, "--teacher-cache", "off", "--results-dir", str(off)], capsys)[0] == 0
    on_row = next(r for r in _rows_all(res) if r["method"] == "kd" and '"temperature": 2' in r["hparams"])
    off_row = _rows(off)["kd"]
    assert on_row["run_id"] == off_row["run_id"]
    assert on_row["history_loss"] == off_row["history_loss"] and not off_row["teacher_cache"]


def test_precision_is_part_of_the_run_id(tmp_path, capsys):
    res = tmp_path / "res"
    assert _cli([*SWEEP, "--methods", "ce", "--results-dir", str(res)], capsys)[0] == 0
    assert _cli([*SWEEP, "--methods", "ce", "--precision", "bf16", "--results-dir", str(res)], capsys)[0] == 0
    rows = _rows_all(res)
    students = {r["precision"]: r["run_id"] for r in rows if r["kind"] == "student"}
    assert set(students) == {"fp32", "bf16"} and students["fp32"] != students["bf16"]


def test_runs_per_gpu_needs_gpus(tmp_path, capsys):
    code, err = _cli([*SWEEP, "--methods", "ce", "--runs-per-gpu", "4", "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "--runs-per-gpu needs --gpus" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_losses_trace_as_one_graph(name):
    """Each method's forward traces without an unplanned graph break (checked on the CPU with TorchDynamo).

    A break means torch.compile cannot hold the step in one graph, and the usual cause, an op
    whose output shape depends on the data (``x[x > 0]``, ``nonzero``), makes a GPU wait for the
    host at every step. The only breaks allowed are the ones a method asks for by name: a function
    marked ``@torch.compiler.disable`` (a seeded generator's draw, a memory bank's in-place update),
    each of which splits the step into one more graph."""
    import torch._dynamo

    method = build_method(METHODS[name])
    student, teachers = _models(min(METHODS[name].max_teachers, 2))
    taps = method.taps()
    method.setup(probe(student, taps, TINY_SHAPE), [probe(t, taps, TINY_SHAPE) for t in teachers])
    method.setup_data(train_size=16, labels=torch.arange(16) % 10)  # as the engine does before training
    x, y = torch.randn(16, *TINY_SHAPE), torch.randint(0, 10, (16,))
    from kdbench.features import FeatureCapture
    from kdbench.method import Batch

    out = FeatureCapture(student, taps)(x)
    with torch.no_grad():
        t_out = [FeatureCapture(t, taps)(x) for t in teachers]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(method)(out, t_out, Batch(x, y, 3, 10, torch.arange(16)))
    reasons = [str(b.reason) for b in explained.break_reasons]
    unplanned = [r for r in reasons if "torch.compiler.disable()" not in r]
    # (ce returns no terms: no graph at all, and no break)
    assert not unplanned, unplanned
    assert explained.graph_count <= 1 + len(reasons), reasons


class _GraphLog:
    """A ``torch.compile`` backend that runs each graph as traced (nothing compiled: seconds, not minutes, on
    the CPU) and records, per graph, its inputs that are Python numbers made inputs: SymInts and SymFloats,
    and 0-dim float64 tensors (how dynamo passes a float that changed). Doubles as the progress bar that
    notes the graph count at each epoch's end."""

    def __init__(self) -> None:
        self.graphs: list[list[str]] = []
        self.per_epoch: list[int] = []

    def __call__(self, gm, example_inputs):
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        # A size symbol (s0, s1, ...: a dimension that varies, as the short last batch's does after a graph
        # break) is a shape, not a Python number; a number passed in is named after its source (l_batch_epoch).
        scalars = [f"{type(x).__name__} {name}" for name, x in zip(names, example_inputs)
                   if (not isinstance(x, torch.Tensor) and not re.fullmatch(r"s\d+", name))
                   or (isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.float64)]
        self.graphs.append(scalars)
        return gm.forward

    def update(self, k: int) -> None:
        self.per_epoch += [len(self.graphs)] * k

    def set_postfix(self, **_: object) -> None:
        pass


#: What makes each method's schedule change in a short run: an init stage of 2 epochs, a warm-up ramp
#: over 3 epochs, FitNets' hint stage over half the epochs.
_SCHEDULED = {"ab": {"init_epochs": 2}, "fsp": {"init_epochs": 2}, "ft": {"init_epochs": 2}, "dkd": {"warmup": 3},
              "reviewkd": {"warmup": 3}, "fitnets": {"schedule": "two_stage", "hint_fraction": 0.5}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_graphs_do_not_grow_with_epochs(name, data, monkeypatch):
    """Issue 17, item 6: nothing that changes per epoch reaches the compiled step. The epoch, a warm-up ramp and
    the cross-entropy's weight are decided and multiplied outside the graph, so after the first epoch of each
    stage (init, FitNets' hint, train) no epoch compiles a graph, and no graph takes a Python number as an
    input (on a GPU each value of one would record a new CUDA graph). Checked with dynamo's real tracing and
    guards; only the backend is a recorder."""
    import torch._dynamo

    log = _GraphLog()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: real_compile(module, backend=log))
    method = build_method(METHODS[name], _SCHEDULED.get(name, {}))
    if name == "kd":  # a cross-entropy weight that changes every epoch (as a schedule of one would)
        monkeypatch.setattr(method, "ce_weight_at", lambda epoch, epochs: (1.0, 0.25, 4.0, 0.5, 1.0, 2.0)[epoch])
    torch._dynamo.reset()
    try:
        _train(name, data, method=method, options=EngineOptions(compile=True), recipe=replace(RECIPE, epochs=6),
               progress=log)
    finally:
        torch._dynamo.reset()
    stages = [("init" if e < method.init_epochs else method.stage_at(e - method.init_epochs, 6 - method.init_epochs))
              for e in range(6)]
    # a stage's first epoch may compile (its graphs, one per batch size); any later epoch must not
    grew = [e for e in range(1, 6) if stages[e] == stages[e - 1] and log.per_epoch[e] > log.per_epoch[e - 1]]
    assert not grew, f"{name}: graphs compiled in epochs {grew} (counts {log.per_epoch}, stages {stages})"
    assert not any(log.graphs), f"{name}: Python numbers are graph inputs: {log.graphs}"
    assert log.per_epoch[-1] > 0 or name == "ce"  # it did compile (ce's forward returns no terms: still a graph)


def test_a_damaged_cache_file_is_rebuilt(tmp_path, capsys):
    res = tmp_path / "res"
    args = [*SWEEP, "--methods", "kd", "--teacher-cache", "on", "--results-dir", str(res)]
    assert _cli(args, capsys)[0] == 0
    (cache,) = (res / "cache").glob("*.pt")
    first = _rows(res)["kd"]
    cache.write_bytes(cache.read_bytes()[:100])  # a truncated file
    (res / "runs" / f"{first['run_id']}.json").unlink()  # so the run is done again
    code, err = _cli(args, capsys)
    assert code == 0 and f"teacher cache {cache} is damaged" in err
    assert _rows(res)["kd"]["history_loss"] == first["history_loss"]
    assert cache.stat().st_size > 100
    assert not list(res.glob("state/cache-*"))  # the cache's lock folder is gone
