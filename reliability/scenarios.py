"""The faults: each scenario injects one kind, recovers as a user would (rerun the same
command), and reports whether anything was lost."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

from harness import (
    REPO,
    Row,
    env,
    final_state,
    free_port,
    losses,
    nothing_lost,
    run,
    saving,
    start,
    t2x,
    tail,
    train_cmd,
    wait_for,
)

STEPS = 40


def reference(work: pathlib.Path, steps: int = STEPS) -> pathlib.Path:
    """An uninterrupted run, trained once and shared."""
    path = work / f"reference-{steps}"
    if not (path / "checkpoints").exists():
        result = run(train_cmd(path, f"train.steps={steps}"))
        if result.returncode:
            raise RuntimeError(f"the reference run failed: {tail(result.stderr, 10)}")
    return path


def random_kills(work: pathlib.Path, kills: int, seed: int = 0) -> Row:
    """``kill -9`` at random moments, about half of them inside an async save (and the
    retention that runs beside it); rerun after each. A run that finishes before the
    next kill lands is checked and started afresh."""
    rng = random.Random(seed)
    ref = reference(work)
    victim = work / "killed"
    moments = {"random": 0, "saving": 0}
    landed, runs, problems = 0, 0, []

    def check_finished():
        nonlocal runs
        runs += 1
        lost = nothing_lost(victim, ref)
        if lost != "none":
            problems.append(lost)
        shutil.rmtree(victim)

    while landed < kills:
        proc = start(train_cmd(victim, f"train.steps={STEPS}"))
        kind = rng.choice(list(moments))
        if kind == "random":
            wait_for(lambda: False, proc, timeout=rng.uniform(2, 25))  # some seconds, unless it ends first
        elif wait_for(lambda: saving(victim), proc, timeout=120):
            time.sleep(rng.uniform(0, 0.05))  # somewhere in the save, or in the deletes beside it
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            landed += 1
            moments[kind] += 1
            continue
        _, err = proc.communicate()
        if proc.returncode:
            problems.append(f"a rerun failed: {tail(err)}")
            break
        check_finished()
    finished = run(train_cmd(victim, f"train.steps={STEPS}"))
    if finished.returncode:
        problems.append(f"the last rerun failed: {tail(finished.stderr)}")
    else:
        check_finished()
    detail = (f"{moments['random']} at random moments, {moments['saving']} during an async save and the retention "
              f"beside it; rerun after each; {runs} run(s) of {STEPS} steps")
    return Row("`kill -9` at random moments", kills, 0 if problems else kills, "; ".join(problems) or "none", detail)


def sigterms(work: pathlib.Path) -> list[Row]:
    """SIGTERM during training, during an in-flight async save, and a second one during
    that save: the run saves the step it stopped at, exits 0, and resumes."""
    ref = reference(work)
    rows = []
    for name, second in (("during training", None), ("during an async save", None), ("twice during a save", 0.05)):
        victim = work / f"sigterm-{name.replace(' ', '-')}"
        proc = start(train_cmd(victim, f"train.steps={STEPS}"))
        if name == "during training":
            wait_for(lambda: len(losses(victim)) >= 10, proc)
        else:
            wait_for(lambda: len(losses(victim)) >= 5 and saving(victim), proc)
        proc.send_signal(signal.SIGTERM)
        if second is not None:
            time.sleep(second)
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        ok = proc.returncode == 0
        try:
            stopped = json.loads(out)
            ok = ok and stopped.get("preempted") is True
            state = final_state(victim)  # the checkpoint of the step it stopped at, verified
            ok = ok and int(state.step) == stopped["step"]
        except Exception as e:  # reported in the table
            ok, stopped = False, {"error": str(e)}
        resumed = run(train_cmd(victim, f"train.steps={STEPS}"))
        ok = ok and resumed.returncode == 0
        lost = nothing_lost(victim, ref) if resumed.returncode == 0 else f"resume failed: {tail(resumed.stderr)}"
        rows.append(Row(f"SIGTERM {name}", 1, int(ok), lost,
                        f"exit {proc.returncode}, saved and stopped at step {stopped.get('step')}, resumed to {STEPS}"))
    return rows


def _largest_file(step_dir: pathlib.Path, item: str = "params") -> pathlib.Path:
    return max((p for p in (step_dir / item).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _half_delete(step_dir):
    os.remove(step_dir / "_CHECKPOINT_METADATA")  # what a delete that is not a rename removes first
    shutil.rmtree(step_dir / "opt_state")


# name: (damage, whether `t2x eval`, which reads parameters only, sees it)
DAMAGE = {
    "truncated file": (lambda d: os.truncate(_largest_file(d), 1000), True),
    "deleted file": (lambda d: os.remove(_largest_file(d, "opt_state")), False),
    "flipped bit": (_flip, True),
    "deleted metadata": (lambda d: os.remove(d / "data" / "metadata"), False),
    "half-deleted step": (_half_delete, True),
}


def damaged_checkpoints(work: pathlib.Path) -> list[Row]:
    """Each kind of damage to the newest checkpoint: detected with a message (or, for a
    half-deleted step, never listed), fallen back from, and the run ends where an
    undamaged one would."""
    ref = reference(work)
    rows = []
    for name, (damage, eval_sees) in DAMAGE.items():
        victim = work / f"damage-{name.replace(' ', '-')}"
        shutil.copytree(ref, victim)
        newest = max(int(p.name) for p in (victim / "checkpoints").iterdir() if p.name.isdigit())
        damage(victim / "checkpoints" / str(newest))
        evaluated = run(t2x("eval", str(victim), "--step", str(newest)))
        said = evaluated.returncode == 1 and (
            "is damaged" in evaluated.stderr or f"no checkpoint of step {newest}" in evaluated.stderr
        ) if eval_sees else evaluated.returncode == 0
        rerun = run(train_cmd(victim, f"train.steps={STEPS}"))
        detected = "is damaged" in rerun.stderr or name == "half-deleted step"
        ok = said and detected and rerun.returncode == 0
        lost = nothing_lost(victim, ref) if rerun.returncode == 0 else f"rerun failed: {tail(rerun.stderr)}"
        message = next((line for line in rerun.stderr.splitlines() if "is damaged" in line), "")
        if message:
            message = f"\"damaged: {message.split('is damaged: ', 1)[1][:150]}\"; resumed from the step before"
        else:
            message = "not listed; resumed from the step before"
        rows.append(Row(f"damaged checkpoint: {name}", 1, int(ok), lost, message.replace("|", "/")))
    return rows


def disk_full(work: pathlib.Path) -> Row:
    """A save that cannot be written (files limited to 1 MB, as a full disk fails writes):
    the error is reported, the previous checkpoint stays intact, nothing partial is left,
    and a rerun with room finishes."""
    ref = reference(work)
    victim = work / "disk-full"
    first = run(train_cmd(victim, "train.steps=8"))
    full = run(train_cmd(victim, f"train.steps={STEPS}"), file_size_limit=1 << 20)
    reported = full.returncode == 1 and "saving the checkpoint of step" in full.stderr
    listed = sorted(p.name for p in (victim / "checkpoints").iterdir())
    clean = not any("tmp" in name for name in listed)
    rerun = run(train_cmd(victim, f"train.steps={STEPS}"))
    ok = first.returncode == 0 and reported and clean and rerun.returncode == 0
    lost = nothing_lost(victim, ref) if rerun.returncode == 0 else f"rerun failed: {tail(rerun.stderr)}"
    message = next((line for line in full.stderr.splitlines() if "saving the checkpoint" in line), tail(full.stderr))
    return Row("disk full during a save", 1, int(ok), lost, message.split("error: ", 1)[-1][:200].replace("|", "/"))


def _write_tfrecords(path: pathlib.Path, texts: list[str], corrupt: int | None = None) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for t in texts:
            feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    if corrupt is None:
        return
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(corrupt):  # to the start of record `corrupt`
        offset += 16 + int.from_bytes(data[offset:offset + 8], "little")
    data[offset + 12 + 5] ^= 0xFF  # inside its data: the data checksum fails
    path.write_bytes(bytes(data))


def bad_data(work: pathlib.Path) -> list[Row]:
    """Invalid UTF-8, NUL bytes, a 100 MB single line, empty files, a file deleted while
    the run reads it, a TFRecord with a corrupt record: counted, skipped with a warning,
    training finishes; with data.strict the first one stops the run naming it."""
    rng = random.Random(1)
    words = "parse the value of a list and return its items in order".split()
    good = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(600)]
    corpus = work / "bad-corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(8):  # small files, so that the shards start new epochs (and reopen their files) often
        (corpus / f"good-{i}.txt").write_text("\n".join(good[25 * i:25 * (i + 1)]) + "\n")
    (corpus / "bytes.txt").write_bytes("\n".join(good[:20]).encode() + b"\ncaf\xe9 \xff\xfe broken\nnul \x00 inside\n")
    with open(corpus / "huge.txt", "wb") as f:
        f.write("\n".join(good[20:40]).encode() + b"\n")
        f.write(b"z" * (100 << 20) + b"\n")  # one 100 MB line
    (corpus / "empty.txt").write_bytes(b"")
    data = ["data.source=files", f"data.train_files=[{corpus}/*.txt]", f"data.eval_files=[{corpus}/good-0.txt]",
            "data.num_shards=4", "data.tokenizer=builtin:512", "model.vocab_size=512"]
    run_dir = work / "bad-data"
    proc = start(train_cmd(run_dir, "train.steps=80", "checkpoint.every=100", *data))
    wait_for(lambda: len(losses(run_dir)) >= 5, proc)
    (corpus / "good-3.txt").unlink()  # deleted while the run reads it (its shard has other files)
    out, err = proc.communicate(timeout=900)
    counts = {}
    if (run_dir / "metrics.jsonl").exists():
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        counts = [r for r in records if r["split"] == "train" and "invalid_utf8" in r][-1]
    kinds = ("invalid_utf8", "oversized_documents", "unreadable_files")
    ok = proc.returncode == 0 and all(counts.get(k, 0) >= 1 for k in kinds)
    rows = [Row("bad text data (invalid UTF-8, NUL bytes, 100 MB line, empty file, file deleted mid-run)", 5, int(ok) * 5,
                "none (bad records skipped by design)" if ok else tail(err),
                ", ".join(f"{k} {counts.get(k)}" for k in ("documents", *kinds)))]
    strict = run(train_cmd(work / "bad-data-strict", "train.steps=4", "data.strict=true", *data))
    ok = strict.returncode == 1 and "data.strict" in strict.stderr
    rows.append(Row("bad text data with data.strict", 1, int(ok), "none (nothing written past the check)",
                    tail(strict.stderr, 1).split("error: ", 1)[-1][:200].replace("|", "/")))
    records = corpus / "tf"
    records.mkdir(exist_ok=True)
    for i in range(4):
        _write_tfrecords(records / f"part-{i}.tfrecord", good[150 * i:150 * (i + 1)], corrupt=7 if i == 2 else None)
    tf_run = work / "bad-tfrecord"
    result = run(train_cmd(tf_run, "train.steps=20", "checkpoint.every=100", "data.source=files",
                           f"data.train_files=[{records}/*.tfrecord]", f"data.eval_files=[{records}/part-0.tfrecord]",
                           "data.num_shards=4", "data.tokenizer=builtin:512", "model.vocab_size=512"))
    counts = {}
    if (tf_run / "metrics.jsonl").exists():
        counts = [json.loads(x) for x in (tf_run / "metrics.jsonl").read_text().splitlines()
                  if '"corrupt_records"' in x and '"split": "train"' in x][-1]
    ok = result.returncode == 0 and counts.get("corrupt_records", 0) >= 1
    rows.append(Row("TFRecord with a corrupt record", 1, int(ok), "none (the record is skipped by design)",
                    f"corrupt_records {counts.get('corrupt_records')}, documents {counts.get('documents')}"))
    return rows


MULTI = ["mesh.data=2", "mesh.fsdp=4"]


def _job(run_dir, *overrides, port: int):
    """Two processes of 4 CPU devices each, started directly (as launchers do)."""
    return [
        start(train_cmd(run_dir, *MULTI, *overrides, f"distributed.coordinator_address=127.0.0.1:{port}",
                        "distributed.num_processes=2", f"distributed.process_id={i}"), env=env(4))
        for i in range(2)
    ]


def multi_host(work: pathlib.Path) -> list[Row]:
    rows = []
    # One process of two killed: the other exits non-zero within 60 s, naming it.
    run_dir = work / "multi-kill"
    procs = _job(run_dir, "train.steps=100000", "checkpoint.every=100000", "distributed.heartbeat_timeout=60",
                 port=free_port())
    wait_for(lambda: len(losses(run_dir)) >= 5, procs[0], timeout=300)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=300)
    seconds = time.time() - killed
    ok = procs[0].returncode not in (0, None, -6, 134) and seconds < 60 and "lost contact with process 1" in err
    message = next((line for line in err.splitlines() if "lost contact" in line), tail(err))
    rows.append(Row("multi-host: one of two processes killed", 1, int(ok), "n/a (resume from the last checkpoint)",
                    f"the other exited {procs[0].returncode} after {seconds:.1f} s: "
                    + message.split("error: ", 1)[-1][:140].replace("|", "/")))
    procs[1].communicate()

    # SIGTERM to one process: both save the same step, exit 0, and the rerun continues exactly.
    ref = work / "multi-reference"
    if not (ref / "checkpoints").exists():
        run(train_cmd(ref, "train.steps=30", *MULTI))
    run_dir = work / "multi-sigterm"
    port = free_port()
    procs = _job(run_dir, "train.steps=30", port=port)
    wait_for(lambda: len(losses(run_dir)) >= 8, procs[0], timeout=300)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    stopped = json.loads(outs[0][0]) if outs[0][0].strip() else {}
    from t2x.checkpoint import Checkpointer

    steps = Checkpointer(run_dir / "checkpoints", read_only=True).all_steps()
    # The stop's checkpoint is the newest; retention keeps the earlier ones until steps after it were finite.
    ok = all(p.returncode == 0 for p in procs) and stopped.get("preempted") and steps[-1:] == [stopped.get("step")]
    resumed = _job(run_dir, "train.steps=30", port=free_port())
    resumed_ok = all(p.communicate(timeout=600) and p.returncode == 0 for p in resumed)
    lost = nothing_lost(run_dir, ref, *MULTI, rtol=5e-5, state_rtol=1e-2) if resumed_ok else "resume failed"
    rows.append(Row("multi-host: SIGTERM to one of two processes", 1, int(bool(ok) and resumed_ok), lost,
                    f"exits {[p.returncode for p in procs]}, stopped at step {stopped.get('step')}, checkpoints {steps}; "
                    f"the rerun {'finished' if resumed_ok else 'failed'}"))

    # The coordinator unreachable: a clear error within the configured timeout.
    started = time.time()
    lonely = run(train_cmd(work / "multi-lonely", *MULTI, f"distributed.coordinator_address=127.0.0.1:{free_port()}",
                           "distributed.num_processes=2", "distributed.process_id=1",
                           "distributed.initialization_timeout=10"), env=env(4))
    seconds = time.time() - started
    ok = lonely.returncode == 1 and "cannot reach the coordinator" in lonely.stderr and seconds < 10 + 30
    rows.append(Row("multi-host: coordinator unreachable", 1, int(ok), "n/a (nothing started)",
                    f"exit {lonely.returncode} after {seconds:.0f} s (timeout 10 s): "
                    + tail(lonely.stderr, 1).split("error: ", 1)[-1][:120]))
    return rows


def config_fuzz(examples: int) -> Row:
    """The property-based config tests of tests/test_config.py with many more examples."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py", "-k", "any_"],
        cwd=REPO, env=env(T2X_FUZZ_EXAMPLES=str(examples)), capture_output=True, text=True,
    )
    ok = result.returncode == 0
    return Row("random and malformed configs (hypothesis)", 2 * examples, 2 * examples if ok else 0,
               "n/a", "each loads a valid config or fails with a ConfigError; " + tail(result.stdout, 1))

