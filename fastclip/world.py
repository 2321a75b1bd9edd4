"""How this process joins the run: the launcher's variables, a rendezvous that checks the world before any model
exists, the process group, and the layout the start-up banner prints.

Launchers: ``deepspeed`` (one node, ``--hostfile`` over pdsh/ssh, or ``--no_ssh --node_rank R`` per node),
``torchrun --nnodes N --node_rank R`` (or a c10d rendezvous), SLURM's ``srun`` without a launcher (the SLURM_*
variables are mapped to torch's here: :func:`slurm_environment`), or plain ``python`` (a world of one).

The rendezvous is fastclip's own, on torch's TCPStore, rather than ``init_process_group``'s: torch's waits its
whole timeout and then says only that some clients did not come. Here every rank posts who it is (host, node,
local rank, device, its run config and versions) and waits ``dist.join_timeout_s`` for the others; then it names
the ranks that never came (a host of the hostfile that is down, a node whose launcher was not started), the
settings on which ranks disagree, and two processes that claim one rank. The process group is then built on the
same store, and DeepSpeed adopts it.

Why one module: the launcher variables it reads, what each rank posts, the verdict and the process group built on
the same store are one protocol, and a change to one side must be read with the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastclip.config import DistConfig
from fastclip.config_tree import differences
from fastclip.console import say
from fastclip.errors import ConfigError

# the node index each launcher gives its ranks: torchrun, deepspeed's launch.py, SLURM
NODE_VARS = ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID")


class RendezvousError(ConfigError):
    """The world cannot form. ``speaker``: this rank says it (each rank knows only whether it reached the store;
    who is missing, the lowest rank that came says)."""

    def __init__(self, message: str, *, speaker: bool):
        super().__init__(message)
        self.speaker = speaker


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    members: tuple[dict, ...] = field(default=(), compare=False, repr=False)  # every rank's join record
    store: Any = field(default=None, compare=False, repr=False)  # the rendezvous store (fastclip's keys)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """The ranks on this rank's node (by the join records; 1 before the world is known)."""
        if not self.members:
            return 1
        node = self.members[self.rank]["node"] if self.rank < len(self.members) else None
        return max(1, sum(1 for m in self.members if m["node"] == node))

    @property
    def cpu_sharers(self) -> int:
        """The ranks of this rank's node that may run on exactly its CPUs (itself included): all of them unless the
        launcher bound each rank to cores of its own (srun --cpu-bind, deepspeed --bind_cores_to_rank)."""
        if not self.members or self.rank >= len(self.members):
            return 1
        me = self.members[self.rank]
        return max(1, sum(1 for m in self.members if m["node"] == me["node"] and m.get("cpus") == me.get("cpus")))

    def describe(self, rank: int) -> str:
        """'rank 3 (node 1, host gpu-07, local rank 1)', from its join record."""
        m = self.members[rank] if rank < len(self.members) else {}
        return (
            f"rank {rank} (node {m.get('node', '?')}, host {m.get('host', '?')}, local rank {m.get('local_rank', '?')})"
        )

    def layout(self) -> str:
        """'4 ranks on 2 nodes x 2 (node 0 gpu-01: ranks 0-1; node 1 gpu-02: ranks 2-3), local ranks 0-1, devices
        cuda:0, cuda:1'."""
        if self.world_size == 1 or not self.members:
            return f"{self.world_size} rank(s), {self.device}"
        nodes: dict[str, list[dict]] = {}
        for m in self.members:
            nodes.setdefault(str(m["node"]), []).append(m)
        sizes = sorted({len(ms) for ms in nodes.values()})
        per = f"x {sizes[0]}" if len(sizes) == 1 else f"of {'/'.join(map(str, sizes))} ranks (uneven)"
        where = "; ".join(
            f"{'' if n == ms[0]['host'] else f'node {n} '}{ms[0]['host']}: ranks {_span([m['rank'] for m in ms])}"
            for n, ms in nodes.items()
        )
        devices = sorted({m["device"] for m in self.members})
        local = _span(sorted({m["local_rank"] for m in self.members}))
        return (
            f"{self.world_size} ranks on {len(nodes)} node(s) {per} ({where}), local ranks {local}, devices "
            f"{', '.join(devices)}"
        )


def _span(numbers: list[int]) -> str:
    """Runs of consecutive numbers: '0-3, 5, 7-999'."""
    numbers, runs = sorted(numbers), []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


