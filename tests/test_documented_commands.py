"""Every `kdbench` command the README, the docs and `--help` show on the default suite runs as written,
and an edited method is a new run, never a skip."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from tiny import REPO

from kdbench.cli import main
from kdbench.cli.args import EXAMPLES, REPRODUCE_EXAMPLES

#: Options that leave the default suite or this machine (other data, suites, GPUs, clusters): such
#: commands are documented for other setups, and their own tests cover them.
ELSEWHERE = {"--suite", "--dataset", "--data-dir", "--download", "--teacher-checkpoint", "--recipe", "--executor",
             "--gpus", "--workers", "--runs-per-gpu"}
#: Appended to every documented run: tiny and quiet, so the whole list runs in a minute or two.
TINY = ["--limit", "48", "--epochs", "1", "--throughput-batch", "8", "--quiet"]


def shell_blocks(markdown: str) -> list[str]:
    """The shell code blocks of a markdown text (fenced, no language or sh/bash/console), with
    backslash-continued lines joined."""
    blocks, current, lang = [], None, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("", "sh", "bash", "console", "shell"):
                    blocks.append(re.sub(r"\\\n\s*", " ", "\n".join(current)))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def documented_commands() -> list[str]:
    """`kdbench ...` lines of the README's and docs' code blocks and of the --help examples."""
    texts = [(REPO / "README.md").read_text(), *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))]
    lines = [line for text in texts for block in shell_blocks(text) for line in block.splitlines()]
    lines += [line.strip() for line in (EXAMPLES + REPRODUCE_EXAMPLES).splitlines()]
    found = []
    for line in lines:
        line = line.split("&&")[-1].strip()  # "pip install ... && kdbench run ..."
        line = re.sub(r"\s+#.*$", "", line)
        if not line.startswith("kdbench ") or line.endswith("..."):  # "..." marks an elided example
            continue
        first, *others = line.split(" | ")  # "kdbench list models | suites": one command each
        options = [first] + [f"{first.rpartition(' ')[0]} {word}" for word in others]
        found += [o for o in options if o not in found]
    return found


def on_the_default_suite(command: str) -> bool:
    words = shlex.split(command)
    return words[1] in ("run", "list", "report") and not ELSEWHERE & set(words)


COMMANDS = [c for c in documented_commands() if on_the_default_suite(c)]


def test_the_documented_commands_are_found():
    assert "kdbench run --methods all" in COMMANDS
    assert any("--plugin my_kd.py" in c for c in COMMANDS)
    assert any(c.startswith("kdbench run --methods kd,fitnets") for c in COMMANDS)
    assert any(c.startswith("kdbench report") for c in COMMANDS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding the README's plugin file, as a user who copied it has."""
    from test_cli import readme_plugin_code

    folder = tmp_path_factory.mktemp("docs")
    (folder / "my_kd.py").write_text(readme_plugin_code())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_runs_as_written(command, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    args = shlex.split(command)[1:]
    if "--help" in args:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 0 and "usage: kdbench" in capsys.readouterr().out
        return
    if args[0] == "run":
        args += TINY + ([] if "--seeds" in args else ["--seeds", "0"])  # one seed unless the command sets them
    if args[0] in ("run", "report"):
        args += ["--results-dir", str(workdir / "results")]
    if args[0] == "report" and not (workdir / "results" / "runs").is_dir():
        assert main(["run", "--methods", "ce", *TINY, "--results-dir", str(workdir / "results")]) == 0
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, f"`{command}` exited {code}:\n{err[-3000:]}"
    assert "error" not in err.lower(), err


EDITABLE = '''
import torch.nn.functional as F

from kdbench.method import Method


class Probe(Method):
    """A method whose code the test edits."""

    name = "probe_kd"
    paper = "(a test method)"

    def __init__(self, *, ce_weight: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight)
        self.weight = weight

    def forward(self, student, teachers, batch):
        return {"mse": self.weight * F.mse_loss(student.logits, teachers[0].logits)}
'''


def _rows(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def test_an_edited_method_is_a_new_run_not_a_skip(tmp_path, capsys):
    plugin, results = tmp_path / "probe_kd.py", tmp_path / "res"
    plugin.write_text(EDITABLE)
    command = ["run", "--plugin", str(plugin), "--methods", "ce,probe_kd", "--pairs", "cifar_resnet8:cifar_resnet8",
               "--seeds", "0", *TINY, "--results-dir", str(results)]
    assert main(command) == 0
    first = [r for r in _rows(results) if r["method"] == "probe_kd"]
    assert len(first) == 1 and first[0]["method_source"].startswith("sha256:")
    assert first[0]["method_source"].endswith(" probe_kd.py")
    capsys.readouterr()

    assert main(command) == 0  # unchanged: nothing to do
    assert "2 of 2 runs already in" in capsys.readouterr().out

    plugin.write_text(EDITABLE.replace("F.mse_loss(", "0.5 * F.mse_loss("))  # the method's forward changes
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "1 of 2 runs already in" in out and "1 runs finished" in out  # ce is skipped, probe_kd runs again
    probes = [r for r in _rows(results) if r["method"] == "probe_kd"]
    assert len(probes) == 2 and len({r["method_source"] for r in probes}) == 2
    assert len({r["run_id"] for r in probes}) == 2
    # The report tells the two codes apart instead of averaging them as seeds of one method.
    table = next((results / "report").glob("table_*.md")).read_text()
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| probe_kd")]
    assert len(labels) == 2 and labels[0] != labels[1] and all("{code " in label for label in labels), table


def test_a_method_that_fits_no_pair_is_an_error_only_when_named(tmp_path, capsys):
    results = tmp_path / "res"
    common = ["--pairs", "cifar_resnet8+cifar_resnet14:cifar_resnet8", *TINY, "--results-dir", str(results),
              "--dry-run"]
    assert main(["run", "--methods", "kd", *common]) == 2
    err = capsys.readouterr().err
    assert "method 'kd' takes 1 teacher, and no pair of this run has that many" in err
    assert main(["run", "--methods", "ce,kd,ensemble_kd", "--pairs", "cifar_resnet8:cifar_resnet8,"
                 "cifar_resnet8+cifar_resnet14:cifar_resnet8", *TINY, "--results-dir", str(results),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "left out: method 'kd' takes 1 teacher; pair cifar_resnet8+cifar_resnet14→cifar_resnet8 has 2" in out
    assert not results.exists()


def test_readme_methods_table_lists_every_registered_method():
    """The README's methods table is written by hand: it must name every built-in method, and nothing else."""
    from kdbench.registry import load_methods

    text = (REPO / "README.md").read_text()
    table = text.split("<!-- methods-table -->")[1].split("<!-- /methods-table -->")[0]
    listed = re.findall(r"^\| `([a-z0-9_]+)` \|", table, flags=re.M)
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == set(load_methods()), set(listed) ^ set(load_methods())
