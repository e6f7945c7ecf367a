"""Which CPUs a local Ray's own processes get (core.cpus, server.ray_cpus), and how a model's
process takes every CPU back."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import pytest

from core import cpus


@pytest.mark.parametrize(("setting", "machine", "gpus", "binds", "want"), [
    ("auto", {0, 1}, 0, True, {1}),            # vLLM's CPU worker binds core 0, leaves core 1
    ("auto", {0, 1, 2, 3}, 0, True, {3}),
    ("auto", {0, 1}, 1, True, None),           # a GPU host: the worker is on the GPU
    ("auto", {0, 1}, 0, False, None),          # nothing binds cores: no reason to confine
    ("auto", {0}, 0, True, None),              # one CPU: nothing to spare
    ("all", {0, 1}, 0, True, None),
    ([0], {0, 1}, 0, False, {0}),
    ([0, 1], {0, 1}, 0, True, None),           # every CPU is no confinement
])
def test_ray_cpus(setting, machine, gpus, binds, want):
    assert cpus.ray_cpus(setting, machine, gpus, binds) == want


def test_a_listed_cpu_the_process_cannot_use_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"CPUs \[5\] are not among this machine's \[0, 1\]"):
        cpus.ray_cpus([1, 5], {0, 1}, 0, True)


def test_the_launcher_refuses_it_as_a_config_error_under_its_key():
    from apps.config import compose
    from apps.serving import local_ray_cpus
    from core.validate import ConfigError

    cfg = compose(["model=[tiny_llama]", f"server.ray_cpus=[{max(cpus.allowed()) + 1}]"])
    with pytest.raises(ConfigError) as err:
        local_ray_cpus(cfg.server, cfg)
    assert err.value.problems[0][0] == "server.ray_cpus"


def test_auto_confines_only_where_a_model_binds_cores():
    from apps.config import compose
    from apps.serving import local_gpu_count, local_ray_cpus

    text, echo = compose(["model=[tiny_llama]"]), compose(["model=[echo]"])
    assert local_ray_cpus(echo.server, echo) is None
    machine = cpus.allowed()
    assert local_ray_cpus(text.server, text) == (None if local_gpu_count() or len(machine) < 2
                                                 else {max(machine)})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(cpus.allowed()) < 2,
                    reason="needs Linux and two CPUs")
def test_for_models_gives_every_thread_back_the_cpus_the_ray_started_without(monkeypatch):
    machine = cpus.allowed()
    one = {min(machine)}
    done = threading.Event()
    with cpus.confined(one):  # as the launcher starts a local Ray: what starts now inherits it
        thread = threading.Thread(target=done.wait)
        thread.start()
    try:
        assert cpus.allowed() == machine  # the caller's mask came back
        assert os.sched_getaffinity(thread.native_id) == one
        monkeypatch.delenv(cpus.MODEL_CPUS_ENV, raising=False)
        assert cpus.for_models() is None  # not started by a confining launcher: unchanged
        assert os.sched_getaffinity(thread.native_id) == one
        monkeypatch.setenv(cpus.MODEL_CPUS_ENV, cpus.encode(machine))
        assert cpus.for_models() == machine
        assert os.sched_getaffinity(thread.native_id) == machine
    finally:
        done.set()
        thread.join()


def test_processes_finds_a_program_by_name_and_only_below_the_process_given():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        name = os.path.basename(sys.executable)
        assert child.pid in cpus.processes(name, under=os.getpid())
        assert child.pid not in cpus.processes(name, under=child.pid)  # not below itself
        assert os.getpid() not in cpus.processes(name, under=os.getpid())
    finally:
        child.communicate(b"")


def test_what_a_moved_process_starts_runs_on_the_new_cpus_too():
    """As HAProxy's manager starts a new haproxy on each reload: a starter on one CPU keeps
    starting programs; once moved with them, none of them is left on the one CPU, nor is a
    child of the starter by another name (as a child forked but not yet the program is)."""
    import subprocess
    import sys
    import time

    machine = cpus.allowed()
    if len(machine) < 2:
        pytest.skip("needs two CPUs")
    starter = "mmserve-test-starter"
    code = ("import subprocess, time\n"
            "other = subprocess.Popen(['mmserve-test-child', '60'], executable='sleep')\n"
            "started = []\n"
            "while True:\n"
            "    started.append(subprocess.Popen(['sleep', '30']))\n"
            "    if len(started) > 4:\n"
            "        started.pop(0).kill()\n"
            "    time.sleep(0.02)\n")
    with cpus.confined({max(machine)}):
        proc = subprocess.Popen([starter, "-c", code], executable=sys.executable)
    try:
        def started() -> list[int]:
            return cpus.processes("sleep", under=proc.pid)

        deadline = time.monotonic() + 30
        while not started():
            assert time.monotonic() < deadline, "the starter started nothing"
            time.sleep(0.01)
        cpus.move_with_what_it_starts(starter, "sleep", machine, under=os.getpid())
        assert os.sched_getaffinity(proc.pid) == machine
        others = cpus.processes("mmserve-test-child", under=proc.pid)
        assert others and all(os.sched_getaffinity(pid) == machine for pid in others)
        before = set(started())
        for pid in before:
            assert os.sched_getaffinity(pid) == machine
        while not set(started()) - before:  # one started after the move
            assert time.monotonic() < deadline, "the starter started nothing more"
            time.sleep(0.01)
        for pid in started():
            assert os.sched_getaffinity(pid) == machine
    finally:
        below = cpus.processes(under=proc.pid)
        proc.kill()
        proc.wait()
        for pid in below:  # its sleeps, left to no one
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
