"""MetaSchedule tuning with a persistent database.

The database is keyed by target (one directory per target, named by a hash of its JSON) and by
workload (MetaSchedule's structural hash of each fused TIR function). Tasks that already have a
record are never tuned again, so recompiling a model, or compiling another model that shares
workloads (same hidden size, same bucket shapes), runs no new trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from optc.errors import OptcError

# Tasks MetaSchedule cannot measure with random inputs: an embedding gather (`take`) reads out of
# bounds with random indices and crashes the runner. They keep TVM's default schedule.
UNTUNABLE = ("take", "gather")
TASKS_PER_ROUND = 1  # the time limit is checked between rounds: one task keeps the overshoot short


def default_cache_dir() -> Path:
    if os.environ.get("OPTC_TUNING_CACHE"):
        return Path(os.environ["OPTC_TUNING_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc" / "tvm-tuning"


def database_dir(root: Path, target_json: dict) -> Path:
    key = hashlib.sha256(json.dumps(target_json, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / key


def open_database(root: Path, target_json: dict):
    from tvm.s_tir import meta_schedule as ms

    d = database_dir(root, target_json)
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "target.json").write_text(json.dumps(target_json, sort_keys=True, indent=1) + "\n")
    except OSError as e:
        raise OptcError(f"{d}: cannot create the tuning database ({e.strerror})") from None
    try:
        return ms.database.JSONDatabase(path_workload=str(d / "workloads.json"),
                                        path_tuning_record=str(d / "records.json"),
                                        module_equality="structural")
    except Exception as e:
        raise OptcError(f"{d}: the tuning database is unreadable ({str(e).splitlines()[0]}); delete it to "
                        f"start afresh") from None


def register_cpu_tensor_intrinsics() -> None:
    """MetaSchedule's TuneContext imports `tvm.s_tir.tensor_intrin`, which parses the tensor
    intrinsics of every target (CUDA, ARM, x86, ROCm, Hexagon, RISC-V) with TVMScript: 75-150 s
    here, because the parser calls inspect.getmodule, whose cost grows with sys.modules. CPU
    tuning needs the x86 ones only (0.3 s): install the package without its __init__ so that
    importing it is a no-op and any other submodule still imports on demand."""
    import importlib
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir

    package = types.ModuleType(name)
    package.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    package.__package__ = name
    sys.modules[name] = package
    tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{name}.x86")


def fast_build(mod, target, _params):
    """MetaSchedule's default build without its `import tvm.s_tir.tensor_intrin` (25-34 s in every
    fresh worker here, which ran into the builder's timeout on every trial)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


DEFAULTS_FILE = "default_schedules.json"


def _default_schedule(func, target):
    """optc's default schedule of a task (schedules/cpu), or the untouched function."""
    from tvm import s_tir

    from optc.backends.tvm.schedules.cpu import default_rules

    with target:
        for rule in default_rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch
    return s_tir.Schedule(func)


def measure_defaults(tasks, target, database, db_dir: Path, builder, runner, log) -> dict[str, float]:
    """Seconds per call of each task's default schedule, measured once per workload and kept
    beside the database (keyed by structural hash). Each measurement is also committed as a
    tuning record: tuning then starts from it, and a tuned schedule replaces it only where it
    measured faster."""
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi import structural_hash

    path = Path(db_dir) / DEFAULTS_FILE
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        known = {}
    todo = [t for t in tasks if str(structural_hash(t.dispatched[0])) not in known]
    if todo:
        log(f"tuning: measuring the default schedules of {len(todo)} tasks (once per workload)")
        schedules = [_default_schedule(t.dispatched[0]["main"], target) for t in todo]
        built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in schedules])
        errors = []
        for task, sch, b in zip(todo, schedules, built):
            key = str(structural_hash(task.dispatched[0]))
            secs, error = None, b.error_msg
            if error is None:
                args = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
                result = runner.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args)])[0].result()
                error = result.error_msg
                if error is None and result.run_secs:
                    secs = [float(x) for x in result.run_secs]
                    workload = database.commit_workload(task.dispatched[0])
                    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, secs, target, args))
            if secs is None:
                errors.append((task.task_name, (error or "no time measured").strip().splitlines()[-1]))
            known[key] = sum(secs) / len(secs) if secs else None
        if errors:  # those tasks rank by nothing and start tuning from scratch: say so
            log(f"tuning: warning: {len(errors)} of {len(todo)} default schedules could not be measured "
                f"(first: {errors[0][0]}: {errors[0][1][:200]})")
        path.write_text(json.dumps(known, sort_keys=True, indent=0) + "\n")
    return known


