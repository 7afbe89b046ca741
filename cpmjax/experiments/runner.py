"""Run a study: every (variant, seed) run through a backend, resumable, with a progress view.

``run_study(study, out_dir)`` writes ``<out>/study.json``, one folder per run
(``cpmjax.experiments.rundir``), ``<out>/progress.md`` while it runs and the comparison
(``cpmjax.experiments.report``) at the end. Finished runs (``result.json`` under the same config
hash) are skipped; an interrupted or crashed run starts again and the training loop resumes it
from its newest good checkpoint (a crashed run gets ``max_attempts`` tries in one call). One failed
run does not stop the others; it is marked failed in the table, and the next call retries it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections

from cpmjax.atomic import write_json, write_text
from cpmjax.experiments import report, rundir
from cpmjax.experiments.backends import Backend, Job, make_backend
from cpmjax.experiments.study import Run, expand_runs

DONE, RUNNING, QUEUED, FAILED = "done", "running", "queued", "failed"


def evaluate_spec(study: ml_collections.ConfigDict) -> dict[str, Any]:
    return study.indicator.to_dict()


def progress_view(study: str, runs: list[Run], states: dict[str, str],
                  run_dirs: dict[str, Path], elapsed: float) -> str:
    """Which runs are done, running, queued or failed, each with its latest logged loss."""
    counts = {s: sum(v == s for v in states.values()) for s in (DONE, RUNNING, QUEUED, FAILED)}
    head = (f"study {study}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f" ({elapsed:.0f}s)")
    width = max(len(r.name) for r in runs)
    lines = [head]
    for r in runs:
        recs = rundir.read_metrics(run_dirs[r.name])
        last = recs[max(recs)] if recs else {}
        evals = [v["eval_loss"] for v in recs.values() if v.get("eval_loss") is not None]
        bits = [f"step {last.get('step', 0)}/{r.config.train.steps}"]
        if last.get("loss") is not None:
            bits.append(f"loss {last['loss']:.4f}")
        if evals:
            bits.append(f"eval {evals[-1]:.4f}")
        lines.append(f"  {r.name:<{width}}  {states[r.name]:<7}  " + "  ".join(bits))
    return "\n".join(lines)


def _initial_state(run: Run, run_dir: Path, evaluate: dict[str, Any]) -> str:
    result = rundir.read_result(run_dir)
    if result is None:
        return QUEUED
    # finished, but evaluated for fewer things than the study now asks for: evaluate again
    wants = evaluate.get("enabled") and "indicator" not in result or (
        evaluate.get("accuracy") and "accuracy" not in result)
    return QUEUED if wants else DONE


def run_study(study: ml_collections.ConfigDict, out_dir: str | Path, *,
              backend: Backend | None = None, poll_s: float = 1.0, refresh_s: float = 15.0,
              echo: Callable[[str], None] = print, command: str = "") -> list[dict[str, Any]]:
    """Run every unfinished run of ``study`` under ``out_dir``; the table's rows."""
    runs = expand_runs(study)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study.to_dict())
    run_dirs = {r.name: out / "runs" / r.name for r in runs}
    evaluate = evaluate_spec(study)
    for r in runs:
        rundir.prepare(r, run_dirs[r.name], study.name, evaluate)
    states = {r.name: _initial_state(r, run_dirs[r.name], evaluate) for r in runs}
    queue = [r for r in runs if states[r.name] == QUEUED]
    skipped = len(runs) - len(queue)
    if skipped:
        echo(f"{skipped} finished run(s) skipped")
    backend = backend or (make_backend(study) if queue else None)
    attempts: dict[str, int] = {}
    running: dict[str, Job] = {}
    t0, last_states, last_shown = time.time(), [], 0.0
    restore = _sigterm_raises()
    try:
        while queue or running:
            while queue and len(running) < backend.slots:
                r = queue.pop(0)
                attempts[r.name] = attempts.get(r.name, 0) + 1
                steps = rundir.checkpoint_steps(run_dirs[r.name])
                how = f"resuming from step {steps[-1]}" if steps else "starting"
                echo(f"{r.name}: {how} (attempt {attempts[r.name]})")
                running[r.name] = backend.start(run_dirs[r.name])
                states[r.name] = RUNNING
            for name, job in list(running.items()):
                rc = job.poll()
                if rc is None:
                    continue
                del running[name]
                run = next(r for r in runs if r.name == name)
                states[name] = _finished(run, run_dirs[name], rc, backend, echo)
                if states[name] == FAILED and attempts[name] < study.max_attempts:
                    queue.insert(0, run)
                    states[name] = QUEUED
            view = progress_view(study.name, runs, states, run_dirs, time.time() - t0)
            write_text(out / "progress.md", view + "\n")
            snapshot = sorted(states.items())
            if snapshot != last_states or time.time() - last_shown > refresh_s:
                echo(view)
                last_states, last_shown = snapshot, time.time()
            if running:
                time.sleep(poll_s)
    except BaseException:
        for job in running.values():
            job.cancel()
        raise
    finally:
        restore()
        if backend is not None:
            backend.close()
    rows = [report.run_row(r.name, r.variant, r.seed, states[r.name], run_dirs[r.name])
            for r in runs]
    paths = report.write_report(out, study.name, rows, run_dirs, command)
    echo(progress_view(study.name, runs, states, run_dirs, time.time() - t0))
    echo(f"table: {paths['markdown']}  {paths['csv']}; curves under {out / 'curves'}")
    return rows


def study_rows(study: ml_collections.ConfigDict, out_dir: str | Path) -> list[dict[str, Any]]:
    """The table's rows from what is on disk, running nothing: finished runs are ``done``,
    the others ``missing`` (for analysing a study that is still running or was stopped)."""
    out = Path(out_dir).absolute()
    rows = []
    for r in expand_runs(study):
        d = out / "runs" / r.name
        status = DONE if rundir.read_result(d) is not None else "missing"
        rows.append(report.run_row(r.name, r.variant, r.seed, status, d))
    return rows


def _sigterm_raises() -> Callable[[], None]:
    """While the runner waits, SIGTERM raises (so running jobs are cancelled as on Ctrl-C,
    instead of left behind); returns what restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _finished(run: Run, run_dir: Path, rc: int, backend: Backend,
              echo: Callable[[str], None]) -> str:
    if rc != 0:
        tail = (run_dir / rundir.LOG).read_text(errors="replace").strip().splitlines()[-3:]
        echo(f"{run.name}: failed (exit {rc}); log {run_dir / rundir.LOG}: " + " | ".join(tail))
        return FAILED
    if not backend.evaluates:
        from cpmjax.experiments.worker import finish

        finish(run_dir)
    if rundir.read_result(run_dir) is None:
        echo(f"{run.name}: exited 0 without a result.json; counted as failed")
        return FAILED
    return DONE
