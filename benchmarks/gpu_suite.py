"""The GPU results in one resumable suite: throughput, seeds and protocols, translocation, nuclei, explain.

    # on the GPU machine (docs/gpu.md says how to set it up), as often as needed, each call <= 10 min:
    python benchmarks/gpu_suite.py --out results/gpu --data /tmp/stage/data --budget-s 540
    # a CPU smoke of every item at tiny sizes (what tests/test_gpu_suite.py runs):
    python benchmarks/gpu_suite.py --out /tmp/suite --data ../shared/data --quick --device cpu

Every item is a job with a key (`--list` prints them in order). Jobs run one after another, in the
order of the acceptance criteria first (throughput; EfficientNet-Lite0 seeds under loco and lcbo;
translocation; nuclei; explain), then the rest (Lite1/Lite2; the paper recipe for ResNet50 and the
Inceptions; the paper's other nucleus networks). Each experiment job is `cellmorph run` of a config
in a subprocess, into OUT/runs/<key>/: the runner resumes a run fold by fold, so a job cut by the
budget loses at most the fold it was in. When a job finishes, its JSON line (`benchmark` key:
gpu_throughput, loco_accuracy, translocation, nuclei, explain) is appended to OUT/results.jsonl at
once and printed on stdout; a job with a line there is never run again. `--budget-s` stops the
running job (Ctrl-C: it cleans up and exits) when the budget is spent and ends the call with exit
code 3: rerun the same command to continue. Exit 0 once every selected job has its line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # translocation_replicates and nuclei_and_lenet: one summary each, shared
sys.path.insert(0, str(REPO / "src"))  # runs from a checkout without installing, too

from nuclei_and_lenet import NUCLEI, level_fields  # noqa: E402
from translocation_replicates import replicate_line  # noqa: E402

INCOMPLETE = 3  # exit code: the budget ran out before every job had its line
NUCLEUS_RECIPES = ["paper-64", "augment-64", "augment-128", "augment-224"]  # configs/nuclei/recipes/, chosen a priori


@dataclass
class Job:
    """One item of the suite. kind: "throughput" | "run" | "nuclei_select" | "explain"."""

    key: str
    benchmark: str
    kind: str
    config: str = ""  # under configs/, without .toml
    overrides: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # copied into the result line


def jobs() -> list[Job]:
    """Every job, in priority order."""
    out = [Job("throughput/eager", "gpu_throughput", "throughput", info={"compile": False}),
           Job("throughput/compile", "gpu_throughput", "throughput", info={"compile": True})]

    def loco(model: str, recipe: str, protocol: str, seed: int) -> Job:
        over = {"seed": seed, "evaluation.protocol": protocol}
        if (model, recipe, protocol, seed) == ("tf_efficientnet_lite0", "tuned", "loco", 0):
            over["finetune.save_models"] = True  # the explain job reads a fold model of this run
        return Job(f"loco/{model}/{recipe}/{protocol}/s{seed}", "loco_accuracy", "run", f"{recipe}/{model}", over,
                   {"recipe": recipe, "protocol": protocol, "seed": seed})

    out += [loco("tf_efficientnet_lite0", "tuned", p, s) for p in ("loco", "lcbo") for s in (0, 1, 2)]
    out += [Job(f"translocation/{s}", "translocation", "run", f"translocation/bbbc013-{s}-replicates", {}, {"setting": s}) for s in ("pretrained", "scratch")]
    out += [Job("nuclei/select/random", "nuclei", "nuclei_select", info={"split": "random", "candidates": NUCLEUS_RECIPES})]
    out += [Job("nuclei/select/image-grouped", "nuclei", "nuclei_select", overrides={"evaluation.protocol": "image-grouped"},
                info={"split": "image-grouped", "candidates": NUCLEUS_RECIPES})]
    out += [Job("explain/tf_efficientnet_lite0", "explain", "explain", "tuned/tf_efficientnet_lite0", info={"from": "loco/tf_efficientnet_lite0/tuned/loco/s0"})]
    out += [loco(m, "tuned", "loco", s) for m in ("tf_efficientnet_lite1", "tf_efficientnet_lite2") for s in (0, 1, 2)]
    out += [loco(m, "paper", "loco", s) for m in ("resnet50", "inception_v3", "inception_resnet_v2") for s in (0, 1, 2)]
    out += [Job(f"nuclei/{key}", "nuclei", "run", config, changes, {"split": key.split("/")[0]}) for key, config, changes in NUCLEI]
    return out


def quick_overrides(job: Job) -> dict:
    """A CPU smoke of the job at tiny sizes: same code path, seconds instead of GPU minutes."""
    if job.config.startswith("translocation/") or job.key.startswith("translocation/"):
        return {"seeds": [0], "finetune.epochs": 1, "finetune.eval_epochs": [1], "model.input_size": 32, "dataset.options": {"crops_per_well": 2}}
    if job.key.startswith("nuclei/"):
        return {"dataset.options.max_images": 4, "finetune.epochs": 1, "model.input_size": 32, "finetune.batch_size": 50,
                "finetune.eval_every_iterations": 0}
    return {"dataset.image_size": 64, "model.input_size": 32, "finetune.epochs": 1, "finetune.batch_size": 16, "evaluation.max_folds": 1}


class Suite:
    def __init__(self, out: Path, data: Path | None, budget_s: float, device: str, quick: bool):
        self.out, self.data, self.device, self.quick = out, data, device, quick
        self.deadline = time.monotonic() + budget_s
        self.results = out / "results.jsonl"
        out.mkdir(parents=True, exist_ok=True)

    def done(self) -> dict[str, dict]:
        if not self.results.is_file():
            return {}
        lines = [json.loads(x) for x in self.results.read_text().splitlines() if x.strip()]
        return {x["key"]: x for x in lines}

    def record(self, line: dict) -> None:
        line = {"date": date.today().isoformat(), **line, "quick": self.quick}
        with open(self.results, "a") as f:  # one line, appended and flushed at once
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(json.dumps(line), flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, args: list[str], log: Path) -> bool:
        """Run a command until it ends or the budget does; True if it finished (exit 0)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(args)}\n")
            f.flush()
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait(timeout=max(self.left(), 1))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # cellmorph's Ctrl-C: its own temporaries go, finished folds stay
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return False
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"`{' '.join(args)}` failed (exit {rc}); log {log}:\n" + "\n".join(tail))
        return True

    def cellmorph_run(self, config: str, overrides: dict, folder: Path):
        """`cellmorph run` of configs/<config>.toml with overrides; its Metrics, or None if the budget ran out."""
        from cellmorph.evaluation.metrics import Metrics

        sets = [f"{k}={_toml_value(v)}" for k, v in {"device": self.device, **overrides}.items()]
        args = [sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / f"{config}.toml"), "--out", str(folder)]
        args += [x for s in sets for x in ("--set", s)]
        if self.data:
            args += ["--data", str(self.data)]
        if not self.call(args, folder.parent / f"{folder.name}.log"):
            return None
        return Metrics.read(folder / "metrics.json")

    def run(self, job: Job) -> dict | None:
        """Run one job; its result line, or None if the budget ran out first."""
        t0 = time.perf_counter()
        over = {**job.overrides, **(quick_overrides(job) if self.quick else {})}
        folder = self.out / "runs" / job.key.replace("/", "_")
        if job.kind == "throughput":
            line = self.throughput(job, folder)
        elif job.kind == "run":
            m = self.cellmorph_run(job.config, over, folder)
            line = None if m is None else self.run_line(job, m, folder)
        elif job.kind == "nuclei_select":
            line = self.nuclei_select(job, over, folder)
        else:
            line = self.explain(job, folder)
        if line is None:
            return None
        return {"benchmark": job.benchmark, "key": job.key, **job.info, **line, "seconds": round(time.perf_counter() - t0, 1)}

    def throughput(self, job: Job, folder: Path) -> dict | None:
        args = [sys.executable, str(BENCH / "gpu_throughput.py"), "--device", self.device]
        if self.data:
            args += ["--data", str(self.data)]
        if job.info["compile"]:
            args.append("--compile")
        if self.quick:
            args += ["--model", "resnet18", "--batch", "32", "--size", "16", "--steps", "2"]
        log = folder.parent / f"{folder.name}.log"
        if not self.call(args, log):
            return None
        lines = [x for x in log.read_text().splitlines() if x.startswith("{")]
        return json.loads(lines[-1])

    @staticmethod
    def _where(folder: Path) -> dict:
        env = json.loads((folder / "environment.json").read_text())
        return {"device": env.get("device_name") or env.get("device"), "out": str(folder)}

    def run_line(self, job: Job, m, folder: Path) -> dict:
        line = {"model": m.context["model"], "init": m.context["init"], **self._where(folder)}
        if job.benchmark == "translocation":
            return {**line, **replicate_line(m)}
        line.update(level_fields(m))
        if job.benchmark == "loco_accuracy":
            t, i = m.level("treatment"), m.level("image")
            line.update({"treatments_correct": t.correct, "treatments_total": t.total, "image_accuracy": round(i.accuracy, 4),
                         "excluded": [x["group"] for x in m.excluded]})
        if job.benchmark == "nuclei":
            line["accuracy"] = round(m.level("image").accuracy, 4)
        return line

    def nuclei_select(self, job: Job, over: dict, folder: Path) -> dict | None:
        """Each candidate recipe scored on a validation split of the training nuclei (evaluation.validation);
        the best (ties: the first listed) then trains on the whole training split and is tested once."""
        val = {}
        names = job.info["candidates"][:2] if self.quick else job.info["candidates"]  # quick: two show the choice
        for name in names:
            # a candidate's own final model is never used: only the winner is trained again, on the whole training split
            m = self.cellmorph_run(f"nuclei/recipes/{name}", {**over, "save_model": False}, folder / "validation" / name)
            if m is None:
                return None
            val[name] = round(m.level("image").accuracy, 4)
        best = max(val, key=lambda k: (val[k], -names.index(k)))
        m = self.cellmorph_run(f"nuclei/recipes/{best}", {**over, "evaluation.validation": False}, folder / "test")
        if m is None:
            return None
        return {"model": m.context["model"], "init": m.context["init"], "candidates": names, "recipe": best, "validation_accuracy": val,
                "accuracy": round(m.level("image").accuracy, 4), **level_fields(m), **self._where(folder / "test")}

    def explain(self, job: Job, folder: Path) -> dict | None:
        run = self.out / "runs" / job.info["from"].replace("/", "_")
        weights = run / "folds" / "00" / "model.pt"
        if not weights.is_file():
            raise RuntimeError(f"explain needs {weights}: run the job {job.info['from']} first (it saves its fold models).")
        args = [sys.executable, "-m", "cellmorph", "explain", str(run / "config.toml"), "--weights", str(weights), "--out", str(folder)]
        if self.data:
            args += ["--data", str(self.data)]
        if self.quick:
            args += ["--steps", "2", "--images", "2", "--filters", "0"]
        if not self.call(args, folder.parent / f"{folder.name}.log"):
            return None
        return {"figures": sorted(str(p) for p in folder.glob("*.png")), "weights": str(weights)}


