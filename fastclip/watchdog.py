"""What ends a run whose rank died, instead of leaving the others waiting in a collective.

A rank killed (SIGKILL, the out-of-memory killer) or on a node that is lost says nothing: its peers would wait in
their next all-gather until the process-group timeout (30 minutes by default) and a cluster would bill that
time. Each rank's :class:`Watchdog` thread beats on the rendezvous store every ``dist.heartbeat_s`` (its step with
each beat) and reads the others' beats; a rank whose beat has not moved for ``dist.lost_after_s`` is lost. A rank
that stops on an error of its own posts it first (:meth:`Watchdog.post_failure`), and the others read it at their
next beat. Either way every rank prints one line naming the rank, its node and step, and this rank's step, and
exits with status 1 (``os._exit``: a thread stuck in a collective cannot be joined). The newest checkpoint is
untouched (``latest`` moves only after every rank has saved): ``--checkpoint.resume latest`` continues.

Bounds: a rank's own error reaches the others within ``dist.heartbeat_s``; a silent death within
``dist.lost_after_s + dist.heartbeat_s``; a rank alive but stuck (a hung device) within ``dist.timeout_s``, the
collective timeout. The beats come from a thread: a main thread busy in a long eval, checkpoint or data wait
keeps beating. Until a rank has built its trainer its beats say 'start-up', and its silence is allowed
``dist.join_timeout_s`` instead: on a loaded node or a slow shared filesystem a healthy rank's start-up (imports,
model and pipeline builds, DeepSpeed's op builds) can starve its process of the CPU for a minute, and a healthy run
killed is a run lost. (No start-up call holds the GIL for long: at most 0.4 s in a ViT-B/32 start-up with either
loader, measured with a 50 ms ticking thread.)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from fastclip.config import DistConfig
from fastclip.world import World, _store_key

EXIT_CODE = 1


class Watchdog:
    def __init__(
        self, world: World, cfg: DistConfig, *, step: Callable[[], int | None], latest: Callable[[], object]
    ):  # step: None during start-up; latest: the newest checkpoint, None when there is none
        self.world, self.cfg, self.step, self.latest = world, cfg, step, latest
        self.others = [r for r in range(world.world_size) if r != world.rank]
        self._stop = threading.Event()
        self._verdict = threading.Event()  # set when this thread has decided to end the process
        self._thread = threading.Thread(target=self._run, name="fastclip-watchdog", daemon=True)
        self._store = None

    def start(self) -> Watchdog:
        if self.others:
            import torch.distributed as dist

            # its own connection: the main thread's store calls (the process group's) never wait on this thread's
            self._store = dist.TCPStore(self.world.store.host, self.world.store.port, None, False,
                                        timedelta(seconds=self.cfg.lost_after_s))  # fmt: skip
            self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is done (or failing): stop beating, and mark it done so the watchers read no silence."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.cfg.heartbeat_s + 5)
        if self._store is not None:
            try:
                self._store.set(_store_key(f"done/{self.world.rank}"), "1")
            except Exception:  # noqa: BLE001 - the store is gone: nobody is left to read a silence
                pass

    def finish(self) -> None:
        """The run ended normally: stop, then wait (at most ``dist.lost_after_s``) until every rank has stopped,
        so that rank 0, which holds the store, does not take it away from a rank still beating."""
        self.stop()
        if self._store is None:
            return
        try:
            keys = [_store_key(f"done/{r}") for r in range(self.world.world_size)]
            self._store.wait(keys, timedelta(seconds=self.cfg.lost_after_s))
        except Exception:  # noqa: BLE001 - a rank gone after the run's end: its exit code says what happened
            pass

    # ------------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        # two watchers read every beat (rank 0, and the last rank, on another node as a rule); every rank reads
        # the one 'failed' key: store traffic grows with the ranks, not with their square
        watching = self.world.rank in (0, self.world.world_size - 1)
        seen = {r: None for r in self.others}
        since = {r: time.monotonic() for r in self.others}
        beats = 0
        while not self._stop.wait(self.cfg.heartbeat_s if beats else 0):
            beats += 1
            try:
                self._store.set(_store_key(f"beat/{self.world.rank}"), f"{beats} {self._step()}")
                if self._store.check([_store_key("failed")]):
                    self._end(self._store.get(_store_key("failed")).decode(), post=False)
                values = self._beats() if watching else {}
            except Exception as e:  # noqa: BLE001 - the store is gone with the process (or node) that held it
                if not self._stop.is_set():
                    self._end(self._store_lost(e), post=False)
                return
            now = time.monotonic()
            for r, value in values.items():
                if value != seen[r]:
                    seen[r], since[r] = value, now
            lost = [r for r in self.others if now - since[r] > self._allowed(seen[r])] if watching else []
            lost = [r for r in lost if not self._store.check([_store_key(f"done/{r}")])]  # ended its run normally
            if lost and not self._stop.is_set():
                self._end(self._lost(lost, seen, now - min(since[r] for r in lost)), post=True)

    def _step(self) -> str:
        step = self.step()
        return "start-up" if step is None else str(step)

    def _allowed(self, beat: bytes | None) -> float:
        """Seconds of silence after which a rank is lost: longer while it has not said it finished start-up."""
        starting = beat is None or beat.endswith(b"start-up")
        return max(self.cfg.lost_after_s, self.cfg.join_timeout_s) if starting else self.cfg.lost_after_s

    def _beats(self) -> dict[int, bytes]:
        """The others' newest beats ('count step'), for the ranks that have beaten yet."""
        keys = [_store_key(f"beat/{r}") for r in self.others]
        if self._store.check(keys):
            return dict(zip(self.others, self._store.multi_get(keys)))
        return {r: self._store.get(k) for r, k in zip(self.others, keys) if self._store.check([k])}

    def _lost(self, lost: list[int], seen: dict, silent: float) -> str:
        named = []
        for r in lost:
            step = seen[r].decode().split()[1] if seen[r] else "start-up"
            named.append(f"{self.world.describe(r)} at step {step}")
        bound = "dist.join_timeout_s" if any(self._allowed(seen[r]) > self.cfg.lost_after_s for r in lost) else (
            "dist.lost_after_s")  # fmt: skip
        return (
            f"{'; '.join(named)}: no heartbeat for {silent:.0f} s ({bound}={getattr(self.cfg, bound[5:]):g}): "
            "killed, out of memory, or its node lost"
        )

    def _store_lost(self, error: Exception) -> str:
        holder = "torchrun's agent on node 0" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else (
            self.world.describe(0))  # fmt: skip
        return (
            f"the rendezvous store at {self.world.store.host}:{self.world.store.port} stopped answering, and with it "
            f"{holder}, which holds it: killed, out of memory, or its node lost ({' '.join(str(error).split())[:120]})"
        )

    def _end(self, why: str, *, post: bool) -> None:
        """Say why on this rank, tell the others (when this rank found it), and exit the process now."""
        self._verdict.set()
        if post:
            self.post_failure(why)
        print(self.verdict_line(why), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODE)

    def verdict_line(self, why: str) -> str:
        latest = self.latest()  # from memory: a lost node's network filesystem may hang any read
        then = (
            f"The newest checkpoint ({latest}) is whole: continue with --checkpoint.resume latest."
            if latest
            else "No checkpoint was written yet: start the run again."
        )
        return f"fastclip (rank {self.world.rank}): stopping at step {self._step()}: {why}. {then}"

    # ------------------------------------------------------------------------------------ the main thread

    def post_failure(self, why: str) -> None:
        """Tell the other ranks why this one stops (the first rank to post is the one named)."""
        if self._store is None:
            return
        try:
            self._store.compare_set(_store_key("failed"), "", why)
        except Exception:  # noqa: BLE001 - the store is gone: the others find this rank silent instead
            pass

    def fail(self, why: str) -> None:
        """This rank stops on its own error: post it as the run's cause, and give the others a beat to read it
        before this process exits (its launcher then ends the node's other ranks, rank 0 with the store perhaps)."""
        self.post_failure(f"{self.world.describe(self.world.rank)} stopped at step {self._step()}: {why}")
        self._stop.set()
        if self._store is not None:  # a launcher kills a failed rank's node mates, rank 0 and its store among them
            time.sleep(min(self.cfg.heartbeat_s * 1.5, 10))

    def await_verdict(self) -> bool:
        """After a collective failed in the main thread (a peer's socket closed): wait the bound for this thread
        to name the cause and exit; False if it found none (the caller then reports the error itself)."""
        if not self._thread.is_alive():
            return False
        return self._verdict.wait(self.cfg.lost_after_s + 2 * self.cfg.heartbeat_s)
