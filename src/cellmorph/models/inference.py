"""Inference over a stream of batches on every core: several batches through the network at once on a CPU.

A CPU forward pass of a small network (EfficientNet-Lite0 at 224 px) on T intra-op threads spends part of its
time at the barriers between operators, and the image-decoding threads of `stream.field_batches` pre-empt one of
the T threads at a time while the others wait for it. Running W batches side by side, each on T / W threads
(T / W = 1 on a laptop), keeps every core busy instead: measured on this project's 2-core CPU, 103 against 90
images/s for the bare network, and 59 -> 81 images/s for the decoding and scoring of `cellmorph predict`
(benchmarks/RESULTS.md, 2026-12-06). The same work on the same number of cores gives the same bits every time;
against one batch at a time on all cores the outputs differ by float rounding (~1e-7 in probabilities here).

On a GPU the batches go one at a time (the device is the parallelism).

Example:
    >>> outs = list(map_batches(lambda item: net(item[1]), batches, torch.device("cpu")))  # in stream order
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
MAX_WORKERS = 8  # concurrent batches: beyond this, more threads per batch (activation memory grows with workers)


def plan_workers(device: torch.device, threads: int | None = None) -> tuple[int, int]:
    """(batches at once, torch threads per batch) for `threads` cores (default: torch's current thread count)."""
    threads = threads or torch.get_num_threads()
    if device.type != "cpu" or threads <= 1:
        return 1, threads
    workers = min(threads, MAX_WORKERS)
    return workers, max(1, threads // workers)


def map_batches(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> Iterator[R]:
    """fn(item) for every item, in the items' order, up to `plan_workers(device)[0]` at a time in threads (each
    with torch's intra-op threads set to the plan's share while the map runs, restored after). Items are drawn
    from `items` at most 2 x workers ahead, so a stream's memory stays bounded. An error in fn is raised at its
    item, after the running ones finish."""
    workers, per = plan_workers(device)
    if workers == 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(per)
    pending: deque[Future] = deque()
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="cellmorph-infer") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(fn, item))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # the consumer stopped early or fn failed: drop what has not started
                for future in pending:
                    future.cancel()
    finally:
        torch.set_num_threads(before)
