"""Scale out: every (fold, seed) of a run as a Ray task (`[execution] backend = "ray"`).

The runner (cellmorph.engine.folds) decides what to compute; this module only decides where. A task runs the
very code a local run runs for one fold (the fold function it is handed: `FoldEngine.compute_fold` into a
`FolderSink`), so a fold's
predictions are a pure function of (config, store, fold, seed), whichever process computes them:

- frozen mode: the features are extracted once, on the driver (or read from the feature cache), and
  reach the workers once, in Ray's object store, with the rest of the engine (labels, folds, metadata);
- fine-tuning: the uint8 store reaches the workers once, in the object store (shared memory on a
  node, read without a copy); each worker process resizes it to the network input once and keeps it
  for the next folds it runs;
- torch runs `threads` (default: `cpus_per_task`) threads in a task; a local run runs `threads` too when
  set. A CPU fine-tune is bitwise the same on both backends at the same thread count (not across counts:
  float sums are split differently); the logistic heads run BLAS on one thread either way.

Each task writes its own fold folder (folds/NN, atomically: a temporary folder renamed), so a killed
driver loses only the folds in flight, and a rerun resumes with the others. The run folder must be on a
filesystem every worker sees (always true for the local cluster started here).

A task that raises a CellmorphError (the user's input is at fault: a bad weights file, ...) stops the run
at once with that message. Any other failure (an unexpected exception, a worker that died, e.g. killed for
memory) is retried `max_retries` times, then stops the run with a one-line error naming the fold; the
folds already written stay.

Example:
    >>> from cellmorph.config import load_config
    >>> from cellmorph.engine.runner import run_experiment
    >>> cfg = load_config("configs/quickstart.toml", ["execution.backend=ray"])
    >>> run_experiment(cfg, "runs/quickstart-ray").level("treatment").correct
    55
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from cellmorph.config import ExecutionConfig
from cellmorph.errors import CellmorphError

RAY_MISSING = "execution.backend = 'ray' needs Ray, an optional dependency: pip install 'cellmorph[ray]' (or set execution.backend = 'local')."


def _import_ray():
    try:
        import ray
    except ImportError:
        raise CellmorphError(RAY_MISSING) from None
    return ray


def check_ray(ex: ExecutionConfig | None = None) -> None:
    """Fail before any work when Ray is asked for but not installed, or `ex.address` (host:port) does not answer
    (Ray itself would keep retrying the connection for minutes)."""
    _import_ray()
    if ex is not None and ex.address and ex.address != "auto":
        import socket

        hostport = ex.address.removeprefix("ray://").split("/")[0]
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise CellmorphError(f"execution.address = '{ex.address}': expected HOST:PORT (e.g. 10.0.0.5:6379 or ray://head:10001) or 'auto'.")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as err:
            raise CellmorphError(f"execution.address = '{ex.address}': no Ray cluster answers there ({err.strerror or err}). "
                                 "Start it (`ray start --head`), fix the address, or leave it empty to start a local cluster.") from None


def _source_root() -> str:
    """The folder this cellmorph package is imported from: workers of a local cluster import the same sources."""
    return str(Path(__file__).resolve().parents[1])


LOOPBACK = "127.0.0.1"


@contextmanager
def _this_machine_only():
    """While a local cluster starts: Ray's single-machine mode, in which the node's address is 127.0.0.1 (on Linux Ray
    otherwise swaps 127.0.0.1 for the machine's network address, and its gRPC servers listen on every interface
    unless the node's address is exactly 127.0.0.1). It is the mode Ray uses on macOS and Windows
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), read at import; set here for the start-up only, so that joining a
    cluster (`execution.address`) later in this process is unchanged. ray_session checks the result."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextmanager
