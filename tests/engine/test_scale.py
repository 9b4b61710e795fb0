"""Scale out on Ray (cellmorph.engine.ray_backend, [execution]): a real local Ray cluster, the real BBBC021 images and
the real offline ImageNet weights. The in-process tests share one 2-CPU cluster (module fixture); the CLI
tests start their own, as a user's `cellmorph run ... --set execution.backend=ray` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cellmorph.config import ExecutionConfig, load_config
from cellmorph.errors import CellmorphError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.toml"
SMOKE = REPO / "configs" / "finetune-cpu-smoke.toml"
# A tiny CPU fine-tune with fixed seeds: 32 px, 1 epoch, the first 3 LOCO folds, one torch thread per fold
# on both backends (a CPU fine-tune's float sums depend on the thread count; docs/scaling.md).
TINY = ["dataset.image_size=32", "model.input_size=32", "finetune.epochs=1", "evaluation.max_folds=3", "execution.threads=1"]


def test_execution_section_defaults_and_overrides():
    cfg = load_config(QUICKSTART)
    assert cfg.execution.backend == "local" and cfg.execution.address == "" and cfg.execution.max_retries == 2
    cfg = load_config(QUICKSTART, ["execution.backend=ray", "execution.gpus_per_task=0.5", "execution.cpus_per_task=2"])
    assert (cfg.execution.backend, cfg.execution.gpus_per_task, cfg.execution.cpus_per_task) == ("ray", 0.5, 2)
    with pytest.raises(CellmorphError, match="execution.backend"):
        load_config(QUICKSTART, ["execution.backend=dask"])
    with pytest.raises(CellmorphError, match="execution.workers"):
        load_config(QUICKSTART, ["execution.workers=2"])


def test_backend_is_not_part_of_what_a_run_folder_holds(tmp_path):
    """A run started on Ray resumes locally and back: [execution] is left out of the config check."""
    from cellmorph.config import dump_toml
    from cellmorph.engine.runfolder import what_is_computed as _what_is_computed

    a, b = load_config(QUICKSTART), load_config(QUICKSTART, ["execution.backend=ray", "execution.num_cpus=2"])
    assert dump_toml(a) != dump_toml(b)
    assert _what_is_computed(dump_toml(a)) == _what_is_computed(dump_toml(b))
    assert _what_is_computed(dump_toml(a)) != _what_is_computed(dump_toml(load_config(QUICKSTART, ["seed=1"])))


def test_ray_not_installed_is_one_line(monkeypatch):
    from cellmorph.engine.ray_backend import check_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    with pytest.raises(CellmorphError, match=r"pip install 'cellmorph\[ray\]'"):
        check_ray()


def test_unreachable_address_is_one_line_before_any_work(tmp_path):
    import socket

    from cellmorph.engine.ray_backend import check_ray

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CellmorphError, match=f"execution.address = '127.0.0.1:{port}': no Ray cluster answers there"):
        check_ray(ExecutionConfig(backend="ray", address=f"127.0.0.1:{port}"))
    with pytest.raises(CellmorphError, match="expected HOST:PORT"):
        check_ray(ExecutionConfig(backend="ray", address="headnode"))


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for this module's in-process runs (run_experiment reuses it)."""
    from cellmorph.engine.ray_backend import ray_session

    with ray_session(ExecutionConfig(backend="ray", num_cpus=2)) as ray:
        assert ray.cluster_resources().get("CPU") == 2
        yield ray


@pytest.mark.slow
def test_worker_imports_the_drivers_cellmorph(ray_cluster):
    import cellmorph
    from cellmorph.engine.ray_backend import worker_cellmorph_file

    assert Path(worker_cellmorph_file()).resolve() == Path(cellmorph.__file__).resolve()


def _same_run(a: Path, b: Path, folds: int) -> None:
    """Byte-identical predictions, run-level and per fold folder."""
    assert (a / "predictions.parquet").read_bytes() == (b / "predictions.parquet").read_bytes()
    for i in range(folds):
        assert (a / "folds" / f"{i:02d}" / "predictions.parquet").read_bytes() == (b / "folds" / f"{i:02d}" / "predictions.parquet").read_bytes()


@pytest.mark.slow
@pytest.mark.realdata
def test_quickstart_on_ray_gives_the_local_numbers(ray_cluster, data_dir, tmp_path):
    import json

    from cellmorph.engine.runner import run_experiment

    local = run_experiment(load_config(QUICKSTART), tmp_path / "local", data_dir)
    on_ray = run_experiment(load_config(QUICKSTART, ["execution.backend=ray"]), tmp_path / "ray", data_dir)
    for m in (local, on_ray):
        assert (m.level("treatment").correct, m.level("treatment").total) == (55, 55)
        assert (m.level("image").correct, m.level("image").total) == (573, 660)
    _same_run(tmp_path / "local", tmp_path / "ray", 18)
    env = json.loads((tmp_path / "ray" / "environment.json").read_text())
    assert env["execution"]["backend"] == "ray" and env["execution"]["tasks_this_invocation"] == 18
    assert not list((tmp_path / "ray" / "folds").glob(".*")), "temporary fold folders left behind"


