"""Scaling: the trainer on 1, 2 and 4 CPU ranks (gloo), as one node and as two simulated nodes of 2, started by the
deepspeed launcher as users start it; samples/s/GPU with data, and the time per step in the collectives.

Configurations: 1 rank (``--num_gpus 1``, the baseline), 2 and 4 ranks on one node (``--num_gpus R``), and 4 ranks
as two nodes of 2: two launchers started together, each ``deepspeed --hostfile H --no_ssh --node_rank N`` (H:
``node0 slots=2``, ``node1 slots=2``), meeting at 127.0.0.1 as a cluster's nodes meet at the master. Full mode runs
all four, 64 samples per rank, 30 timed steps; quick mode (CI) only 2 ranks on one node, 16 per rank, 1 timed step,
to check that the launch and the profile work (its figures are not kept, so no 1-rank baseline is run).

Each run is fastclip/train.py's ``main`` under benchmarks/profile_worker.py: S steps as train.py takes them, whose
last log line (the second half of the S) gives samples/s/GPU, then P more steps under the CPU profiler. Recorded
per multi-rank configuration as fastclip = R ranks, baseline = 1 rank: the ratio is the per-rank efficiency (1.0 =
going distributed costs nothing; R x ratio is the aggregate speed-up). Here the ranks share the machine's cores (2
on the CI machine) and each rank's torch uses all of them (the launcher sets no thread limit): R ranks split what
one rank had, so a ratio near 1/R is the contention alone (aggregate 1x), above it where one rank left cores idle,
below it what oversubscription and the collectives cost. None of it is what ranks on their own GPUs would see.

``extra`` holds, as means over ranks of the profiled steps, the ms per step in the loss's all-gathers (forward
gathers and, on gloo, their backward all-reduce), in DeepSpeed's reductions (ZeRO-2's gradient all-reduce and the
grad norm's) and in ZeRO-2's all-gather of the updated partitions, each with its share of the profiled step's wall
time, the slowest rank's figure, and each event name's calls and ms per step. A collective's time runs from the op
being queued to its completion (the backend's ``gloo:*`` event), so it includes the wait for the slowest rank: on
shared cores much of it is that wait, not the transfer. The simulated nodes talk over loopback like the one-node
ranks, so the two-node case tests the launch and the rank layout, not a network. The loss's memory against N is in
the loss suite (linear for fastclip, quadratic for open_clip).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fastclip.world import free_port

from bench_data import _shards
from harness import Result, bench_once, wait_or_kill

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "profile_worker.py"
# steps: S timed steps (the log line of the second half); profile: P more under the profiler (P <= S/2, so that
# no log line falls among them); batch: per rank
SPECS = {"full": dict(steps=30, profile=5, batch=64), "quick": dict(steps=1, profile=1, batch=16)}
# name: (ranks, nodes)
CONFIGS = {"1 rank": (1, 1), "2 ranks": (2, 1), "4 ranks": (4, 1), "2 nodes x 2": (4, 2)}
QUICK = ("1 rank", "2 ranks")  # two launchers as nodes: tests/test_multinode.py, and the full run
COMMS = ("loss_allgather_ms", "deepspeed_reduce_ms", "deepspeed_allgather_ms")


def _env() -> dict:
    """This environment without a launcher's rank variables, so that each launcher starts its own world."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launchers(ranks: int, nodes: int, port: int, out: Path) -> list[list[str]]:
    """One launcher command per node: ``--num_gpus`` for one node, ``--no_ssh --node_rank`` per simulated node."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    if nodes == 1:
        return [[deepspeed, "--num_gpus", str(ranks), "--master_port", str(port), str(WORKER)]]
    hostfile = out / "hostfile"
    hostfile.write_text("".join(f"node{n} slots={ranks // nodes}\n" for n in range(nodes)))
    return [[deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1",
             "--master_port", str(port), str(WORKER)] for n in range(nodes)]  # fmt: skip


def _run(name: str, root: Path, out: Path, spec: dict) -> dict:
    """One configuration's run: samples/s/GPU of the second half of its timed steps, and every rank's profile."""
    (ranks, nodes), port = CONFIGS[name], free_port()  # a fixed one collides with another run on the machine
    steps, profiled = spec["steps"], spec["profile"]
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "--profile-after", str(steps), "--profile-steps", str(profiled), "--profile-out", str(out / "profile"),
        "--data.train_shards", str(root / "train" / "*.tar"), "--data.val_shards", "null",
        "--data.batch_size", str(spec["batch"]), "--data.shuffle_buffer", "256", "--train.steps", str(steps + profiled),
        "--train.precision", "bf16",
        "--log.every", str(max(steps // 2, profiled)), "--log.progress", "false", "--log.dir", str(out),
        "--checkpoint.dir", str(out / "ckpt"), "--checkpoint.export_open_clip", "false",
    ]  # fmt: skip
    procs, logs = [], []
    for n, cmd in enumerate(_launchers(ranks, nodes, port, out)):  # every node's launcher at once, as on a cluster
        logs.append(out / f"node{n}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd + args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT))
    wait_or_kill(procs, timeout=900)
    if any(proc.returncode != 0 for proc in procs):
        tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-2000:]}" for log in logs)
        raise RuntimeError(f"{name} run failed (exit {[p.returncode for p in procs]}):\n{tails}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    [timed] = [r for r in records if r.get("step") == steps and "samples_per_second_per_gpu" in r]
    profiles = [json.loads((out / "profile" / f"rank-{r}.json").read_text()) for r in range(ranks)]
    return {"per_gpu": timed["samples_per_second_per_gpu"], "step_ms": timed["batch_time"] * 1e3,
            "profiles": profiles}  # fmt: skip


def _comms(run: dict) -> dict:
    """Means over ranks of ms per profiled step in each kind of collective, with shares of the profiled step."""
    profiles = run["profiles"]
    step_ms = statistics.mean(p["step_ms"] for p in profiles)
    out = {"step_ms": run["step_ms"], "profiled_step_ms": step_ms, "profiled_steps": profiles[0]["steps"]}
    for key in COMMS:
        ms = statistics.mean(p[key] for p in profiles)
        out[key] = ms
        out[key.replace("_ms", "_share")] = ms / step_ms
        out[key.replace("_ms", "_ms_max_rank")] = max(p[key] for p in profiles)
    names = sorted({event for p in profiles for event in p["events"]})  # 'gloo:all_reduce (loss_allgather)'
    out["events"] = {
        event: {
            figure: statistics.mean(p["events"].get(event, {}).get(figure, 0.0) for p in profiles)
            for figure in ("calls_per_step", "ms_per_step")
        }
        for event in names
    }
    return out


@pytest.fixture(scope="module")
def mode(quick) -> str:
    return "quick" if quick else "full"


@pytest.fixture(scope="module")
def one_rank(mode, tmp_path_factory) -> dict:
    """The baseline: samples/s/GPU of one rank, in the same launcher and worker as the others."""
    return _run("1 rank", _shards(mode), tmp_path_factory.mktemp("one-rank"), SPECS[mode])


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "1 rank"])
def test_rank_scaling_cpu(benchmark, record, mode, name, tmp_path, request):
    if mode == "quick" and name not in QUICK:
        pytest.skip(f"{name}: full mode only (quick mode keeps CI short)")
    # after the skip: a skipped case does not start the baseline; quick mode keeps no figures, so it starts none
    one_rank = request.getfixturevalue("one_rank") if mode == "full" else {"per_gpu": None, "step_ms": None}
    ranks, nodes = CONFIGS[name]
    spec = SPECS[mode]
    run = bench_once(benchmark, lambda: _run(name, _shards(mode), tmp_path, spec))
    comms = _comms(run)
    assert all(comms[key] > 0 for key in COMMS), comms  # every kind of collective was found by name
    ours, base, cores = run["per_gpu"], one_rank["per_gpu"], os.cpu_count()
    params = {"model": "fastclip-tiny", "batch_per_rank": spec["batch"], "ranks": ranks, "nodes": nodes,
              "cores": cores, "device": "cpu"}  # fmt: skip
    share = {key: comms[key.replace("_ms", "_share")] for key in COMMS}
    aggregate = ranks * ours / base if base else None
    note = (
        f"{ranks} ranks share the {cores} CPU cores; ratio = per-rank efficiency, aggregate "
        f"{aggregate or float('nan'):.2f}x; per step {comms['profiled_step_ms']:.0f} ms under the profiler: "
        "loss all-gather "
        f"{comms['loss_allgather_ms']:.1f} ms ({share['loss_allgather_ms']:.0%}), DeepSpeed reduce "
        f"{comms['deepspeed_reduce_ms']:.1f} ms ({share['deepspeed_reduce_ms']:.0%}), ZeRO all-gather "
        f"{comms['deepspeed_allgather_ms']:.1f} ms ({share['deepspeed_allgather_ms']:.0%})"
    )
    record(Result("scaling", f"samples/s/GPU at {name} vs 1 rank", params, "samples_per_second", ours, base,
                  extra={f"aggregate_{ranks}_over_1": aggregate, "one_rank_step_ms": one_rank["step_ms"],
                         **comms},
                  note=note))  # fmt: skip