# ------------------------------------------------------------------------------------------------- SLURM


def expand_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list ('gpu[001-003,007],login1') as host names, in order."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", text):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                tail = expand_nodelist(suffix) if "[" in suffix else [suffix]
                hosts += [f"{prefix}{n:0{len(lo)}d}{t}" for t in tail]
    return hosts


def slurm_environment(env: dict[str, str]) -> dict[str, str]:
    """torch's launch variables for a task that ``srun`` started without a launcher ({} when a launcher set RANK,
    or outside an srun step: a batch script's own shell has SLURM_NTASKS but no SLURM_STEP_NUM_TASKS): rank, world
    size and local rank from SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID; the first host of the step's
    node list as MASTER_ADDR; a MASTER_PORT from the job and step ids (below the kernel's ephemeral ports), so
    every task picks the same one without talking (set MASTER_PORT to choose it)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise ConfigError("SLURM: no SLURM_STEP_NODELIST to find the first node; set MASTER_ADDR to rank 0's host")
    job, step = int(env.get("SLURM_JOB_ID", "0") or 0), int(env.get("SLURM_STEP_ID", "0") or 0)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + (job * 16 + step) % 12000),
    }


def slurm_alone(env: dict[str, str]) -> str | None:
    """Why a process that SLURM numbered as a task other than 0 runs as a one-rank job (None when it does not)."""
    if "RANK" in env or env.get("SLURM_PROCID", "0") == "0" or "SLURM_STEP_NUM_TASKS" in env:
        return None
    return (
        f"SLURM_PROCID={env['SLURM_PROCID']} but no srun step variables (SLURM_STEP_NUM_TASKS): this process is not "
        "a task of an srun step (a batch script's own shell), so it trains alone as a one-rank run. To train "
        "together, start one task per rank with srun."
    )


_launcher: str | None = None


def apply_launch_environment() -> str:
    """Fill torch's launch variables from SLURM's when ``srun`` started this process (once); the launcher's name."""
    global _launcher
    if _launcher is None:
        if mapped := slurm_environment(dict(os.environ)):
            os.environ.update(mapped)
            _launcher = "srun"
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            _launcher = "torchrun"
        elif "CROSS_RANK" in os.environ:
            _launcher = "deepspeed"
        else:
            _launcher = "python" if "RANK" not in os.environ else "a launcher"
    return _launcher


# ------------------------------------------------------------------------------------------- rendezvous


def _address_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "eaddrinuse" in text or "address already in use" in text


def free_port() -> int:
    """A TCP port nothing listens on now: the kernel's pick for a bind to port 0."""
    # the wildcard address, as the rendezvous store listens on it: a port taken on any interface is not free
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _node() -> str:
    return next((os.environ[v] for v in NODE_VARS if v in os.environ), socket.gethostname())


def cpu_set() -> list[int]:
    """The CPUs this process may run on: its affinity (a scheduler's cgroup, taskset, a launcher's binding)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _versions() -> dict[str, str]:
    import deepspeed

    import fastclip

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "fastclip": fastclip.__version__,
            "python": sys.version.split()[0]}  # fmt: skip


def _open_store(rank: int, world_size: int, join: float):
    """The TCPStore at MASTER_ADDR:MASTER_PORT: rank 0 hosts it, unless torchrun's agent already does."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if hosts:
        _raise_file_limit()
    try:
        return dist.TCPStore(addr, port, world_size if hosts else None, hosts, timedelta(seconds=join),
                             wait_for_workers=False)  # fmt: skip
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        if hosts and _address_in_use(e):
            raise RendezvousError(
                f"MASTER_PORT {port} is already in use (another job?): pick a free port, with --master_port for the "
                "deepspeed launcher or MASTER_PORT=<port> in the environment for torchrun, srun and python",
                speaker=True,
            ) from e
        raise RendezvousError(
            f"rank {rank} on {socket.gethostname()} could not reach the rendezvous at {addr}:{port} within "
            f"dist.join_timeout_s={join:g} s ({' '.join(str(e).split())[:160]}). Check that rank 0's node was "
            "started (every node's launcher with the same --master_addr/--master_port) and that this host can "
            f"reach {addr} on that port.",
            speaker=os.environ.get("LOCAL_RANK", "0") == "0",  # one line a node
        ) from e


