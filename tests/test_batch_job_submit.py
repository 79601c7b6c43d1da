"""``ray job submit`` of jobs/generate.py, with an autoscaling engine pool (min 1, max 2), to a
``ray start --head`` cluster on 127.0.0.1, token auth on.

The cluster is separate from the test session's Ray: its own ports and temp dir, started with ``--block``
so terminating that one process stops exactly the cluster this test started. Token auth is enabled the way
Ray documents it: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH for the cluster and for the submitting CLI.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neox_ray.batch.sink import read_output

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_ray_job_submit_runs_generate_job(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ray_cli = Path(sys.executable).parent / "ray"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(24)]}), tmp_path / "in.parquet")
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="nrjob", dir="/tmp")  # short: Unix socket paths are length-limited
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
         f"--object-manager-port={object_manager}", "--num-cpus=3", "--num-gpus=0", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the dashboard answers once the cluster is up
            probe = subprocess.run([str(ray_cli), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
        else:
            pytest.fail(f"the head's dashboard never answered: {probe.stderr[-2000:]}")
        submit = subprocess.run(
            [str(ray_cli), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
             sys.executable, "jobs/generate.py", "--config", "configs/generate-cpu-demo.yaml",
             "--model", str(tiny_checkpoint), "--input", str(tmp_path / "in.parquet"),
             "--output", str(tmp_path / "out"), "--max-tokens", "4", "--min-replicas", "1", "--max-replicas", "2",
             "--max-model-len", "256", "--progress-interval", "1"],
            env=env, capture_output=True, text=True, timeout=300)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "generate job complete: 24 rows" in submit.stdout + submit.stderr
        assert "| engines " in submit.stdout + submit.stderr  # the autoscaling pool's size in the progress line
        ids = read_output(str(tmp_path / "out"), columns=["id"]).column("id").to_pylist()
        assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(24))
        assert (tmp_path / "out" / "_SUCCESS").exists()
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started, and only those
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
