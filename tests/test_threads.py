"""Our processes share the cores: the rule (cores // BIBO_JOBS), and the thread counts two
processes started side by side by make's export lanes read back from PyTorch, ONNX Runtime's
session and ExecuTorch's thread pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bibo_export import threads
from bibo_export.report import speed_conditions
from helpers import REPOSITORY_ROOT, make_dry_run, repository_mirror

pytestmark = pytest.mark.export


@pytest.mark.parametrize("cores, jobs, explicit, expected", [
    (2, None, None, 2),   # a lone process takes every core
    (2, "2", None, 1),    # two lanes on two cores: one thread each
    (16, "2", None, 8),
    (16, "3", None, 5),
    (2, "4", None, 1),    # never fewer than one
    (16, "2", "3", 3),    # BIBO_THREADS sets it outright
])
def test_the_share_follows_the_number_of_parallel_jobs(monkeypatch, cores, jobs, explicit,
                                                       expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    for name, value in ((threads.JOBS_VARIABLE, jobs), (threads.THREADS_VARIABLE, explicit)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert threads.thread_share() == expected


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_setting_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(threads.JOBS_VARIABLE, value)
    with pytest.raises(ValueError, match="BIBO_JOBS must be a positive integer"):
        threads.thread_share()


# Stands in for .venv/bin/bibo-export: starts ONNX Runtime and ExecuTorch the way our runtimes
# do (a session made with our options on a one-node graph; our runtime's pool set-up) and
# writes the thread counts each library then reports.
PROBE = """#!{python}
import json, os, sys, time
sys.path.insert(0, {root!r})
import onnx, onnxruntime as ort, torch
from onnx import TensorProto, helper
from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
from bibo_export.runtimes.executorch import share_threads
from bibo_export.runtimes.onnx import session_options
from bibo_export.threads import use_thread_share
use_thread_share()
value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), session_options(),
                               providers=["CPUExecutionProvider"])
share_threads()
argument = lambda flag: sys.argv[sys.argv.index(flag) + 1]
out = os.path.join(argument("--out"), argument("--precision"))  # one precision per lane
os.makedirs(out, exist_ok=True)
record = dict(jobs=os.environ.get("BIBO_JOBS"), torch=torch.get_num_threads(),
              onnxruntime=session.get_session_options().intra_op_num_threads,
              executorch=_threadpool_get_thread_count(), start=time.time())
time.sleep(1)  # so that the two lanes overlap, as exports do
record["end"] = time.time()
with open(os.path.join(out, "threads.json"), "w") as f:
    json.dump(record, f)
"""


def fake_export_environment(tmp_path: Path) -> Path:
    """A virtual environment whose bibo-export is the probe; its stamp and kernel library are
    up to date, so make goes straight to the export lanes."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    probe = venv / "bin" / "bibo-export"
    probe.write_text(PROBE.format(python=sys.executable, root=str(REPOSITORY_ROOT)))
    probe.chmod(0o755)
    (venv / ".stamp").touch()
    time.sleep(0.01)
    (tmp_path / "kernels.so").touch()  # newer than the stamp: nothing to build
    return venv


def test_make_export_lanes_give_each_process_its_share(tmp_path):
    """make export-executorch starts its two lanes side by side (EXPORT_JOBS=2): each lane's
    process holds half the cores in every library, read back from each library itself."""
    jobs = 2
    venv = fake_export_environment(tmp_path)
    mirror = repository_mirror(tmp_path)
    artifacts = tmp_path / "artifacts"
    env = {k: v for k, v in os.environ.items()
           if k not in (threads.JOBS_VARIABLE, threads.THREADS_VARIABLE, "MAKEFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "export-executorch", f"VENV={venv}",
         f"KERNELS={tmp_path / 'kernels.so'}", f"CKPT={tmp_path}", f"ARTIFACTS={artifacts}",
         f"EXPORT_JOBS={jobs}"], cwd=mirror, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lanes = [json.loads((artifacts / "executorch" / precision / "threads.json").read_text())
             for precision in ("fp32", "int8")]
    expected = max(1, threads.available_cores() // jobs)
    for lane in lanes:
        assert lane["jobs"] == str(jobs)
        assert (lane["torch"], lane["onnxruntime"], lane["executorch"]) == (expected,) * 3
    # The two lanes did run side by side.
    assert max(lane["start"] for lane in lanes) < min(lane["end"] for lane in lanes)


@pytest.mark.parametrize("target", ["export-executorch", "demo", "demo-text"])
def test_every_parallel_lane_of_make_says_how_many_run(tmp_path, target):
    """Wherever make starts EXPORT_JOBS lanes at once, it tells them so (BIBO_JOBS)."""
    result = make_dry_run(repository_mirror(tmp_path), target, "EXPORT_JOBS=3")
    lanes = [line for line in result.stdout.splitlines() if " -j3 " in line]
    assert lanes and all("BIBO_JOBS=3" in line for line in lanes), result.stdout[-2000:]


def test_the_report_says_when_its_timings_ran_beside_other_jobs():
    speed = {"threads": 1, "parallel_jobs": 2}
    assert speed_conditions(speed) == (" with 1 thread(s), beside 1 other bibo-export job(s) "
                                       "(BIBO_JOBS): slower than on an idle machine, so compare "
                                       "them only with each other")
    assert speed_conditions({"threads": 2, "parallel_jobs": 1}) == " with 2 thread(s)"