def tuned_already(database, task) -> bool:
    """More than the default schedule's record: this workload went through tuning."""
    if not database.has_workload(task.dispatched[0]):
        return False
    return len(database.get_top_k(database.commit_workload(task.dispatched[0]), 2)) >= 2


def _scheduled(task) -> bool:
    attrs = task.dispatched[0]["main"].attrs
    return bool(attrs and attrs.get("tirx.is_scheduled", False))


def task_priorities(mod, target, latency: dict[str, float] | None = None) -> dict[int, float]:
    """Each workload's share of its bucket's cost, taking the largest over buckets (keyed by
    structural hash). The cost is the measured latency of its default schedule where there is
    one, else its FLOPs. Every bucket (prefill, decode at each cache size) counts the same: a
    decode GEMV matters as much to decode latency as a 512-token GEMM to prefill latency."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm_ffi import structural_hash

    share: dict[int, float] = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        # this bucket's function and the TIR functions it calls
        alone = tvm.IRModule({g: f for g, f in mod.functions.items()
                              if not isinstance(f, relax.Function) or g.same_as(gv)})
        one = relax.transform.DeadCodeElimination([gv.name_hint])(alone)
        tasks = ms.relax_integration.extract_tasks(one, target, module_equality="structural")
        costs = []
        for t in tasks:
            key = structural_hash(t.dispatched[0])
            measured = (latency or {}).get(str(key))
            if latency is not None:  # unmeasurable tasks (gathers): a microsecond, they are cheap
                cost = measured if measured is not None else 1e-6
            else:
                try:
                    cost = max(float(estimate_tir_flops(t.dispatched[0])), 1.0)
                except Exception:  # estimation fails on some index-heavy functions
                    cost = 1.0
            costs.append((key, cost * t.weight))
        total = sum(c for _, c in costs) or 1.0
        for key, c in costs:
            share[key] = max(share.get(key, 0.0), c / total)
    return share


def tune(mod, target, database, *, trials: int, time_limit: float | None, trials_per_task: int = 32,
         db_dir: Path | None = None, log=print) -> dict:
    """Tune the tasks of `mod` (a fused Relax module), the heaviest first, `trials_per_task`
    each, as far as `trials` reach; tasks the database has tuned already cost nothing. "Heaviest"
    is the measured latency of optc's default schedule (measured once per workload, kept in
    `db_dir`). Returns what happened."""
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi import structural_hash

    if trials <= 0:
        log("tuning: --tune-trials 0: the database's schedules where it has them, optc's default schedules elsewhere")
        return {"tasks": None, "from_database": None, "untunable": None, "selected": 0, "new_tasks": 0,
                "trials": 0, "seconds": 0.0}
    trials_per_task = max(1, min(trials_per_task, trials))
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target, module_equality="structural")
                 if not _scheduled(t)]  # optc's own kernels (kernels/attention) come scheduled
    tunable = [t for t in extracted if not any(word in t.task_name for word in UNTUNABLE)]
    skipped = [t for t in extracted if t not in tunable]
    import logging

    # MetaSchedule logs every batch and a task table to stdout at INFO; optc reports progress itself
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    register_cpu_tensor_intrinsics()
    builder = ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=60)
    runner = ms.runner.LocalRunner(timeout_sec=30)
    latency = measure_defaults(tunable, target, database, db_dir, builder, runner, log) if db_dir else None
    # The tasks worth tuning are chosen from all of them, tuned before or not, so that a
    # recompile with the same budget selects the same tasks, finds them all in the database and
    # runs no trials (and writes the same library).
    share = task_priorities(mod, target, latency)
    tunable.sort(key=lambda t: -share.get(structural_hash(t.dispatched[0]), 0.0))
    selected = tunable[: max(1, trials // trials_per_task)]
    known = [t for t in tunable if tuned_already(database, t)]
    known_ids = {id(t) for t in known}
    todo = [t for t in selected if id(t) not in known_ids]
    stats = {"tasks": len(extracted), "from_database": len(known), "untunable": len(skipped),
             "selected": len(selected), "new_tasks": len(todo), "trials": 0, "seconds": 0.0}
    default = len(tunable) - len(known) - len(todo)
    log(f"tuning: {len(extracted)} tasks; {len(known)} tuned in the database already, {len(todo)} to tune now "
        f"({trials_per_task} trials each), {default} keep optc's default schedule"
        + (" (raise --tune-trials to tune more)" if default else "")
        + (f"; {len(skipped)} cannot be measured with random inputs ({', '.join(sorted(t.task_name for t in skipped)[:4])}"
           f"{', ...' if len(skipped) > 4 else ''})" if skipped else ""))
    if not todo:
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        return stats
    budget = trials_per_task * len(todo)
    progress = _Progress(todo, budget, time_limit, log, start=t0)
    # Tasks are tuned one at a time: MetaSchedule reports a task's measurements only when its
    # scheduler comes back to it, so one call over all tasks would give no progress and could not
    # stop at the time limit. The cost model is shared, so what it learns carries over.
    cost_model = ms.cost_model.XGBModel(num_warmup_samples=trials_per_task)
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(), progress.callback()]
    with tempfile.TemporaryDirectory(prefix="optc-tune-") as work_dir:
        try:
            for start in range(0, len(todo), TASKS_PER_ROUND):
                if progress.out_of_time():
                    break
                group = todo[start:start + TASKS_PER_ROUND]
                progress.begin(start)
                contexts, weights = _tune_contexts(group, seed=start)
                ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                                   max_trials_global=trials_per_task * len(group),
                                   max_trials_per_task=trials_per_task, num_trials_per_iter=trials_per_task,
                                   builder=builder, runner=runner, database=database, cost_model=cost_model,
                                   measure_callbacks=callbacks)
        except Exception as e:
            raise OptcError(f"tuning failed in workload {progress.current_name()!r} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        finally:
            progress.close()
    stats["trials"] = progress.trials
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["stopped_by_time_limit"] = progress.timed_out
    return stats


def _tune_contexts(tasks, seed: int):
    """MetaSchedule's extracted_tasks_to_tune_contexts without its loggers: those print a task
    table and every batch to stdout (optc reports progress itself) and a log directory line."""
    import logging

    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    quiet = logging.getLogger("optc.backends.tvm.tuning.tasks")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    seeds = np.random.RandomState(seed=seed).randint(1, 2 ** 30, size=len(tasks)).tolist()
    contexts = [ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=t.task_name, logger=quiet,
                               rand_state=s, num_threads="physical").clone() for t, s in zip(tasks, seeds)]
    return contexts, [float(t.weight) for t in tasks]


class _Progress:
    """Trials done, the estimated total latency of the tuned tasks, and the time limit."""

    def __init__(self, tasks, trials: int, time_limit: float | None, log, start: float | None = None):
        self.tasks = tasks
        self.best = [None] * len(tasks)
        self.weights = [t.weight for t in tasks]
        self.offset = 0  # index of the current round's first task
        self.trials, self.total = 0, trials
        self.time_limit, self.start = time_limit, start if start is not None else time.perf_counter()
        self.timed_out, self.current = False, None
        self.log = log
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("tuning"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
                                TextColumn("{task.fields[best]}"), TimeElapsedColumn(), transient=True)
            self.bar_task = self.bar.add_task("tune", total=trials, best="")
            self.bar.start()

    def begin(self, offset: int) -> None:
        self.offset = offset
        self.current = offset

    def current_name(self) -> str:
        return self.tasks[self.current].task_name if self.current is not None else "?"

    def out_of_time(self) -> bool:
        elapsed = time.perf_counter() - self.start
        if self.time_limit is not None and elapsed > self.time_limit:
            self.timed_out = True
            done = sum(b is not None for b in self.best)
            self.log(f"tuning: time limit of {self.time_limit:.0f}s reached after {self.trials} trials; "
                     f"{len(self.best) - done} tasks left untuned (what was measured is in the database)")
            return True
        return False

    def estimate(self) -> str:
        done = [(b, w) for b, w in zip(self.best, self.weights) if b is not None]
        if not done:
            return "no valid measurement yet"
        return (f"best latencies of the {len(done)}/{len(self.best)} tuned tasks, times their use, sum to "
                f"{sum(b * w for b, w in done) * 1e3:.2f} ms")

    def callback(self):
        from tvm.ir.utils import derived_object
        from tvm.s_tir import meta_schedule as ms

        progress = self

        @derived_object
        class _Callback(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                progress.on_results(task_scheduler, task_id, runner_results)

        return _Callback()

    def on_results(self, scheduler, task_id: int, runner_results) -> None:
        index = self.offset + task_id
        self.current = index
        self.trials += len(runner_results)
        for r in runner_results:
            if r.error_msg is None and r.run_secs:
                secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                if self.best[index] is None or secs < self.best[index]:
                    self.best[index] = secs
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(self.bar_task, completed=min(self.trials, self.total), best=self.estimate())
        else:
            self.log(f"tuning: {self.trials}/{self.total} trials, {elapsed:.0f}s; {self.estimate()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.log(f"tuning: {self.trials} trials in {time.perf_counter() - self.start:.0f}s; {self.estimate()}")
