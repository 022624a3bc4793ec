"""The fault suite: inject every fault t2x promises to survive and write the results to
docs/reliability.md.

    python reliability/run.py                 # everything (about 30 minutes on 2 CPU cores)
    python reliability/run.py --kills 3 --only kills damage --no-write

Each fault is injected into real ``t2x`` processes (one, or two on 127.0.0.1), and the
run is recovered the way a user would: by running the same command again. "Data lost"
compares every logged loss and the final parameters and optimizer state with a run that
was never interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # this process restores 8-device states
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import scenarios  # noqa: E402
from harness import REPO, Row  # noqa: E402
from serve import BEGIN, END  # noqa: E402

GROUPS = ("kills", "sigterm", "damage", "disk", "data", "multihost", "configs")


def report(rows: list[Row], command: str, seconds: float, work: pathlib.Path) -> str:
    import jax

    lines = [
        "# Reliability",
        "",
        "What t2x survives, measured by injecting each fault into real `t2x` processes and",
        "recovering the way a user would: running the same command again. *Data lost*",
        "compares every logged loss and the final parameters and optimizer state with a run",
        "that was never interrupted (bitwise for one process). Regenerate this page with",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Last run: {datetime.date.today().isoformat()}, {platform.platform()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, JAX {jax.__version__}; {seconds / 60:.0f} minutes.",
        "",
        "| fault | injected | survived | data lost | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.fault} | {r.injected} | {r.survived} | {r.lost} | {r.detail} |" for r in rows]
    lines = [line.replace(str(work), "$WORK") for line in lines]
    lines += [
        "",
        "The fast cases of each kind also run in the test suite (`tests/test_checkpoint.py`,",
        "`tests/test_reader.py`, `tests/test_multihost.py`, `tests/test_config.py`); this suite",
        "repeats them at length, through the command line. The scenarios are in",
        "`reliability/scenarios.py`.",
        "",
    ]
    return "\n".join(lines)


def kept_section(page: pathlib.Path) -> str:
    """The section ``reliability/serve.py`` wrote between its markers (it reruns on its
    own), or nothing."""
    text = page.read_text() if page.exists() else ""
    if BEGIN not in text or END not in text:
        return ""
    return "\n" + text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kill -9 count of the soak")
    parser.add_argument("--fuzz-examples", type=int, default=3000, help="hypothesis examples per config property")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="run only these groups")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--no-write", action="store_true", help="print the table instead of writing docs/reliability.md")
    args = parser.parse_args(argv)

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="t2x-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[Row] = []
    steps = {
        "kills": lambda: [scenarios.random_kills(work, args.kills)],
        "sigterm": lambda: scenarios.sigterms(work),
        "damage": lambda: scenarios.damaged_checkpoints(work),
        "disk": lambda: [scenarios.disk_full(work)],
        "data": lambda: scenarios.bad_data(work),
        "multihost": lambda: scenarios.multi_host(work),
        "configs": lambda: [scenarios.config_fuzz(args.fuzz_examples)],
    }
    try:
        for group in GROUPS:
            if group in args.only:
                t0 = time.time()
                new = steps[group]()
                rows += new
                for r in new:
                    print(f"{r.fault}: {r.survived}/{r.injected} survived, lost: {r.lost} ({r.detail})", flush=True)
                print(f"[{group}: {time.time() - t0:.0f} s]", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python reliability/run.py", *(sys.argv[1:] if argv is None else argv)])
    page = report(rows, command.strip(), time.time() - started, work) + kept_section(REPO / "docs" / "reliability.md")
    if args.no_write:
        print(page)
    else:
        (REPO / "docs" / "reliability.md").write_text(page)
        print(f"wrote {REPO / 'docs' / 'reliability.md'}")
    failed = [r for r in rows if r.survived < r.injected or not (r.lost.startswith("none") or r.lost.startswith("n/a"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
