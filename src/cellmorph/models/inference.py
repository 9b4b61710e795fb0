"""Inference on a CPU's cores: forward passes in parts of CPU_PART images, one torch thread each, several at once.

A CPU forward pass of a small network (EfficientNet-Lite0 at 224 px) on T intra-op threads spends part of its
time at the barriers between operators, and the image-decoding threads of `stream.field_batches` pre-empt one of
the T threads at a time while the others wait for it. Running one part per core at once, each on one thread,
keeps every core busy instead (measured on this project's 2-core CPU: benchmarks/RESULTS.md, 2026-12-06).

It also makes the numbers independent of the machine's size. A float32 convolution's sums depend on the thread
count and, above about a dozen images on one thread here, on the batch size too (oneDNN picks other kernels): so
every CPU forward is cut into parts of CPU_PART images, each run on ONE thread, whatever the number of cores.
A 2-core laptop, a 64-core node and a Ray task with any cpus_per_task give the same bits for the same images on
the same kind of CPU (not across instruction sets: AVX2 and AVX-512 kernels sum in other orders).

On a GPU the batches go whole, one at a time (the device is the parallelism).

Example:
    >>> outs = list(map_batches(lambda start: net(x[start : start + CPU_PART]), range(0, len(x), CPU_PART), torch.device("cpu")))
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
CPU_PART = 8  # images per forward pass on a CPU: at 224 px faster per image than 16 or 32 on one thread here
MAX_WORKERS = 64  # parts at once: one per core, each holding only CPU_PART images' activations


def part_size(device: torch.device, batch_size: int) -> int:
    """Images per forward pass: CPU_PART on a CPU, whatever the batch size asked for (a stream of batches of 8, 16,
    32 ... is then cut exactly as the same images in one array); the batch size elsewhere. Small inputs pay for it
    (32 px: parts of 8 ran at 770 images/s against 1,800 for parts of 32 here); larger parts would make the
    numbers depend on how a caller batches its images."""
    return CPU_PART if device.type == "cpu" else batch_size


def plan_workers(device: torch.device, threads: int | None = None) -> tuple[int, int]:
    """(parts at once, torch threads per part) for `threads` cores (default: torch's current thread count)."""
    threads = threads or torch.get_num_threads()
    if device.type != "cpu":
        return 1, threads
    return min(threads, MAX_WORKERS), 1


def map_batches(fn: Callable[[T], R], items: Iterable[T], device: torch.device) -> Iterator[R]:
    """fn(item) for every item, in the items' order, up to `plan_workers(device)[0]` at a time in threads, torch
    on one intra-op thread while the map runs (restored after). Items are drawn from `items` at most 2 x workers
    ahead, so a stream's memory stays bounded. An error in fn is raised at its item, after the running ones
    finish. Called inside a map (one thread left), it runs the items one after another on that thread."""
    workers, per = plan_workers(device)
    if workers == 1:  # a GPU, or a CPU on one thread already
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
