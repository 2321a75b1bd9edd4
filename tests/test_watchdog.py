"""The watchdog's patience: a rank still starting up is allowed dist.join_timeout_s of silence (a loaded node can
starve a healthy rank's start-up), a rank that has trained only dist.lost_after_s."""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from fastclip.config import DistConfig
from fastclip.watchdog import Watchdog
from fastclip.world import World, _store_key

CFG = DistConfig(join_timeout_s=4, heartbeat_s=0.2, lost_after_s=1)


@pytest.fixture
def rank0(monkeypatch):
    """Rank 0's watchdog over a real store, its verdicts recorded instead of ending the process; rank 1's beats are
    the test's to post."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10))
    ended: list[tuple[float, str]] = []

    def end(self, why, *, post):
        ended.append((time.monotonic(), why))
        self._stop.set()

    monkeypatch.setattr(Watchdog, "_end", end)
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"),
                  store=SimpleNamespace(host="127.0.0.1", port=server.port))  # fmt: skip
    watchdogs = []

    def start(step_of_rank_1: str) -> float:
        server.set(_store_key("beat/1"), f"1 {step_of_rank_1}")  # then silent
        watchdogs.append(Watchdog(world, CFG, step=lambda: None, latest=lambda: None).start())
        return time.monotonic()

    yield SimpleNamespace(start=start, ended=ended)
    for w in watchdogs:
        w.stop()


def _wait(ended: list, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not ended and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_rank_silent_in_its_start_up_is_allowed_join_timeout_s(rank0):
    started = rank0.start("start-up")
    _wait(rank0.ended, 2.5)
    assert rank0.ended == []  # 2.5 s of silence: more than dist.lost_after_s, less than dist.join_timeout_s
    _wait(rank0.ended, 10)
    when, why = rank0.ended[0]
    assert CFG.join_timeout_s <= when - started < CFG.join_timeout_s + 3
    assert why.startswith("rank 1 (node ?, host ?, local rank ?) at step start-up: no heartbeat for ")
    assert "(dist.join_timeout_s=4): killed, out of memory, or its node lost" in why


def test_a_rank_silent_after_a_step_is_lost_after_lost_after_s(rank0):
    started = rank0.start("7")
    _wait(rank0.ended, 10)
    when, why = rank0.ended[0]
    assert CFG.lost_after_s <= when - started < CFG.join_timeout_s
    assert "rank 1 (node ?, host ?, local rank ?) at step 7: no heartbeat" in why and "(dist.lost_after_s=1)" in why


def test_the_verdict_names_a_checkpoint_only_when_one_exists():
    world = World(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    none_yet = Watchdog(world, CFG, step=lambda: None, latest=lambda: None)
    assert none_yet.verdict_line("rank 0 lost") == (
        "fastclip (rank 1): stopping at step start-up: rank 0 lost. No checkpoint was written yet: start the run again."
    )
    saved = Watchdog(world, CFG, step=lambda: 12, latest=lambda: "ckpt/step_00000010")
    assert saved.verdict_line("rank 0 lost").endswith(
        "at step 12: rank 0 lost. The newest checkpoint (ckpt/step_00000010) is whole: continue with "
        "--checkpoint.resume latest."
    )
