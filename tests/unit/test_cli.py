"""``mmserve <command>``: each command is the ``python -m`` module it names, with the arguments
passed on unchanged, from any working directory; ``mmserve --help`` imports none of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apps import cli

ROOT = Path(__file__).resolve().parents[2]


def mmserve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_and_exits_0(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mmserve <command>")
    for command in ("launch", "update", "export", "sweep"):
        assert f"\n  {command} " in out
    assert set(cli.COMMANDS) == {"launch", "update", "export", "sweep"}


def test_help_imports_no_command(tmp_path):
    code = ("import sys; from apps import cli; cli.main(['--help']); "
            "print(sorted(m for m in ('hydra', 'ray', 'torch', 'vllm', 'apps.launch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [[], ["bogus", "model=[echo]"]])
def test_no_or_an_unknown_command_exits_2_with_the_usage_on_stderr(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: mmserve <command>" in err
    assert ("unknown command 'bogus'" in err) == bool(argv)


def test_version(capsys):
    cli.main(["--version"])
    out = capsys.readouterr().out.strip()
    assert out.startswith("mmserve ") and out != "mmserve "


def test_launch_passes_hydra_flags_through_and_finds_conf_from_any_cwd(tmp_path):
    r = mmserve("launch", "--cfg", "job", "model=[echo]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model:\n  echo:\n    model_id: echo" in r.stdout
    assert "tiny_llama" not in r.stdout  # the override applied


def test_export_takes_its_own_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--help"])
    assert exc.value.code == 0
    assert "--working-dir" in capsys.readouterr().out


@pytest.fixture
def hydra_runs(monkeypatch):
    """The Hydra apps the commands start, with their argv and the launcher's UPDATING then."""
    from apps import launch

    runs = []
    monkeypatch.setattr(cli, "run_hydra",
                        lambda app, prog, args: runs.append((app, prog, args, launch.UPDATING)))
    return runs


@pytest.mark.parametrize("argv, updating", [
    (["launch", "model=[echo]"], False),
    (["update", "model=[echo]"], True),
    (["launch", "--update", "model=[echo]"], True),  # as `python -m apps.launch --update` takes it
])
def test_launch_and_update_run_the_launcher(argv, updating, hydra_runs):
    from apps import launch

    cli.main(argv)
    assert hydra_runs == [(launch.main, f"mmserve {'update' if updating else 'launch'}", ["model=[echo]"], updating)]
    assert launch.UPDATING is False  # reset, for whatever runs next in this process


def test_sweep_runs_the_benchmark_app(hydra_runs):
    from apps import bench

    cli.main(["sweep", "-m", "load.concurrency=1,8"])
    assert hydra_runs == [(bench.main, "mmserve sweep", ["-m", "load.concurrency=1,8"], False)]
