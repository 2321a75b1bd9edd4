"""A background thread that runs a batch generator a few batches ahead of the training step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from fastclip.data.batch import Batch


class Prefetcher:
    """Runs a batch generator in a daemon thread, ``depth`` batches ahead; re-raises its errors in the reader."""

    _DONE = object()

    def __init__(self, source: Iterator[Batch], *, depth: int, device: torch.device):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.device = device
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="fastclip-prefetch")
        self.thread.start()

    def _run(self, source: Iterator[Batch]) -> None:
        try:
            for item in source:
                if self.stopped.is_set():
                    return
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
            self.queue.put(e)
            return
        if not self.stopped.is_set():
            self.queue.put(self._DONE)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        non_blocking = self.device.type == "cuda"
        return Batch(
            images=item.images.to(self.device, non_blocking=non_blocking),
            texts=item.texts.to(self.device, non_blocking=non_blocking),
            labels=item.labels,
            position=item.position,
        )

    def close(self) -> None:
        """Stop producing and wait for the thread, so nothing runs the pipeline after this returns."""
        self.stopped.set()
        while self.thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)
