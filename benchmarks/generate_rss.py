"""Peak resident memory of the real `jaxfusion generate` command with the built-in model, per
image size and device count, killed at a cap instead of running the machine out of memory.

    python benchmarks/generate_rss.py --label after [--heights 1024 2048] [--devices 1 4 8]
        [--cap-gb 12] [--json docs/results/generate_rss.json]

Each configuration runs `jaxfusion generate --prompt "a red circle at the top left" --height H
--width H --steps 4 --devices D --out OUT.png` (D > 1: displaced patch parallelism on
simulated CPU devices) as a subprocess in a session of its own, with a fresh compilation
cache. Every 0.1 s the resident memory of the process and all its children is summed; the
whole session is killed when the sum passes `--cap-gb` ("exceeded cap"), when the machine's
available memory falls under `--min-available-gb` ("machine low on memory") or after
`--timeout` seconds ("timed out"). A configuration the command refuses (exit status 2 with
an error) is recorded as "refused"; one where XLA cannot allocate its buffers
(RESOURCE_EXHAUSTED: it asks for more than the machine can give and fails before its RSS
grows) as "out of memory". Recorded per run: the status, the exit status, the peak RSS, the
wall time, the error line and the last lines of the command's output.

An older checkout, measured with the same virtual environment:

    git -C /work/main worktree add /tmp/jf-before c6fe3c7
    python benchmarks/generate_rss.py --label before --pythonpath /tmp/jf-before

(`--pythonpath` is prepended to PYTHONPATH of `python -m jaxfusion.cli`, and the script
checks and records where `jaxfusion` is imported from.) `--jaxfusion-cmd "..."` runs any other
command instead, and `--python` another interpreter. Runs with the same label, height and
devices replace earlier ones in the JSON; runs of other labels are kept.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from jaxfusion.files import write_text_atomically

PROMPT = "a red circle at the top left"
GIB = 2**30
POLL_SECONDS = 0.1
ERROR = re.compile(r"(Error|error):")


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of `process` and all its descendants (those that still exist)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


def run_capped(
    command: list[str], env: dict, log: Path, cap: int, min_available: int, timeout: float
) -> dict:
    """Runs `command` in a new session in `log`'s folder (so that `python -m` does not
    import from the current folder), polling its process tree's RSS; kills the session at
    the cap, at low available memory or at the timeout."""
    start = time.perf_counter()
    with open(log, "wb") as output:
        child = subprocess.Popen(
            command,
            env=env,
            cwd=log.parent,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = psutil.Process(child.pid)
        peak, status = 0, None
        while child.poll() is None:
            rss = tree_rss(process)
            peak = max(peak, rss)
            if rss > cap:
                status = "exceeded cap"
            elif psutil.virtual_memory().available < min_available:
                status = "machine low on memory"
            elif time.perf_counter() - start > timeout:
                status = "timed out"
            if status:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                break
            time.sleep(POLL_SECONDS)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    lines = text.strip().splitlines()
    if status is None:
        if child.returncode == 0:
            status = "ok"
        elif child.returncode == 2 and "error:" in text:
            status = "refused"
        elif "RESOURCE_EXHAUSTED" in text:
            status = "out of memory"
        else:
            status = f"failed (exit status {child.returncode})"
    return dict(
        status=status,
        exit_status=child.returncode,
        peak_rss_bytes=peak,
        wall_seconds=round(wall, 1),
        error=next((line.strip() for line in reversed(lines) if ERROR.search(line)), None),
        output_tail=lines[-6:],
    )


def import_origin(python: str, env: dict, cwd: str) -> dict:
    """Where `python` with `env`, run in `cwd` as the runs are, imports jaxfusion (and its
    sibling packages sharding and convert) from, and that checkout's commit."""
    code = "import jaxfusion, sharding, convert; print(jaxfusion.__file__, sharding.__file__, "
    code += "convert.__file__)"
    done = subprocess.run([python, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cannot import jaxfusion: {done.stderr.strip()[-500:]}")
    modules = done.stdout.split()[-3:]
    roots = {str(Path(m).parent.parent) for m in modules}
    if len(roots) != 1:
        raise RuntimeError(f"jaxfusion, sharding and convert come from different places: {modules}")
    root = roots.pop()
    commit = subprocess.run(
        ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return dict(jaxfusion_module=modules[0], commit=commit or None, uncommitted_changes=bool(dirty))


def machine() -> dict:
    import jax

    memory = psutil.virtual_memory()
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=psutil.cpu_count(),
        memory_bytes=memory.total,
        python=platform.python_version(),
        jax=jax.__version__,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help='e.g. "before" or "after"')
    parser.add_argument("--heights", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--cap-gb", type=float, default=12.0, help="GiB of the process tree")
    parser.add_argument(
        "--min-available-gb", type=float, default=1.5, help="kill when the machine has less"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--python", default=sys.executable, help="runs PYTHON -m jaxfusion.cli")
    parser.add_argument("--pythonpath", help="prepended to PYTHONPATH (an older checkout)")
    parser.add_argument("--jaxfusion-cmd", help='instead of PYTHON -m jaxfusion.cli, e.g. "jf"')
    parser.add_argument("--json", type=Path, default=Path("docs/results/generate_rss.json"))
    args = parser.parse_args()

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))
    if args.jaxfusion_cmd:
        base, origin = shlex.split(args.jaxfusion_cmd), {}
    else:
        base = [args.python, "-m", "jaxfusion.cli"]
        origin = import_origin(args.python, env, tempfile.gettempdir())
        print(f"jaxfusion from {origin['jaxfusion_module']} ({origin['commit']})", flush=True)

    result = {"benchmark": "generate_rss", "runs": []}
    if args.json.is_file():
        result = json.loads(args.json.read_text())
    result.update(
        command="python benchmarks/generate_rss.py --label LABEL [--pythonpath CHECKOUT]",
        machine=machine(),
    )
    result.setdefault("labels", {})[args.label] = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(base),
        pythonpath=args.pythonpath,
        cap_bytes=int(args.cap_gb * GIB),
        **origin,
    )
    cap, min_available = int(args.cap_gb * GIB), int(args.min_available_gb * GIB)
    for height in args.heights:
        for devices in args.devices:
            with tempfile.TemporaryDirectory(prefix="jf-rss-") as folder:
                out = Path(folder) / "out.png"
                command = [*base, "generate", "--prompt", args.prompt, "--height", str(height),
                           "--width", str(height), "--steps", str(args.steps),
                           "--devices", str(devices), "--out", str(out)]  # fmt: skip
                run_env = {**env, "JAXFUSION_CACHE": str(Path(folder) / "cache")}
                print(f"[{args.label}] {height}x{height}, {devices} device(s) ...", flush=True)
                run = run_capped(
                    command, run_env, Path(folder) / "log.txt", cap, min_available, args.timeout
                )
                run.update(image_written=out.is_file())
            record = dict(
                label=args.label,
                commit=origin.get("commit"),
                uncommitted_changes=origin.get("uncommitted_changes"),
                height=height,
                width=height,
                devices=devices,
                mode="displaced" if devices > 1 else "single",
                steps=args.steps,
                command=shlex.join([*command[:-1], "OUT.png"]),
                **run,
            )
            print(
                f"  {record['status']}: peak RSS {record['peak_rss_bytes'] / GIB:.2f} GiB, "
                f"{record['wall_seconds']:.0f} s",
                flush=True,
            )
            if record["status"] not in ("ok", "exceeded cap"):
                print("  " + "\n  ".join(record["output_tail"]), flush=True)
            result["runs"] = [
                r
                for r in result["runs"]
                if (r["label"], r["height"], r["devices"]) != (args.label, height, devices)
            ] + [record]
            write_text_atomically(args.json, json.dumps(result, indent=2) + "\n")
    print(f"\n{'label':8} {'size':>9} {'devices':>7} {'status':>22} {'peak GiB':>9} {'wall s':>7}")
    for r in sorted(result["runs"], key=lambda r: (r["height"], r["devices"], r["label"])):
        print(
            f"{r['label']:8} {r['height']:>4}x{r['width']:<4} {r['devices']:>7} "
            f"{r['status']:>22} {r['peak_rss_bytes'] / GIB:>9.2f} {r['wall_seconds']:>7.0f}"
        )
    print(f"wrote {args.json}", flush=True)


if __name__ == "__main__":
    main()
