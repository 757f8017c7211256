"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start --address=...`, each a
separate process group, token-authenticated, with their own temp dir and ports (so nothing else on the machine
attaches to it, and it attaches to nothing else). The CLI runs with RAY_ADDRESS set, its two actors spread over
both nodes; the second node is killed mid-run; the run completes on the head node, every image recorded once,
the maps equal to a single-node run's."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.fault_tools import (
    _cmdline,
    actor_processes,
    cli,
    cli_env,
    committed_stats,
    kill_session,
    make_images,
    start,
    wait_for,
)

from .fault_tools import assert_exactly_once, assert_same_outputs

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(600)]
IMAGES = 80
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _node_command(*head_or_address: str) -> list[str]:
    """`ray start` for one node of 1 CPU, every port chosen here, blocking (its process is the node)."""
    ports = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        ports.append(f"{flag}={_free_port()}")
    return [RAY, "start", *head_or_address, "--node-ip-address=127.0.0.1", "--num-cpus=1",
            "--object-store-memory=200000000", "--disable-usage-stats", "--block", *ports]


@pytest.fixture
def cluster():
    """(address, second node's process, environment); every process torn down by its session afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="lrp-mn-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    processes = []
    try:
        processes.append(start(_node_command("--head", f"--port={port}", "--include-dashboard=false",
                                             f"--temp-dir={temp / 'ray'}"), env, temp / "head.log"))
        address = f"127.0.0.1:{port}"
        probe = [sys.executable, "-c", "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"]

        def alive_nodes() -> int:
            done = subprocess.run(probe, env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True,
                                  timeout=120)
            return int(done.stdout.strip() or 0) if done.returncode == 0 else 0

        wait_for(lambda: processes[0].poll() is None and "--block" in (temp / "head.log").read_text(), 120,
                 "the head node", poll_s=0.5)
        processes.append(start(_node_command(f"--address={address}"), env, temp / "worker.log"))
        wait_for(lambda: alive_nodes() == 2, 180, "two alive nodes", poll_s=2)
        yield address, processes[1], env
    finally:
        for process in reversed(processes):
            kill_session(process.pid)
        shutil.rmtree(temp, ignore_errors=True)
        default = Path("/tmp/ray/ray_current_cluster")  # where a plain ray.init() looks for a cluster to join
        if default.is_file() and default.read_text().strip().endswith(f":{port}"):
            default.unlink()


def _busy_actors(session: int) -> list[int]:
    return [pid for pid in actor_processes(session=session) if "explain_shard" in _cmdline(pid)]


def _commit_watcher(out: Path, pids: list[int]):
    """A check, to be polled, of whether the driver has received the result of a shard written by one of `pids`:
    that shard is committed and the same actor has begun another one (an actor holds one shard at a time, so it
    gets the next only once the driver has collected the last; a shard merely committed may still lose its
    result with the node). Shards are told by their temporary files, which carry the writer's pid."""
    seen: dict[int, set[Path]] = {pid: set() for pid in pids}

    def delivered() -> bool:
        for pid, shards in seen.items():
            for tmp in (out / "relevance").glob(f".tmp-{pid}-shard-*.h5"):
                shards.add(out / "stats" / tmp.name.split(f".tmp-{pid}-", 1)[1].replace(".h5", ".parquet"))
            if len(shards) >= 2 and any(path.exists() for path in shards):
                return True
        return False

    return delivered


def test_run_survives_a_worker_node_dying(cluster, tmp_path):
    address, second_node, env = cluster
    dataset = make_images(tmp_path / "images", IMAGES, broken=(11,))
    cache = tmp_path / "cache"
    reference = tmp_path / "single-node"
    single = start(cli(dataset, reference, cache, "--actors", "2"), cli_env(), tmp_path / "single.log")
    try:
        assert single.wait(300) == 1, (tmp_path / "single.log").read_text()[-3000:]
    finally:
        kill_session(single.pid)

    out = tmp_path / "cluster"
    driver = start(cli(dataset, out, cache, "--actors", "2"), {**env, "RAY_ADDRESS": address},
                   tmp_path / "cluster.log")
    try:
        # the second node's actor at work, a shard of its own committed and its result received (seen by its
        # temporary files, named after its pid; or, if they were too quick to see, six more shards committed):
        # then the node dies
        second_actors = wait_for(lambda: _busy_actors(second_node.pid), 300, "an actor at work on node 2")
        before = len(committed_stats(out))
        by_second = _commit_watcher(out, second_actors)
        wait_for(lambda: by_second() or len(committed_stats(out)) >= before + 6, 300,
                 "a shard committed on node 2", poll_s=0.005)
        delivered_by_second = by_second()  # else node 1 ran ahead (a loaded machine): node 2 has delivered nothing
        kill_session(second_node.pid)
        assert driver.wait(400) == 1, (tmp_path / "cluster.log").read_text()[-3000:]
    finally:
        kill_session(driver.pid)

    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").exists() and manifest["totals"] == {"images": IMAGES, "explained": IMAGES - 1,
                                                                  "failed": 1}
    workers = [entry["worker"] for entry in manifest["shards"]]
    if delivered_by_second:  # its delivered shard stays its own: the run used both nodes
        assert len({w["node"] for w in workers}) == 2, "the shards were not spread over both nodes"
        assert {w["pid"] for w in workers} & set(second_actors), "no shard was explained on the second node"
    assert manifest["retries"]["crashed"] >= 1
    assert len(committed_stats(out)) == IMAGES // 4
    assert_exactly_once(out, IMAGES)
    assert_same_outputs(out, reference)