@pytest.mark.slow
@pytest.mark.realdata
def test_seeds_of_a_run_are_tasks_of_one_pool(ray_cluster, data_dir, tmp_path):
    """seeds = [0, 1]: every (fold, seed) pair is one task; per-seed folders and the pooled predictions are the local run's."""
    import json

    from cellmorph.engine.runner import run_experiment

    sets = ["evaluation.max_folds=3", "seeds=[0, 1]", "frozen.C=0.05"]
    run_experiment(load_config(QUICKSTART, sets), tmp_path / "local", data_dir)
    run_experiment(load_config(QUICKSTART, sets + ["execution.backend=ray"]), tmp_path / "ray", data_dir)
    assert (tmp_path / "local" / "predictions.parquet").read_bytes() == (tmp_path / "ray" / "predictions.parquet").read_bytes()
    for seed in (0, 1):
        _same_run(tmp_path / "local" / "seeds" / str(seed), tmp_path / "ray" / "seeds" / str(seed), 3)
    assert json.loads((tmp_path / "ray" / "environment.json").read_text())["execution"]["tasks_this_invocation"] == 6


@pytest.fixture(scope="module")
def tiny_local(data_dir, tmp_path_factory):
    """The tiny fine-tune, run locally: the reference for the Ray runs below."""
    from cellmorph.engine.runner import run_experiment

    out = tmp_path_factory.mktemp("tiny") / "local"
    m = run_experiment(load_config(SMOKE, TINY), out, data_dir)
    return out, m


