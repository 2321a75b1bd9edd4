"""Helpers to run the trainer as users do (subprocesses, the deepspeed launcher) on the ``world_dir`` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastclip.data.build import dali_available

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fastclip" / "train.py"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' harness: one wait-or-kill for both suites
from harness import wait_or_kill  # noqa: E402

# the GPU machines' image has no DALI unless benchmarks/gpu_dali.sh brought it; this machine and CI have it
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="needs nvidia-dali (benchmarks/gpu_dali.sh on a GPU)")


def run_cli(
    args: list[str], *, cwd: Path, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def clean_env(extra: dict | None = None) -> dict:
    """This environment without a launcher's rank variables, so a child starts its own world."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def shm_buffers(port: int | str = "*") -> list[str]:
    """The /dev/shm files DeepSpeed's CPU all-reduce made for runs on ``port`` that are still there (66 MiB a rank,
    in memory: left by each run on a new port, they once filled this machine's memory and CI's run was killed)."""
    from fastclip.world import SHM_BUFFER_PREFIX

    return sorted(p.name for p in Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*_{port}_*"))


def two_steps(trainer):
    """Two optimizer steps on the trainer's first two batches, cycled: the first step allocates the optimizer's
    state, the second is a steady one. Returns the cycle, for more steps on the same batches."""
    import itertools

    loaded = iter(trainer.train_loader)
    batches = itertools.cycle([next(loaded), next(loaded)])
    for _ in range(2):
        trainer.train_step(batches)
    return batches


def deepspeed_cmd(num_ranks: int, port: int) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher),
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(port),
        str(TRAIN),
    ]


def torchrun_cmd(num_ranks: int, port: int, script: Path) -> list[str]:
    """``script`` on ``num_ranks`` ranks by torchrun: 4 s less start-up than the deepspeed launcher (one Python
    process importing torch, not two importing DeepSpeed too), for tests that do not test the launcher itself. Its
    exit status on a failed rank is 1 whatever the rank's; the script's own options must not abbreviate one of
    torchrun's (its parser rejects ``--log`` as ambiguous even after the script)."""
    launcher = Path(sys.executable).parent / "torchrun"
    return [str(launcher), "--nproc-per-node", str(num_ranks), "--master-addr", "127.0.0.1", "--master-port",
            str(port), str(script)]  # fmt: skip


def small_run_args(world: Path, out: Path, *, steps: int, batch: int = 16) -> list[str]:
    """Overrides for a fast run on the ``world_dir`` fixture, with tiny images."""
    return [
        "--data.train_shards", str(world / "train" / "*.tar"),
        "--data.val_shards", str(world / "val" / "*.tar"),
        "--data.zeroshot_classnames", str(world / "classnames.json"),
        "--data.zeroshot_templates", str(world / "templates.json"),
        "--data.batch_size", str(batch),
        "--data.shuffle_buffer", "64",
        "--model.force_image_size", "32",
        # the default: bf16 on a GPU or an AVX-512 CPU, fp32 where torch emulates bf16 (26x slower matmuls on this
        # AVX2 machine); the bf16 paths have their own tests (accumulation, compile, precision, param layout)
        "--train.precision", "auto",
        "--train.steps", str(steps),
        "--optim.warmup_steps", "2",
        "--log.every", "1",
        "--log.progress", "false",
        "--log.dir", str(out),
        "--checkpoint.dir", str(out / "checkpoints"),
    ]  # fmt: skip


def node_launch(
    kind: str,
    node: int,
    *,
    nodes: int,
    per_node: int,
    port: int,
    args: list[str],
    tmp: Path,
    script: Path | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """One simulated node of a multi-node run on this machine: its own launcher process, as each node of a cluster
    starts one (``kind``: 'deepspeed' with --no_ssh and a hostfile, or 'torchrun' with a static rendezvous)."""
    script = script or TRAIN
    bin_dir = Path(sys.executable).parent
    if kind == "deepspeed":
        hostfile = tmp / "hostfile"
        hostfile.write_text("".join(f"node{n} slots={per_node}\n" for n in range(nodes)))
        cmd = [str(bin_dir / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]  # fmt: skip
    else:
        cmd = [str(bin_dir / "torchrun"), "--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--node-rank",
               str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "--rdzv-conf", "timeout=120",
               str(script)]  # fmt: skip
    path = tmp / f"{kind}-node{node}-{port}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen(cmd + args, cwd=ROOT, env=clean_env(env), stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = path
    return proc


def rank_pids(rank: int, log_dir: Path, *, workers: bool = False) -> list[int]:
    """The trainer process holding RANK=rank of the run logging to ``log_dir`` first (an empty list when there is
    none), then, with ``workers``, its loader workers (forked later: they inherit the variable and the command line).
    The run's own folder tells its processes from another run's on this machine (a second suite, a parallel worker),
    which a signal meant for this one must not reach."""
    found, folder = [], b"\0" + str(log_dir).encode() + b"\0"
    for pid in os.listdir("/proc"):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = b"\0" + Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        launcher = b"deepspeed.launcher" in cmd
        if f"RANK={rank}".encode() in env and folder in cmd and b"fastclip/train.py" in cmd and not launcher:
            found.append(int(pid))
    found.sort()
    return found if workers else found[:1]


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for every launcher (killing all if one outlives ``timeout``); each one's output."""
    wait_or_kill(procs, timeout)
    return [Path(proc.log_path).read_text() for proc in procs]