def _raise_file_limit() -> None:
    """The store holds two connections a rank (its own and the watchdog's): 1,000 ranks pass a 1,024 soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def _store_key(name: str) -> str:
    # torchrun's agent keeps its store across worker restarts (and, with a node range, a scale-up restart keeps
    # the restart count): each attempt and world size its own keys
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"fastclip/{restart}/{os.environ.get('WORLD_SIZE', '1')}/{name}"


LAYOUT_KEYS = ("rank", "host", "node", "local_rank", "device", "cpus")


def _join(store, me: dict, world_size: int, join: float, launcher: str) -> list[dict]:
    """Post ``me``; rank 0 waits for every rank's record, judges the world and posts one verdict (the others read
    it alone: the store's traffic grows with the ranks, not their square). Every rank's layout, or an error."""
    rank = me["rank"]
    if store.add(_store_key(f"claim/{rank}"), 1) > 1:
        raise RendezvousError(
            f"two processes claim rank {rank} (this one on {me['host']}, node {me['node']}): give each node its own "
            "--node_rank (deepspeed, torchrun) and the same --nnodes on every node",
            speaker=True,
        )
    store.set(_store_key(f"join/{rank}"), json.dumps(me))
    if rank == 0:
        verdict = _judge(store, world_size, join, launcher)
        store.set(_store_key("verdict"), json.dumps(verdict))
    else:
        try:
            store.wait([_store_key("verdict")], timedelta(seconds=join + 60))
            verdict = json.loads(store.get(_store_key("verdict")))
        except (RuntimeError, OSError) as e:
            raise RendezvousError(
                f"rank {rank} on {me['host']} joined the rendezvous at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']}, but rank 0 never judged the world (its process or node is gone, or "
                "it was started with another WORLD_SIZE)",
                speaker=me["local_rank"] == 0,
            ) from e
    if verdict["error"]:
        _store_barrier(store, "verdict read", len(verdict["members"]), 10)  # rank 0 hosts the store: it waits
        raise RendezvousError(verdict["error"], speaker=rank == 0)
    return verdict["members"]


def _judge(store, world_size: int, join: float, launcher: str) -> dict:
    """Rank 0's verdict on the world: {'error': str or None, 'members': each joined rank's layout}."""
    keys = [_store_key(f"join/{r}") for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=join))
    except (RuntimeError, OSError):
        came = [r for r, key in enumerate(keys) if store.check([key])]
        missing = sorted(set(range(world_size)) - set(came))
        hint = " Under SLURM, start one task per rank with srun." if launcher == "srun" else ""
        error = (
            f"ranks {_span(missing)} of {world_size} did not join the rendezvous at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within dist.join_timeout_s={join:g} s (ranks {_span(came)} did). Check that "
            "every host of the hostfile is up and reachable (pdsh/ssh), that every node's launcher was started with "
            "the same --nnodes, --master_addr and --master_port, and that no node is still busy with a former "
            f"run.{hint}"
        )
        return {"error": error, "members": [{"rank": r} for r in came]}
    records = [json.loads(value) for value in store.multi_get(keys)]
    members = [{k: m[k] for k in LAYOUT_KEYS} for m in records]
    error = None
    if found := _disagreements(records):
        error = (
            f"the ranks disagree on the run (against rank 0 on {records[0]['host']}): {' | '.join(found[:4])}"
            f"{f' (and {len(found) - 4} more ranks)' if len(found) > 4 else ''}. Start every rank with the same "
            "command line, config files and software versions."
        )
    return {"error": error, "members": members}


def _disagreements(members: list[dict]) -> list[str]:
    """What each rank's run config, DeepSpeed file or versions say differently from rank 0's."""
    first, found = members[0], []
    for m in members[1:]:
        diffs = differences(first["config"], m["config"]) + differences(first["versions"], m["versions"])
        if first["deepspeed_file"] != m["deepspeed_file"]:
            diffs.append("the --deepspeed_config file's contents")
        if diffs:
            found.append(f"rank {m['rank']} (node {m['node']}, host {m['host']}): {'; '.join(diffs[:6])}")
    return found


def _store_barrier(store, name: str, world_size: int, seconds: float) -> None:
    """Wait (at most ``seconds``) until every rank has reached ``name``: rank 0, which hosts the store, must not
    leave before the others have read what they need from it."""
    import time

    key, deadline = _store_key(name), time.monotonic() + seconds
    try:
        store.add(key, 1)
        while store.add(key, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, OSError):
        pass  # rank 0 has left with the store: everyone had arrived


def from_rank0(world: World, name: str, text: str) -> str:
    """Rank 0's ``text`` on every rank, through the rendezvous store (before any collective, or where none is
    wanted): for what every rank must take alike though each could read it itself. Rank 0 waits until each rank
    has read it (it hosts the store). RendezvousError, from a rank whose store is gone."""
    if world.world_size == 1 or world.store is None:
        return text
    key = _store_key(name)
    try:
        if world.is_main:
            world.store.set(key, text)
        else:
            text = world.store.get(key).decode()
    except (RuntimeError, OSError) as e:
        raise RendezvousError(
            f"rank 0's {name} never came: its process or node is gone ({' '.join(str(e).split())[:120]})",
            speaker=True,
        ) from e
    _store_barrier(world.store, f"{name} read", world.world_size, 30)
    return text


def agree(world: World, name: str, said: str) -> str:
    """Rank 0's ``said`` (a refusal, or '' for none) on every rank: so that all ranks stop alike, before any
    collective, on what rank 0 alone can judge; a rank that finds the store gone says so instead of a traceback."""
    try:
        return from_rank0(world, f"verdict on {name}", said)
    except RendezvousError as e:
        return str(e)


def join_world(
    config: dict | None = None, dist_cfg: DistConfig | None = None, *, deepspeed_file: str | None = None
) -> World:
    """Join the world the launcher describes, or run as one rank; check it; build the process group on the
    rendezvous store; let DeepSpeed adopt it. ``config``: this rank's run config (every rank's must agree)."""
    import deepspeed

    dist_cfg = dist_cfg or DistConfig()
    launcher = apply_launch_environment()
    if "RANK" not in os.environ:  # plain python: a world of one, no MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # a port from the pid collided with running jobs
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    # one GPU visible to each task (srun --gpus-per-task, --gpu-bind): it is device 0 whatever the local rank
    device = torch.device("cuda", local_rank if torch.cuda.device_count() > 1 else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = _open_store(rank, world_size, dist_cfg.join_timeout_s)
    digest = None
    if deepspeed_file:
        import hashlib

        digest = hashlib.sha1(Path(deepspeed_file).read_bytes()).hexdigest()
    me = {"rank": rank, "host": socket.gethostname(), "node": _node(), "local_rank": local_rank, "device": str(device),
          "cpus": cpu_set(), "config": config or {}, "versions": _versions(), "deepspeed_file": digest}  # fmt: skip
    members = _join(store, me, world_size, dist_cfg.join_timeout_s, launcher)
    kwargs = {"device_id": device} if cuda else {}
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=dist.PrefixStore(_store_key("pg"), store), rank=rank,
        world_size=world_size, timeout=timedelta(seconds=dist_cfg.timeout_s), **kwargs,
    )  # fmt: skip
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=dist_cfg.timeout_s))
    if not cuda:
        _unname_shm_buffer(rank)
    if launcher == "torchrun" and len({m["node"] for m in members}) > 1:
        say(TORCHRUN_WAITS)
    return World(rank, world_size, local_rank, device, members=tuple(members), store=store)


def _unname_shm_buffer(rank: int) -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer (its shm op: one 66 MiB file per rank in
    /dev/shm, named by MASTER_ADDR and MASTER_PORT), which DeepSpeed never unlinks. Memory-backed, these files
    outlive the run: every run on a new port left 66 MiB a rank, until a test suite's free ports filled a 24 GiB
    machine and the kernel killed it. Each rank maps every peer's file before ``init_distributed`` returns, so
    after one barrier the names can go; the mappings stay for as long as the processes live."""
    dist.barrier()
    name = f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)  # absent where the op is not built or not all ranks are local


SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"  # deepspeed/ops/csrc/cpu/comm/shm.cpp's SHM_BUFFER_NAME

# torchrun's own rendezvous runs before any rank starts: a node whose torchrun never came is waited for there (its
# default: 600 s, then a 40-line DistStoreError), where fastclip's dist.join_timeout_s cannot reach
TORCHRUN_WAITS = (
    "torchrun: a node that never starts is waited for by torchrun itself, before fastclip runs; bound that wait with "
    "torchrun --rdzv-conf timeout=SECONDS (or join_timeout=SECONDS with --rdzv-backend c10d)"
)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
