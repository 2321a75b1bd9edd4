"""What a cluster's stop signal does to a run: one checkpoint at one step every rank agrees on, then exit 75.

SLURM ends a job with SIGTERM at its time limit or on preemption (``#SBATCH --signal=USR1@120`` warns ahead),
Kubernetes with SIGTERM to the pod, a terminal with SIGINT. On the first of SIGTERM, SIGUSR1 or SIGINT a rank
finishes its step and the ranks stop together:

- The signal may reach the ranks at different steps, or only some of them. A signalled rank posts a stop step on
  the rendezvous store (the first post wins: ``compare_set``) and every rank reads the store after each step.
  The step posted is ``RUN_AHEAD + 2`` after the poster's. Why no rank has passed it when the post lands: every
  step reduces gradients across all ranks, so no device finishes step a + 2 before the poster's host has begun
  step a + 1, after its post; and no host runs more than ``RUN_AHEAD`` steps ahead of its own device (after each
  step it waits for the device to finish the step ``RUN_AHEAD`` back: on a GPU whose steps sync nothing the host
  would otherwise queue steps freely, and with NCCL's queued collectives a fast rank's host would read the store
  steps ahead of a slow one's). So a host past the posted step has a device past step a + 2, and reads the
  store after the post. The price: one store read a step (host only; 28 us on loopback here) and one CUDA event;
  the wait for it is a sync only for a host already ``RUN_AHEAD`` steps ahead, which keeps the device busy.
- At that step the ranks save one checkpoint together (``latest`` moves only once every rank has written), and
  exit with :data:`EXIT_CODE`, 75 (EX_TEMPFAIL, "try again"). ``--checkpoint.resume auto`` in the same command
  makes a requeued job continue from it, and a first run start from step 0.
- A second signal ends the process at once (128 + the signal's number), without touching ``latest``: the
  previous checkpoint stays whole. Signals within :data:`SAME_SIGNAL_S` of the first count as the first: a
  terminal's Ctrl-C reaches a rank and its launcher, which forwards it as SIGTERM; a cluster signals every
  process of a job. A save that is not done ``checkpoint.signal_grace_s`` after the signal ends the process the
  same way, with a line saying so, before the cluster's SIGKILL would end it without one.
- Loader worker processes ignore a stop signal while their rank stops (a cluster signals every process, and a
  worker that died would fail the step its rank is finishing) and end with their rank. Any other SIGTERM ends
  a worker as before: the DataLoader's own, for a worker that did not stop when told, and the interpreter's at
  exit (a worker that ignored those would hold its rank's exit forever).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import threading
import time

import torch

from fastclip.distributed import any_rank
from fastclip.world import _store_key

EXIT_CODE = 75  # stopped on a signal with a checkpoint written: requeue the job, --checkpoint.resume auto goes on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAME_SIGNAL_S = 1.0  # a signal this soon after the first is the same request reaching this process twice
STOP_AT = "stop_at"  # the store key a signalled rank posts its stop step on
RUN_AHEAD = 3  # steps a host may queue ahead of its device while stop requests are taken (see the module doc)


class Preempted(Exception):
    """The run stopped on a signal at ``step`` with its checkpoint ``folder`` (None: no room to write one, and
    ``latest`` names an older one, or none)."""

    def __init__(self, step: int, signal_name: str, folder, *, latest):
        self.step, self.signal_name, self.folder = step, signal_name, folder
        saved = f"checkpoint {folder}" if folder else f"no room for a checkpoint (latest: {latest or 'none'})"
        super().__init__(
            f"stopped at step {step} on {signal_name}; {saved}. The same command with --checkpoint.resume auto "
            f"goes on from there (exit {EXIT_CODE}: requeue)"
        )


RUNNING, STOPPING, ENDED = 0, 1, 2
_state = None  # this process's stop state, in memory its forked loader workers share (set by install)


def worker_signals(*_) -> None:
    """In a loader worker process (a DataLoader ``worker_init_fn``): a stop signal while its rank finishes its
    step is ignored (the rank ends its workers); any other SIGTERM (the DataLoader ending a worker that did not
    stop, the interpreter's exit) ends it as before."""
    if _state is not None:  # the rank takes stop signals (fastclip/train.py): else the defaults stand
        for signum in STOP_SIGNALS:
            signal.signal(signum, _in_worker)


def _in_worker(signum, _frame) -> None:
    deadline = time.monotonic() + SAME_SIGNAL_S  # a cluster signals the rank and its workers at once: let it hear
    while _state.value == RUNNING and time.monotonic() < deadline:
        time.sleep(0.01)
    if _state.value != STOPPING:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _taken(_signum, _frame) -> None:
    """The Python-level handler of the stop signals: nothing (the listener thread acts), but no default action."""


def _forget_wakeup() -> None:
    """In a forked child: its signals are its own (the pipe the wakeup descriptor writes to is its parent's), with
    their default actions until it says otherwise (a loader worker: :func:`worker_signals`)."""
    try:
        signal.set_wakeup_fd(-1)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
    except ValueError:  # forked from a thread other than the main one: Python then keeps no descriptor to forget
        pass


def _set(state: int) -> None:
    if _state is not None:
        _state.value = state


def _end_workers() -> None:
    """Before ``os._exit``: the loader workers ignore the stop signals and would notice their rank gone only at
    their next check of it (seconds later), holding its output pipes open meanwhile."""
    for child in multiprocessing.active_children():
        child.kill()


def _write(text: str) -> None:
    """A line on stderr straight to the descriptor (the main thread's ``print`` may hold stderr's buffer)."""
    try:
        os.write(2, text.encode() + b"\n")
    except OSError:
        pass


class StopRequests:
    """This rank's view of a stop request: its own signal, or another rank's posted on ``store``.

    ``install()`` in the main thread before training, ``close()`` after. The training loop asks
    :meth:`stop_step` after each step and stops at the step it returns; :meth:`saved` marks the checkpoint done,
    after which a second signal exits with :data:`EXIT_CODE` instead of as interrupted."""

    def __init__(self, *, rank: int, world_size: int, store=None, grace_s: float):
        self.rank, self.world_size, self.store, self.grace_s = rank, world_size, store, grace_s
        self.signum: int | None = None
        self.first_at = 0.0
        self.stop_at: int | None = None
        self.posted_by: str | None = None
        self._posted = False
        self._saved: int | bool = False  # the exit code once saved (see saved())
        self._steps: collections.deque = collections.deque()  # CUDA events of the last RUN_AHEAD steps
        self._spare = None  # the event of the step the device has finished, to record again
        self._previous: dict[int, object] = {}
        self._grace: threading.Timer | None = None
        self._wakeup, self._previous_wakeup = -1, -1

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "another rank's signal"

    @property
    def cause(self) -> str:
        """What stops the run, the same on every rank: the first posted signal and its rank."""
        return self.posted_by or self.signal_name

    def install(self) -> StopRequests:
        """Take the stop signals. Python runs a signal's handler in the main thread, and only between bytecodes: a
        main thread inside a long call (a checkpoint's write, a collective) would hear a second signal only when
        that call returns. So the handler here does nothing but keep the default action away, and a thread of its
        own acts at once on the signal numbers Python's C handler writes to the wakeup descriptor."""
        if threading.current_thread() is not threading.main_thread():  # where signal handlers may be set
            return self
        global _state
        if _state is None:  # once a process: a forked child must not write its signals into this one's pipe
            os.register_at_fork(after_in_child=_forget_wakeup)
        _state = multiprocessing.RawValue("b", RUNNING)
        read, self._wakeup = os.pipe()
        os.set_blocking(self._wakeup, False)
        threading.Thread(target=self._listen, args=(read,), name="fastclip-signals", daemon=True).start()
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)  # before the handlers
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, _taken)
        return self

    def close(self) -> None:
        """After the trainer's close (its loader workers ended): the previous handlers back, last."""
        _set(ENDED)
        if self._previous:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(self._previous_wakeup)  # after the handlers: no signal falls between the two
            os.close(self._wakeup)  # the listener reads the end of the pipe and returns
        self._previous = {}
        if self._grace is not None:
            self._grace.cancel()

    def _listen(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while numbers := pipe.read(64):
                for signum in numbers:
                    if signum in STOP_SIGNALS:  # the descriptor hears every signal with a Python handler
                        try:
                            self._on_signal(signum)
                        except Exception as e:  # noqa: BLE001 - a listener gone would swallow every later signal
                            _write(f"fastclip (rank {self.rank}): handling {signum}: {e!r}")

    def _on_signal(self, signum: int) -> None:
        now = time.monotonic()
        if self._saved is not False:  # the stop (or the run) is done but for its exit
            return self._end_now("", signum)
        if self.signum is None:
            self.signum, self.first_at = signum, now
            _set(STOPPING)
            _write(
                f"fastclip (rank {self.rank}): {signal.Signals(signum).name}: finishing this step, then one "
                f"checkpoint and exit {EXIT_CODE} (a second signal ends the run at once)"
            )
            self._start_grace(signum)
            return
        if now - self.first_at < SAME_SIGNAL_S:
            return
        self._end_now(f"a second signal ({signal.Signals(signum).name})", signum)

    def _start_grace(self, signum: int) -> None:
        """The signalled ranks' bound on the stop (the others end with them: their watchdog finds them gone)."""
        if self.grace_s > 0:
            why = f"no checkpoint {self.grace_s:g} s after {signal.Signals(signum).name} (checkpoint.signal_grace_s)"
            self._grace = threading.Timer(self.grace_s, self._end_now, (why, signum))
            self._grace.daemon = True
            self._grace.start()

    def _end_now(self, why: str, signum: int) -> None:
        """Exit at once: 75 once the stop's checkpoint is whole, 0 once the run's end is saved, else 128 + signum."""
        code = 128 + signum if self._saved is False else self._saved
        try:
            if code > 128:
                _write(
                    f"fastclip (rank {self.rank}): {why}: ending now without a checkpoint; 'latest' still names the "
                    "previous one, where --checkpoint.resume auto goes on"
                )
            _end_workers()
        finally:
            os._exit(code)

    def stop_step(self, step: int, device) -> int | None:
        """The step the ranks stop at, once one is known (this rank has done ``step`` steps); None otherwise."""
        if self.world_size == 1 or self.store is None:
            return step if self.signum is not None else self.stop_at
        self._bound_run_ahead(device)
        key = _store_key(STOP_AT)
        if self.signum is not None and not self._posted:
            self._posted = True
            # the first post wins; compare_set answers with the value the key holds now (ours or the winner's)
            posted = f"{step + RUN_AHEAD + 2} {self.signal_name} {self.rank}"
            self._read(self.store.compare_set(key, "", posted))
        elif self.stop_at is None and self.store.check([key]):  # a store round trip, no device sync
            self._read(self.store.get(key))
        if self.stop_at is not None and self.stop_at < step:  # the argument in the module doc says it cannot be
            raise RuntimeError(f"rank {self.rank} is past the agreed stop step {self.stop_at} (at {step})")
        return self.stop_at

    def asked(self, device) -> bool:
        """At the run's end, where no stop step was reached: whether any rank has a stop request (its own signal,
        or one posted), agreed by a collective. Then the end's eval and export wait for the requeued job, and the
        checkpoint is written within the grace."""
        mine = self.signum is not None or self.stop_at is not None
        if not mine and self.world_size > 1 and self.store is not None:
            mine = self.store.check([_store_key(STOP_AT)])
        return any_rank(torch.tensor(mine, device=device))

    def _bound_run_ahead(self, device) -> None:
        """Wait until the device has finished the step ``RUN_AHEAD`` back (at once, as a rule: see the module doc)."""
        if device.type != "cuda":  # a CPU's collectives return when done: its host is its device
            return
        event = self._spare or torch.cuda.Event()  # one event a step, reused: nothing allocated per step
        event.record()
        self._steps.append(event)
        if len(self._steps) > RUN_AHEAD:
            self._spare = self._steps.popleft()
            self._spare.synchronize()

    def _read(self, posted: bytes) -> None:
        step, name, rank = posted.decode().split()
        self.stop_at, self.posted_by = int(step), f"{name} to rank {rank}"
        _set(STOPPING)

    def saved(self, *, final: bool = False) -> None:
        """The stop's checkpoint is whole on every rank and ``latest`` names it (or, ``final``, the run's end is
        saved): a signal from here on ends the process at once with 75 (0)."""
        self._saved = 0 if final else EXIT_CODE