def ray_session(ex: ExecutionConfig):
    """Connect to Ray for the block: reuse a session already open in this process (it is left open), join
    `ex.address`, or start a local cluster of `ex.num_cpus` CPUs (all of them when 0) that is stopped after.
    A local cluster listens on 127.0.0.1 only (its GCS, raylet, agents, workers and this driver): nothing of it
    is reachable from another machine. Joining `ex.address` is the user's choice of network (docs/scaling.md).

    Example:
        >>> with ray_session(ExecutionConfig(backend="ray", num_cpus=2)):
        ...     ...  # several run_experiment calls share the one cluster (as `cellmorph sweep` does)
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pythonpath = os.pathsep.join(p for p in (_source_root(), os.environ.get("PYTHONPATH", "")) if p)
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True,
                  runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    if ex.address:
        kwargs["address"] = ex.address
    else:
        kwargs.update(num_cpus=ex.num_cpus or os.cpu_count() or 1, _node_ip_address=LOOPBACK)
    try:
        if ex.address:
            ray.init(**kwargs)
        else:
            with _this_machine_only():
                ray.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises many types here; the user needs one line
        where = f"the Ray cluster at execution.address = '{ex.address}'" if ex.address else "a local Ray cluster"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CellmorphError(f"cannot start or join {where} ({type(err).__name__}: {first}). Check the address, or leave it empty to start a local cluster.") from None
    if not ex.address and ray.util.get_node_ip_address() != LOOPBACK:  # this Ray no longer honours the switch above
        node = ray.util.get_node_ip_address()
        ray.shutdown()
        raise CellmorphError(f"a local Ray cluster would listen on {node}, reachable from other machines, not on {LOOPBACK} only "
                             f"(Ray {ray.__version__}; cellmorph is tested with 2.60.0). Install ray==2.60.0, or start a cluster "
                             "yourself and join it with execution.address (docs/scaling.md says what that exposes).")
    try:
        yield ray
    finally:
        ray.shutdown()


# One resized store per worker process: the folds a worker runs after its first reuse it.
_WORKER_IMAGES: dict = {}


# Test hook (tests/test_scale.py): CELLMORPH_TEST_CRASH_FOLD="I" makes the worker running fold index I exit
# abruptly on every attempt, "I:MARKER" only on the first (the marker file records it), as a worker killed
# for memory would. Read on the driver, passed to the tasks; unset in normal use.
CRASH_HOOK_ENV = "CELLMORPH_TEST_CRASH_FOLD"


def _test_crash(spec: str, i: int) -> None:
    index, _, marker = spec.partition(":")
    if not spec or int(index) != i:
        return
    if marker:
        if Path(marker).exists():
            return
        Path(marker).touch()
    os._exit(3)


def _fold_task(fold_fn, engine, seed: int, i: int, folder: str, threads: int, crash: str = "") -> dict:
    """One fold of one seed, in a Ray worker: `fold_fn(engine, seed, i, folder)` (the runner's fold function,
    cellmorph.engine.folds.fold_task), which writes the fold folder. Returns {"device": ...}, or
    {"error": message} for a CellmorphError (not retried: the input is at fault)."""
    _test_crash(crash, i)
    try:
        if engine.cfg.mode == "finetune":
            import torch

            torch.set_num_threads(threads)
            engine.plan.reset_device()  # resolved here, on the worker (its GPU when gpus_per_task > 0)
            key = (engine.store.key, engine.cfg.model.name, engine.cfg.model.input_size, str(engine.plan.device))
            if key not in _WORKER_IMAGES:
                _WORKER_IMAGES.clear()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # the object store's arrays are read-only; never written
                    engine.prepare()
                _WORKER_IMAGES[key] = engine.images
            engine.images = _WORKER_IMAGES[key]
        return {"device": fold_fn(engine, seed, i, folder)}
    except CellmorphError as err:
        return {"error": str(err)}


def run_on_ray(engine, jobs: list[tuple[int, int, object]], progress, task, fold_fn) -> list[str]:
    """Run `jobs` ((seed, fold index, sink) whose sink is a run folder) as Ray tasks, each calling
    `fold_fn(engine, seed, i, folder)`; advance `task` of `progress` as each finishes (ray.wait). Returns the devices the tasks ran on. Raises a one-line
    CellmorphError when a task fails for good; the finished folds stay on disk."""
    ex = engine.cfg.execution
    n_folds = len(engine.plan.folds)
    devices: set[str] = set()

    def what(job) -> str:
        seed, i = job
        return f"fold {i + 1}/{n_folds} ({engine.plan.folds[i].name}" + (f", seed {seed}" if len(engine.cfg.seed_list) > 1 else "") + ")"

    def done(job, out) -> None:
        devices.add(out["device"])
        progress.advance(task)

    with ray_session(ex) as ray:
        ref = ray.put(engine.for_workers())  # once: every task reads this one copy
        crash = os.environ.get(CRASH_HOOK_ENV, "")
        calls = {(seed, i): (fold_fn, ref, seed, i, str(sink.folder), ex.threads or ex.cpus_per_task, crash) for seed, i, sink in jobs}
        _map_tasks(ray, ex, _fold_task, calls, what, done, "folds")
    return sorted(devices)


def _map_tasks(ray, ex: ExecutionConfig, fn, calls: dict, what, done, kept: str) -> None:
    """Submit `fn(*args)` for every (job -> args) of `calls` as a Ray task; `done(job, result)` as each finishes.
    A result {"error": message} (the user's input is at fault) stops at once with that message; a task that
    failed after its retries stops with one line naming `what(job)`. The rest is cancelled on any failure or
    Ctrl-C; what `done` wrote stays (`kept` says what, e.g. "folds")."""
    from ray.exceptions import RayError, RayTaskError

    remote = ray.remote(fn).options(num_cpus=ex.cpus_per_task, num_gpus=ex.gpus_per_task, max_retries=ex.max_retries, retry_exceptions=True)
    pending = {remote.remote(*args): job for job, args in calls.items()}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                job = pending.pop(r)
                try:
                    out = ray.get(r)
                except RayTaskError as err:
                    cause = err.cause if isinstance(err.cause, BaseException) else err
                    first = (str(cause).strip().splitlines() or [""])[0]
                    raise CellmorphError(f"{what(job)} failed on Ray after {ex.max_retries + 1} attempt(s): {type(cause).__name__}: {first}. "
                                         f"The finished {kept} are kept: fix the cause and rerun the same command to resume.") from None
                except RayError as err:  # the worker died (killed, out of memory), an object was lost
                    first = (str(err).strip().splitlines() or [""])[0]
                    raise CellmorphError(f"{what(job)} failed on Ray after {ex.max_retries + 1} attempt(s): {type(err).__name__}: {first}. "
                                         f"The finished {kept} are kept: rerun the same command to resume.") from None
                if isinstance(out, dict) and "error" in out:
                    raise CellmorphError(out["error"])
                done(job, out)
    finally:
        # A failure or Ctrl-C: stop the rest (each fold folder / shard file is whole or absent). force=True ends the
        # worker process of a running task: a plain cancel raises KeyboardInterrupt inside the task, and one that
        # lands in the middle of an import (say scipy.stats, first used in that fold) leaves the worker alive with
        # half-imported modules, which Ray then reuses: the rerun's tasks failed there with "NameError: name
        # '_ndimage_api' is not defined" (seen in tests/engine/test_scale.py::test_task_that_keeps_failing_...).
        for r in pending:
            ray.cancel(r, force=True)


SHARD_CRASH_ENV = "CELLMORPH_TEST_CRASH_SHARD"  # tests: as CRASH_HOOK_ENV, for a screen's shard indices


def _shard_task(score_fn, clf, table, image_size: int, shard, options: dict, threads: int, crash: str = "") -> dict:
    """One shard of a screen, in a Ray worker: `score_fn(clf, table, image_size, shard, **options)` (the local code,
    cellmorph.engine.screen.score_shard) on `threads` torch threads. Returns its outputs, or {"error": ...}."""
    import torch

    _test_crash(crash, shard.index)
    torch.set_num_threads(threads)
    try:
        return {"outputs": score_fn(clf, table, image_size, shard, **options)}
    except CellmorphError as err:
        return {"error": str(err)}


def run_shards_on_ray(ex: ExecutionConfig, clf, table, image_size: int, shards: list, options: dict, score_fn, finished, advance) -> None:
    """Score `shards` of a screen as Ray tasks (one per shard; the classifier and the table go to the object store
    once); `finished(shard, outputs)` on the driver as each arrives (it keeps the shard on disk), `advance()` too."""
    by_index = {s.index: s for s in shards}

    def done(job, out) -> None:
        finished(by_index[job], out["outputs"])
        advance()

    with ray_session(ex) as ray:
        clf_ref, table_ref = ray.put(clf), ray.put(table)
        crash = os.environ.get(SHARD_CRASH_ENV, "")
        calls = {s.index: (score_fn, clf_ref, table_ref, image_size, s, options, ex.threads or ex.cpus_per_task, crash) for s in shards}
        _map_tasks(ray, ex, _shard_task, calls, lambda i: f"shard {i + 1} ({by_index[i].name})", done, "shards")


def worker_cellmorph_file(ex: ExecutionConfig | None = None) -> str:
    """The cellmorph/__init__.py a Ray worker imports (tests check it is the driver's)."""

    def where():
        import importlib.util

        return importlib.util.find_spec("cellmorph").origin

    with ray_session(ex or ExecutionConfig(backend="ray")) as ray:
        return ray.get(ray.remote(where).options(num_cpus=1).remote())
