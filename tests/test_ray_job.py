"""``ray job submit`` of a job from ``jobs/`` against a real ``ray start --head`` on 127.0.0.1.

The head runs with token authentication (the token passed in the environment, as a job
runner would from a secret); the job uploads this repository as its working dir with
``jobs/runtime_env.yaml`` and runs the embedding job on local files with the tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import processes_of

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str, timeout: float = 60) -> None:
    """Kill the head started with ``--temp-dir temp_dir`` and everything it started. Not
    `ray stop`, which stops every Ray of this user on the machine (another test session's,
    a benchmark's)."""
    deadline = time.monotonic() + timeout
    while (pids := processes_of(temp_dir.encode())) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started with ``ray start``; yields (dashboard address, client env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = free_port()
    node_env = env | {"PIPELINE_JOB_SECRET": "s3cr3t-from-the-node"}
    # Its own temp dir (short: Ray's socket paths must fit 107 bytes) names its processes.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    try:
        subprocess.run(RAY + ["start", "--head", "--port", str(free_port()), "--num-cpus", "4",
                              "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                              "--dashboard-port", str(dashboard), "--disable-usage-stats",
                              "--temp-dir", temp_dir,
                              # Not the default agent port, which another Ray on this machine
                              # may hold (the job agent then never registers).
                              "--dashboard-agent-listen-port", str(free_port())],
                       env=node_env, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, *argv: str, runtime_env: list[str]) -> subprocess.CompletedProcess:
    for _ in range(10):
        proc = subprocess.run(RAY + ["job", "submit", "--address", address, *runtime_env, "--",
                                     *argv], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=420)
        # A loaded machine can start the head's job agent after the dashboard answers.
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            return proc
        time.sleep(2)
    return proc


def test_runtime_env_passes_credentials_by_reference_only():
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"], "the credentials' references are the point of the file"
    for name, value in runtime_env["env_vars"].items():
        assert re.fullmatch(r"\$\{[A-Z0-9_]+\}", value), f"{name} is set inline: {value!r}"
    assert "models/" in runtime_env["excludes"]  # weights never travel with the working dir


@pytest.mark.ray
def test_ray_job_submit_runs_the_embedding_job(ray_head, tmp_path, tiny_model_dir):
    address, env = ray_head
    (tmp_path / "in").mkdir()
    rows = [{"id": i, "text": f"document number {i}", "lang": "en"} for i in range(40)]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # jobs/runtime_env.yaml, plus a variable set from a ${reference} to the node's own
    # environment, as the file passes credentials: the output folder ends in its value (the
    # CLI quotes each argument, so sh expands it).
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"] |= {"MY_SECRET": "${PIPELINE_JOB_SECRET}"}
    proc = submit(address, env, "sh", "-c",
                  f"python jobs/embed.py --input {tmp_path / 'in'} --output {tmp_path}/out-$MY_SECRET"
                  f" --model {tiny_model_dir} --dims 64,32 --keep-columns lang --progress off",
                  runtime_env=["--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env)])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    out = tmp_path / "out-s3cr3t-from-the-node"  # the node's value, not the submitter's
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_embedded"] == 40 and summary["reconciled"]
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert sorted(table["id"].to_pylist()) == list(range(40))
    assert table.column_names == ["id", "lang", "embedding_64", "embedding_32"]


def test_a_failed_run_is_the_entrypoints_exit_status(tmp_path, tiny_model_dir):
    """A job's status is its entrypoint's exit status (Ray's rule): a setup mistake must make
    the entrypoint exit non-zero, naming it. (Before Ray starts: no Ray needed.)"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "jobs/embed.py", "--input", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"input {tmp_path / 'nope'} does not exist" in proc.stderr


@pytest.mark.parametrize("script,command,own_option", [
    ("jobs/embed.py", "run", "--on-duplicate"),
    ("jobs/nightly_reembed.py", "nightly", "--keep-snapshots"),
    ("jobs/enrich.py", "enrich", "--iceberg-warehouse"),
])
def test_each_entrypoint_runs_its_command(script, command, own_option):
    """The submit mechanics (working dir, runtime env, joining the job's cluster) are the same
    for every entrypoint and run above; each script hands its arguments to its own command."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"pipeline {command}" in proc.stdout and own_option in proc.stdout
