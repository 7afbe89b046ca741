"""The checkpoint fault matrix, with real trainer processes (``launch/train.py``): SIGKILL at
each point of a save (through ``CPMJAX_FAULT``, so every kill lands exactly where it says), a
damaged file of each kind in the newest steps, a disk that fills up. Each resume must start from
the newest complete and intact step, give bit-identical later losses, never load or re-seal a
damaged step (it is quarantined), and say what happened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cpmjax.train.checkpoint import INTEGRITY_FILE
from cpmjax.train.faults import FaultPlan
from tests.train import runs

# (fault point, step it hits, step the next run must resume from, what the next run must say)
KILLS = [
    ("before_write", 4, 2, None),
    ("mid_write", 6, 4, "checkpoint step 6 under .* was still being written when the previous "
                        "run stopped \\(its save never committed\\); discarding"),
    ("before_commit", 8, 6, "checkpoint step 8 under .* was still being written"),
    ("after_commit", 10, 8, "checkpoint step 10 under .* is partial: it has no "
                            f"{INTEGRITY_FILE} \\(orbax committed it but the run stopped before "
                            "sealing it.*moved it to .*quarantine/10-unsealed"),
    ("after_seal", 12, 12, None),
]


def test_fault_plan_parses_and_refuses_bad_specs() -> None:
    plan = FaultPlan("mid_write@6, enospc@8")
    assert plan.wants("mid_write", 6) and plan.wants("enospc", 8)
    assert not plan.wants("mid_write", 8) and not plan.wants("after_seal", 6)
    plan.hit("after_seal", 6)  # not planned: a no-op
    with pytest.raises(OSError, match="No space left on device"):
        plan.hit("enospc", 8)
    for bad in ("explode@3", "mid_write", "mid_write@x"):
        with pytest.raises(ValueError, match="CPMJAX_FAULT"):
            FaultPlan(bad)


def _listing(work: Path) -> dict[str, list[str]]:
    ck = work / "checkpoints"
    return {p.name: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
            for p in sorted(ck.iterdir()) if p.name != "quarantine"}


@pytest.fixture(scope="module")
def kill_chain(train_data: Path, jax_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """One workdir, one trainer killed at each point in turn; each next trainer resumes it.
    Returns the workdir and, per kill: (killed process, checkpoint folders right after the kill,
    the process that resumed after it)."""
    work = tmp_path_factory.mktemp("chain") / "run"
    kills = []
    for point, step, _, _ in KILLS:
        proc = runs.train(train_data, jax_cache, work, fault=f"{point}@{step}")
        kills.append((proc, _listing(work)))
    procs = [proc for proc, _ in kills] + [runs.train(train_data, jax_cache, work)]
    return work, [(proc, folders, procs[i + 1]) for i, (proc, folders) in enumerate(kills)]


@pytest.mark.parametrize("index", range(len(KILLS)), ids=[k[0] for k in KILLS])
def test_sigkill_at_each_point_of_a_save(kill_chain, index: int) -> None:
    work, stages = kill_chain
    point, step, resume_from, message = KILLS[index]
    killed, folders, resumed = stages[index]
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, at the fault point
    tmp = [n for n in folders if n.startswith(f"{step}.orbax-checkpoint-tmp")]
    if point == "before_write":
        assert not [n for n in folders if n.startswith(str(step))]
    elif point in ("mid_write", "before_commit"):
        assert str(step) not in folders and len(tmp) == 1 and folders[tmp[0]]
    elif point == "after_commit":
        assert INTEGRITY_FILE not in folders[str(step)]
    else:
        assert INTEGRITY_FILE in folders[str(step)]
    assert resumed.returncode in (0, -9), resumed.stderr[-2000:]
    assert f"resumed from step {resume_from}\n" in resumed.stdout
    assert "stopped without releasing it (killed); its lock is stale" in resumed.stdout
    if message is None:
        assert f"checkpoint step {step} " not in resumed.stderr
    else:
        assert re.search(message, resumed.stderr), resumed.stderr[-2000:]


def test_kill_chain_ends_bit_identical_with_one_row_per_step(kill_chain, reference_run) -> None:
    work, stages = kill_chain
    assert stages[-1][2].returncode == 0, stages[-1][2].stderr[-2000:]
    rows, want = runs.records(work), runs.by_step(reference_run)
    assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))  # once each, in order
    assert all(runs.same_numbers(r, want[r["step"]]) for r in rows)
    # the unsealed step was kept aside, never re-sealed; its step was saved afresh and sealed
    kept = work / "checkpoints" / "quarantine" / "10-unsealed"
    assert (kept / "state").is_dir() and not (kept / INTEGRITY_FILE).exists()
    assert (work / "checkpoints" / "10" / INTEGRITY_FILE).is_file()


def _flip_largest(folder: Path) -> str:
    victim = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    return str(victim.relative_to(folder.parent))


@pytest.fixture(scope="module")
def damaged_run(reference_run: Path, train_data: Path, jax_cache: Path, tmp_path_factory):
    """The reference run with one kind of damage in each of its four newest steps: array data
    (14), array metadata (12), the data-iterator state rewritten to other valid JSON (10, which
    orbax would load without complaint), the seal itself (8)."""
    work = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(reference_run, work)
    ck = work / "checkpoints"
    damaged = {14: _flip_largest(ck / "14" / "state")}
    meta = ck / "12" / "state" / "_METADATA"
    meta.write_text(meta.read_text().replace('"', "'", 1))
    (ck / "10" / "data" / "metadata").write_text('{"next_index": 3}')
    (ck / "8" / INTEGRITY_FILE).write_text('{"truncated')
    resumed = runs.train(train_data, jax_cache, work)
    return work, resumed, damaged


CHANGED = "1 file\\(s\\) missing, added or changed since it was sealed, e.g."


@pytest.mark.parametrize("step,kind,reason,why", [
    (14, "array data", "damaged", f"{CHANGED} state/ocdbt"),
    (12, "array metadata", "damaged", f"{CHANGED} state/_METADATA"),
    (10, "iterator state", "damaged", f"{CHANGED} data/metadata"),
    (8, "seal", "bad-seal", f"its {INTEGRITY_FILE} is unreadable"),
])
def test_damaged_step_is_quarantined_never_loaded(damaged_run, step, kind, reason, why) -> None:
    work, resumed, _ = damaged_run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(f"checkpoint step {step} under \\S+ is damaged: {why}[^\\n]*moved it to "
                     f"\\S+quarantine/{step}-{reason} \\(kept, never loaded", resumed.stderr), kind
    assert (work / "checkpoints" / "quarantine" / f"{step}-{reason}" / "state").is_dir()


def test_damaged_steps_resume_from_newest_intact_bit_identical(damaged_run,
                                                               reference_run) -> None:
    work, resumed, damaged = damaged_run
    assert "resumed from step 6\n" in resumed.stdout
    rows, want = runs.records(work), runs.by_step(reference_run)
    assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))
    assert all(runs.same_numbers(r, want[r["step"]]) for r in rows)
    # the quarantined copy keeps its damage (nothing re-sealed over it)
    bad = work / "checkpoints" / "quarantine" / "14-damaged" / damaged[14]
    assert bad.read_bytes() != (reference_run / "checkpoints" / "14" / damaged[14]).read_bytes()


def test_disk_full_during_the_write_stops_at_once_with_one_line(train_data, jax_cache,
                                                                tmp_path) -> None:
    """The background write of step 6 fails with ENOSPC: the run stops within a step, with one
    line naming the step, the cause and where a rerun resumes; step 6 is never committed."""
    work = tmp_path / "run"
    done = runs.train(train_data, jax_cache, work, fault="enospc@6")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("train: error: checkpoint save of step 6 under ")
    assert "failed: no space left on device" in lines[-1]
    assert "a rerun resumes from step 4, the newest complete one" in lines[-1]
    assert len(lines) < 8, done.stderr  # orbax's own tracebacks are not repeated
    assert max(runs.by_step(work)) <= 8
    assert sorted(p.name for p in (work / "checkpoints").iterdir()
                  if not p.name.startswith("6.")) == ["2", "4"]
    assert (work / "checkpoints" / "4" / INTEGRITY_FILE).is_file()


def _can_mount_tmpfs(where: Path) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs "
                            f"{where}"], capture_output=True)
    return probe.returncode == 0


def test_real_full_disk_refuses_the_save_that_cannot_fit(train_data, jax_cache,
                                                         tmp_path) -> None:
    """A 4 MB tmpfs (private mount namespace): the trainer refuses the first save that cannot
    fit before writing any of it, in one line, with the earlier steps intact."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    if shutil.which("unshare") is None or not _can_mount_tmpfs(mount):
        pytest.skip("this machine does not allow a private tmpfs mount (unshare -rm); the "
                    "fault-injected ENOSPC test above covers the failure path")
    script = ('mount -t tmpfs -o size=4m tmpfs "$0" && "$@"; rc=$?; '
              'find "$0/run/checkpoints" -name ' + INTEGRITY_FILE + '; exit $rc')
    done = runs.train(train_data, jax_cache, mount / "run",
                      wrap=["unshare", "-rm", "sh", "-c", script, str(mount)])
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "refused: no space left on device for it" in last, done.stderr[-2000:]
    refused = int(last.split("checkpoint save of step ")[1].split()[0])
    assert f"a rerun resumes from step {refused - 2}, the newest complete one" in last
    sealed = sorted(int(Path(p).parent.name) for p in done.stdout.split() if INTEGRITY_FILE in p)
    assert sealed == list(range(2, refused, 2))