@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_finetune_on_ray_gives_the_local_numbers(ray_cluster, tiny_local, data_dir, tmp_path):
    from cellmorph.engine.runner import run_experiment

    local_out, local_m = tiny_local
    m = run_experiment(load_config(SMOKE, TINY + ["execution.backend=ray"]), tmp_path / "ray", data_dir)
    _same_run(local_out, tmp_path / "ray", 3)
    assert m.level("image").correct == local_m.level("image").correct


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "cellmorph", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def _session_processes(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies, which no longer run, left out), read from /proc."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def _kill_session(sid: int, timeout: float = 30) -> None:
    """Stop everything a CLI process started with start_new_session (the session id is its pid) left running,
    and wait until it is gone. A local Ray cluster's raylet and GCS share the driver's process group, but each
    Ray worker runs in a process group of its own: after the driver is SIGKILLed, a worker may still be
    finishing its fold (and write it, whole, a moment later), so killing the group alone is not enough."""
    deadline = time.time() + timeout
    while pids := _session_processes(sid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.time() < deadline, f"processes of session {sid} still alive after SIGKILL: {pids}"
        time.sleep(0.1)


def _listening_sockets(pids: list[int]) -> set[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket the processes `pids` hold: /proc/net/tcp and tcp6
    (the sockets in LISTEN state, by inode) matched to the inodes in each process's /proc/PID/fd."""
    import ipaddress

    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)  # 32-bit words in host (little-endian) order
            addr = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            listening[int(fields[9])] = (str(addr), int(hexport, 16))
    found = set()
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in listening:
                found.add((Path(name).name if name.startswith("/") else name, *listening[int(target[8:-1])]))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _descendants(pid: int) -> list[int]:
    """`pid` and every live process below it, read from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(d.name)] = int(fields[1])
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        out += frontier
    return out


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only(ray_cluster):
    """A local cluster (ray_session without an address) runs on this machine only: every TCP port its processes
    listen on (this driver, gcs_server, raylet, the agents and the workers, sampled while tasks run) is on
    127.0.0.1 (or ::1), none on 0.0.0.0 or ::, which other machines could reach."""
    import time as _time

    @ray_cluster.remote(num_cpus=1)
    def busy(seconds):
        _time.sleep(seconds)
        return os.getpid()

    pending = [busy.remote(3) for _ in range(2)]  # two workers alive while the sockets are sampled
    seen: set[tuple[str, str, int]] = set()
    deadline = time.time() + 3
    while time.time() < deadline:
        seen |= _listening_sockets(_descendants(os.getpid()))
        time.sleep(0.2)
    workers = set(ray_cluster.get(pending))
    processes = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= processes and any(n.startswith("ray::") for n in processes), seen  # the cluster was seen
    assert workers, "no task ran"
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond this machine: {exposed}"


@pytest.mark.slow
@pytest.mark.realdata
def test_killed_driver_resumes_with_finished_folds_kept(tiny_local, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(SMOKE), "--out", str(out), "--data", str(data_dir), *sum((["--set", s] for s in TINY + ["execution.backend=ray"]), [])]
    proc = _cli(args)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(out.glob("folds/[0-9][0-9]/predictions.parquet")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        done_before = sorted(out.glob("folds/[0-9][0-9]"))
        assert done_before, "no fold finished in 240 s"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as `kill -9` would
        proc.wait(timeout=30)
    finally:
        _kill_session(proc.pid)  # what the killed driver left running: after this no process writes a fold
    done = sorted(p.parent for p in out.glob("folds/[0-9][0-9]/predictions.parquet"))
    if len(done) == 3:
        pytest.fail("the driver was killed too late: every fold had finished (nothing left to resume)")
    mtimes = {p: (p / "predictions.parquet").stat().st_mtime_ns for p in done}
    rerun = _cli(args)
    try:
        _, err = rerun.communicate(timeout=480)
    finally:
        _kill_session(rerun.pid)
    assert rerun.returncode == 0, err[-2000:]
    assert f"resuming {out}: {len(done)} of 3 folds already done" in " ".join(err.split())
    assert {p: (p / "predictions.parquet").stat().st_mtime_ns for p in done} == mtimes, "finished folds were recomputed"
    _same_run(tiny_local[0], out, 3)


@pytest.mark.slow
@pytest.mark.realdata
def test_failing_task_stops_the_run_with_one_line_and_no_half_fold(data_dir, tmp_path):
    """Real bad input that only the tasks meet: fine-tuning from a corrupt weights file (the driver never
    loads it). The run stops at once (no retries: the input is at fault), exit 2, one line, no fold folder."""
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a torch file\x00" * 64)
    out = tmp_path / "run"
    sets = TINY + ["execution.backend=ray", f"model.init='{bad}'"]
    proc = _cli(["run", str(SMOKE), "--out", str(out), "--data", str(data_dir), *sum((["--set", s] for s in sets), [])])
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"{bad}: cannot read weights" in lines[0], err[-2000:]
    assert "Traceback" not in err and "RayTaskError" not in err
    assert not list(out.glob("folds/*")) and not list(out.glob("folds/.*")), "a fold folder was written"
    assert not (out / "predictions.parquet").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_dead_worker_is_retried_and_gives_the_same_numbers(ray_cluster, data_dir, tmp_path, monkeypatch):
    """The worker running fold 1 dies once (os._exit, as a worker killed for memory): Ray retries the task and the
    run ends with the local numbers. The crash comes from the documented test hook CELLMORPH_TEST_CRASH_FOLD."""
    from cellmorph.engine.runner import run_experiment

    sets = ["evaluation.max_folds=3"]
    local = run_experiment(load_config(QUICKSTART, sets), tmp_path / "local", data_dir)
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("CELLMORPH_TEST_CRASH_FOLD", f"1:{marker}")
    m = run_experiment(load_config(QUICKSTART, sets + ["execution.backend=ray", "execution.max_retries=1"]), tmp_path / "ray", data_dir)
    assert marker.exists(), "the hook did not crash the worker"
    _same_run(tmp_path / "local", tmp_path / "ray", 3)
    assert m.level("image").correct == local.level("image").correct


@pytest.mark.slow
@pytest.mark.realdata
def test_task_that_keeps_failing_stops_the_run_and_keeps_finished_folds(ray_cluster, data_dir, tmp_path, monkeypatch):
    from cellmorph.engine.runner import run_experiment

    monkeypatch.setenv("CELLMORPH_TEST_CRASH_FOLD", "1")  # every attempt of fold 1 dies
    out = tmp_path / "ray"
    cfg = load_config(QUICKSTART, ["evaluation.max_folds=3", "execution.backend=ray", "execution.max_retries=1"])
    with pytest.raises(CellmorphError) as err:
        run_experiment(cfg, out, data_dir)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("fold 2/3 (") and "after 2 attempt(s)" in msg and "rerun the same command" in msg, msg
    kept = sorted(p for p in (out / "folds").iterdir() if not p.name.startswith("."))
    assert "01" not in [p.name for p in kept]
    assert all((p / "predictions.parquet").is_file() for p in kept), "a fold folder is half-written"  # other folds: whole or absent
    assert not (out / "predictions.parquet").exists()
    mtimes = {p: (p / "predictions.parquet").stat().st_mtime_ns for p in kept}
    monkeypatch.delenv("CELLMORPH_TEST_CRASH_FOLD")
    m = run_experiment(cfg, out, data_dir)  # the rerun computes the missing folds only
    assert m.context["n_folds"] == 3 and (out / "folds" / "01" / "predictions.parquet").is_file()
    assert {p: (p / "predictions.parquet").stat().st_mtime_ns for p in kept} == mtimes
    assert not list((out / "folds").glob(".*")), "temporary fold folders left after the rerun"


def test_grid_parsing():
    from cellmorph.engine.sweep import parse_grid, point_name

    assert parse_grid(["model.name=resnet50,inception_v3", "seed=0,1", "seeds=[0,1],[2,3]"]) == [
        ("model.name", ["resnet50", "inception_v3"]), ("seed", [0, 1]), ("seeds", [[0, 1], [2, 3]])]
    assert point_name({"model.name": "resnet50", "frozen.C": 0.5}) == "model.name=resnet50__frozen.C=0.5"
    for bad in ("seed", "seed=", "seed=0,,1", "seed=1,1"):
        with pytest.raises(CellmorphError, match="--grid"):
            parse_grid([bad])


@pytest.mark.slow
@pytest.mark.realdata
def test_sweep_cli_on_ray_runs_every_point_and_summarizes(data_dir, tmp_path):
    """`cellmorph sweep` on Ray: 2 x 2 grid points, one run folder each, the numbers of a local run, one summary row
    per setting with its seeds pooled; a bad grid value is one line and exit 2 before anything runs."""
    from cellmorph.engine.runner import run_experiment

    out = tmp_path / "sweep"
    base = ["--set", "evaluation.max_folds=3"]
    proc = _cli(["sweep", str(QUICKSTART), "--grid", "frozen.C=0.5,1.0", "--grid", "seed=0,1", "--out", str(out), "--data", str(data_dir),
                 *base, "--set", "execution.backend=ray", "--set", "execution.num_cpus=2"])
    try:
        _, err = proc.communicate(timeout=400)
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, err[-2000:]
    points = sorted(p.name for p in out.iterdir() if p.name != "summary")
    assert points == ["frozen.C=0.5__seed=0", "frozen.C=0.5__seed=1", "frozen.C=1.0__seed=0", "frozen.C=1.0__seed=1"]
    local = run_experiment(load_config(QUICKSTART, ["evaluation.max_folds=3", "frozen.C=0.5", "seed=1", "name='quickstart (frozen.C=0.5)'"]),
                           tmp_path / "local", data_dir)
    _same_run(tmp_path / "local", out / "frozen.C=0.5__seed=1", 3)
    summary = pd.read_csv(out / "summary" / "summary.csv")
    image = summary[summary["level"] == "image"]
    assert sorted(image["experiment"]) == ["quickstart (frozen.C=0.5)", "quickstart (frozen.C=1.0)"]
    assert set(image["n_seeds"]) == {2}
    assert local.level("image").correct in [int(c.split("/")[0]) for c in " ".join(image["correct"]).split()]
    bad = _cli(["sweep", str(QUICKSTART), "--grid", "frozen.C=0.5,-1", "--out", str(tmp_path / "bad"), "--data", str(data_dir)])
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "frozen.C" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_screen_predict_and_embed_on_ray_equal_local_byte_for_byte(ray_cluster, screen_world, tmp_path, monkeypatch):
    """`predict` and `embed --images` of a small screen (9 shards of up to 4 fields, 3 plates): one Ray task per shard,
    the worker of shard 2 dying once (retried), give the local files byte for byte at the same torch thread count."""
    from cellmorph.prediction.predict import predict_images
    from cellmorph.profiling.embed import embed

    monkeypatch.setenv("CELLMORPH_SHARD_ROWS", "4")
    bundle, csv = screen_world / "bundle", screen_world / "load_data.csv"
    here = ExecutionConfig(backend="local", threads=1)
    ray = ExecutionConfig(backend="ray", threads=1, cpus_per_task=1, max_retries=1)
    predict_images(bundle, csv, tmp_path / "local", execution=here)
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("CELLMORPH_TEST_CRASH_SHARD", f"2:{marker}")
    predict_images(bundle, csv, tmp_path / "ray", execution=ray)
    assert marker.exists(), "the hook did not crash the worker"
    for name in ("predictions.parquet", "wells.csv", "treatments.csv"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    monkeypatch.delenv("CELLMORPH_TEST_CRASH_SHARD")
    a = embed(bundle, tmp_path / "emb-local", images=csv, execution=here)
    embed(bundle, tmp_path / "emb-ray", images=csv, execution=ray)
    for name in ("embeddings.parquet", "profiles_well.parquet", "profiles_treatment.parquet"):
        assert (tmp_path / "emb-local" / name).read_bytes() == (tmp_path / "emb-ray" / name).read_bytes(), name
    assert a.embeddings.filter(like="Image_CNN_").shape == (len(pd.read_csv(csv)), 1280)
