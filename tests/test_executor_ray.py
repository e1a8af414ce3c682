"""The Ray executor on a real two-node local Ray cluster: the rows it writes equal the local
executor's, a run whose worker dies is retried (and resumes), a removed node's run moves to
another node, a run that always fails is reported without stopping the others, and the
environment variables it is given reach the workers.

Runs fail on purpose through a plugin method file (the ``--plugin`` mechanism), switched on by
environment variables that only the Ray workers get, so the local reference runs are plain KD.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from executors_common import store_rows

from kdbench.errors import KdbenchError
from kdbench.executors.ray_executor import RayExecutor
from kdbench.recipe import get_recipe
from kdbench.suites import Pair
from kdbench.sweep import Request, ResultsStore, Sweep
from kdbench.sweep.worker import do_task

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]" or ".[test]")')

pytestmark = pytest.mark.slow

PLUGIN = '''
"""KD variants that fail on purpose when an environment variable asks them to (executor tests)."""
import os
import time

from kdbench_methods.kd import KD


class CrashOnce(KD):
    """Its worker process dies in epoch 1 (as in a segfault or the OOM killer) until the marker exists."""
    name = "crash_once"

    def forward(self, student, teachers, batch):
        marker = os.environ.get("KDTEST_CRASH_MARKER")
        if marker and batch.epoch == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().forward(student, teachers, batch)


class AlwaysFails(KD):
    name = "always_fails"

    def forward(self, student, teachers, batch):
        log = os.environ.get("KDTEST_ATTEMPTS")
        if log:
            with open(log, "a") as f:
                f.write("attempt\\n")
        raise RuntimeError("always_fails fails on purpose")


class NeedsEnv(KD):
    name = "needs_env"

    def forward(self, student, teachers, batch):
        if os.environ.get("KDTEST_TOKEN") != "sesame":
            raise RuntimeError(f"KDTEST_TOKEN is {os.environ.get('KDTEST_TOKEN')!r} here, expected 'sesame'")
        return super().forward(student, teachers, batch)


_STARTED = set()


class Hold(KD):
    """Waits in its first step until KDTEST_HOLD_DIR/release exists, saying on which Ray node it waits."""
    name = "hold"

    def forward(self, student, teachers, batch):
        folder = os.environ.get("KDTEST_HOLD_DIR")
        if folder and not os.path.exists(os.path.join(folder, "release")):
            import ray

            if id(self) not in _STARTED:
                _STARTED.add(id(self))
                node = ray.get_runtime_context().get_node_id()
                open(os.path.join(folder, f"started-{node}-{os.getpid()}"), "w").close()
            deadline = time.time() + 60
            while not os.path.exists(os.path.join(folder, "release")):
                if time.time() > deadline:
                    raise RuntimeError("hold: never released")
                time.sleep(0.05)
        return super().forward(student, teachers, batch)
'''

PAIR = "cifar_resnet8@0:cifar_resnet8"  # one teacher (seed 0) for every seed: fewer runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def plugin(root) -> Path:
    path = root / "flaky_methods.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture(scope="module")
def env(root) -> dict[str, str]:
    """What every Ray sweep here passes on to its workers. One dict for all: Ray keeps worker
    processes per environment, and a fresh one (importing torch) costs about 10 s on 2 cores."""
    (root / "hold").mkdir()
    return {"KDTEST_CRASH_MARKER": str(root / "crashed"), "KDTEST_ATTEMPTS": str(root / "attempts.txt"),
            "KDTEST_TOKEN": "sesame", "KDTEST_HOLD_DIR": str(root / "hold")}


def make_request(plugin: Path, results_dir: Path, methods: list[str], seeds: tuple[int, ...] = (0,)) -> Request:
    return Request(methods=tuple(methods), named=True, pairs=(Pair.parse(PAIR),), dataset="digits",
                   recipe=get_recipe("digits").with_epochs(2), seeds=seeds, results_dir=results_dir, limit=64,
                   device="cpu", quiet=True, plugins=(str(plugin),), command="kdbench run (test)")


def sweep(req: Request, executor=None):
    return Sweep.prepare(req, log=lambda _: None).execute(executor)


@contextlib.contextmanager
def environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster of two nodes with one CPU each (processes on this machine), and this
    process connected to it for the whole module, so that its worker processes are reused."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20,
                                                       "include_dashboard": False})
    c.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_rows(plugin, root, cluster):
    """Every run the tests make, run here by the local (in-process) executor.

    With one thread, as each Ray run has (``cpus_per_run=1``): float results depend on the thread
    count. KDTEST_TOKEN is set for needs_env; the Ray workers get it only through the executor.
    """
    req = make_request(plugin, root / "local", ["ce", "kd", "crash_once", "needs_env", "hold"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with environ(KDTEST_TOKEN="sesame"):
            result = sweep(req)
            result2 = sweep(replace(req, methods=("hold",), seeds=(1, 2)))
    finally:
        torch.set_num_threads(threads)
    assert not result.unfinished and not result2.unfinished
    return store_rows(req.results_dir)


def executor(cluster, env, **kw) -> RayExecutor:
    return RayExecutor(do_task, address=cluster.address, gpus_per_run=0, cpus_per_run=1, env=env, **kw)


def check_rows_equal(results_dir: Path, local_rows: dict, expected: int) -> None:
    rows = store_rows(results_dir)
    assert len(rows) == expected, sorted(rows)
    for run_id, row in rows.items():
        assert row == local_rows[run_id], f"{row['method']} seed {row['seed']}: Ray's row differs from the local one"


def test_rows_equal_the_local_executors(cluster, env, plugin, local_rows, tmp_path):
    req = make_request(plugin, tmp_path, ["ce", "kd"])
    ex = executor(cluster, env, max_retries=2)
    try:
        result = sweep(req, ex)
    finally:
        ex.close()
    assert ray.is_initialized()  # close() leaves a connection it did not make
    assert not result.unfinished, result.unfinished
    assert {o.status for o in result.outcomes} == {"ok"} and {o.attempts for o in result.outcomes} == {1}
    check_rows_equal(tmp_path, local_rows, expected=3)  # the teacher, ce and kd


@pytest.fixture(scope="module")
def faulty_sweep(cluster, env, plugin, root):
    """One sweep with a run that crashes once, one that always fails, one that needs an env var."""
    req = make_request(plugin, root / "faulty", ["ce", "crash_once", "always_fails", "needs_env"])
    ex = executor(cluster, env, max_retries=2)
    try:
        result = sweep(req, ex)
    finally:
        ex.close()
    return req, {o.run_id: o for o in result.outcomes}


def _outcome(req, outcomes, method):
    [spec] = [s for s in Sweep.prepare(req).plan.specs if s.method == method]
    return outcomes[spec.run_id]


def test_a_run_whose_worker_dies_is_retried_and_resumes(faulty_sweep, env, local_rows):
    req, outcomes = faulty_sweep
    o = _outcome(req, outcomes, "crash_once")
    assert Path(env["KDTEST_CRASH_MARKER"]).exists()  # the first attempt did die (os._exit in epoch 1)
    assert o.status == "ok" and o.attempts == 2, o
    raw = json.loads((req.results_dir / "runs" / f"{o.run_id}.json").read_text())
    assert raw["resumed_from_epoch"] == 1  # the retry went on from the epoch-0 checkpoint
    assert store_rows(req.results_dir)[o.run_id] == local_rows[o.run_id]


def test_a_run_that_always_fails_is_reported_after_its_retries(faulty_sweep, env):
    req, outcomes = faulty_sweep
    o = _outcome(req, outcomes, "always_fails")
    assert o.status == "failed" and o.attempts == 3, o  # max_retries=2: three tries
    assert "RuntimeError: always_fails fails on purpose" in o.error
    assert Path(env["KDTEST_ATTEMPTS"]).read_text().count("attempt") == 3
    assert ResultsStore(req.results_dir).error_path(o.run_id).is_file()  # the worker wrote its traceback
    # ... and the other runs of the sweep finished.
    assert {outcomes[k].status for k in outcomes if k != o.run_id} == {"ok"}


def test_environment_variables_reach_the_workers(faulty_sweep, local_rows):
    req, outcomes = faulty_sweep
    assert "KDTEST_TOKEN" not in os.environ  # so only the executor's env can have carried it
    o = _outcome(req, outcomes, "needs_env")
    assert o.status == "ok", o.error
    assert store_rows(req.results_dir)[o.run_id] == local_rows[o.run_id]


def _kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL a process of this machine (a node of the local test cluster) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # a zombie (state Z: dead, not yet reaped by whoever adopted it) counts as gone
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} of the removed node is still alive after {timeout} s")


def test_a_removed_node_does_not_lose_its_run(cluster, env, plugin, local_rows, tmp_path):
    """Three runs wait in their first step, one on each of three nodes; the third node is removed
    (its processes killed) while its run waits there, and the sweep still writes every row."""
    node = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    hold = Path(env["KDTEST_HOLD_DIR"])
    req = make_request(plugin, tmp_path, ["hold"], seeds=(0, 1, 2))
    removed = []

    def remove_the_node_when_it_holds_a_run():
        deadline = time.time() + 60
        while time.time() < deadline and not removed:
            started = list(hold.glob(f"started-{node.node_id}-*"))
            if started:
                cluster.remove_node(node, allow_graceful=False)
                # A machine that is lost takes all its processes with it at once. Killing the raylet
                # leaves its worker alive until it notices, and a worker that sees the release first
                # finishes its run and hands the result straight to the driver (CI saw that once).
                for pid in (int(p.name.rsplit("-", 1)[1]) for p in started):
                    _kill_and_wait(pid)
                removed.append(node.node_id)
            time.sleep(0.05)
        (hold / "release").touch()

    remover = threading.Thread(target=remove_the_node_when_it_holds_a_run, daemon=True)
    ex = executor(cluster, env, max_retries=2)
    try:
        remover.start()
        result = sweep(req, ex)
    finally:
        (hold / "release").touch()
        remover.join()
        ex.close()
    assert removed, "no run was ever placed on the third node"
    assert not result.unfinished, result.unfinished
    # The teacher and two runs went through at once; the run on the removed node took another try
    # (or two, had Ray placed its retry on that node before it learnt that the node was gone).
    retried = [o for o in result.outcomes if o.attempts > 1]
    assert len(result.outcomes) == 4 and len(retried) == 1 and retried[0].status == "ok", result.outcomes
    check_rows_equal(tmp_path, local_rows, expected=4)


def test_connects_and_disconnects_only_what_it_connected(cluster, env, capsys):
    ray.shutdown()  # the module's connection: now the executor connects itself
    ex = RayExecutor(do_task, address=cluster.address, gpus_per_run=0.25, cpus_per_run=1, max_retries=0, env=env)
    ex._connect()  # what run() does first (here without a run: a fresh worker would cost ~10 s)
    assert ray.is_initialized()
    # No node has a GPU; a cluster that autoscales could still add one, so this only warns.
    assert "0.25 GPU per run, but the largest node has 0" in capsys.readouterr().out
    ex.close()
    assert not ray.is_initialized()
    ray.init(address=cluster.address, logging_level="WARNING")  # the cluster itself still runs
    assert ray.cluster_resources().get("CPU", 0) >= 2


def test_clear_errors_before_anything_runs(plugin, tmp_path, monkeypatch):
    with pytest.raises(KdbenchError, match="--gpus-per-run 1.5: give 0, a fraction up to 1"):
        RayExecutor(do_task, gpus_per_run=1.5)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(KdbenchError, match=r'needs Ray, which is not installed: pip install "kdbench\[ray\]"'):
        RayExecutor(do_task)