def _toml_value(v) -> str:
    """A `--set` value in TOML: strings quoted, lists and inline tables spelt out."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # str -> "...", bool -> true/false, numbers as they are


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/gpu"), help="results.jsonl and the run folders (rerun the same command to resume)")
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $CELLMORPH_DATA)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop cleanly after this many seconds (default 540: a 10-minute call with room to copy results)")
    ap.add_argument("--min-left-s", type=float, default=20, help="start no job with less budget than this left")
    ap.add_argument("--only", default="", help="comma-separated key prefixes, e.g. throughput,loco/tf_efficientnet_lite0")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="every job at tiny sizes, nuclei selection over its first two candidates (a CPU smoke; its lines say quick: true)")
    ap.add_argument("--list", action="store_true", help="print the jobs in order, with done/pending, and exit")
    args = ap.parse_args(argv)

    wanted = [w for w in args.only.split(",") if w]
    todo = [j for j in jobs() if not wanted or any(j.key.startswith(w) for w in wanted)]
    if not todo:
        print(f"--only {args.only!r} selects no job; --list prints the keys", file=sys.stderr)
        return 2
    suite = Suite(args.out, args.data, args.budget_s, args.device, args.quick)
    done = suite.done()
    if args.list:
        for j in todo:
            print(f"{'done   ' if j.key in done else 'pending'} {j.key}")
        return 0
    for j in todo:
        if j.key in done:
            continue
        if suite.left() < args.min_left_s:
            break
        print(f"suite: {j.key} ({suite.left():.0f} s of budget left)", file=sys.stderr, flush=True)
        try:
            line = suite.run(j)
        except RuntimeError as err:
            print(f"suite: {j.key} failed: {err}", file=sys.stderr)
            return 1
        if line is None:
            print(f"suite: budget spent during {j.key}; its finished folds are kept: rerun the same command to continue", file=sys.stderr)
            break
        suite.record(line)
    left = [j.key for j in todo if j.key not in suite.done()]
    print(f"suite: {len(todo) - len(left)}/{len(todo)} jobs done" + (f"; next: {left[0]}" if left else ""), file=sys.stderr)
    return INCOMPLETE if left else 0


if __name__ == "__main__":
    sys.exit(main())
