"""Wall time of `jaxfusion generate` (built-in model, displaced, 4 devices) as 1 process
with 4 simulated CPU devices against 2 processes x 2 (gloo collectives over localhost): the
cost of the multi-controller runtime on one machine, not a speed-up (the CPU cores are the
same). Each command's whole run: start-up, loading, compiling (no disk cache) and
generating. Writes docs/results/multiprocess_time.json.

    python benchmarks/multiprocess_time.py [--size 128] [--steps 4] [--repeats 2]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxfusion.files import write_text_atomically

PROMPT = "a red circle at the top left"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(processes: int, size: int, steps: int, folder: Path) -> float:
    """Seconds until every process of one `jaxfusion generate` has ended."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXFUSION_CACHE=str(folder / "cache"))
    env.pop("XLA_FLAGS", None)
    common = [sys.executable, "-m", "jaxfusion.cli", "generate", "--prompt", PROMPT]
    common += ["--height", str(size), "--width", str(size), "--steps", str(steps)]
    common += ["--devices", "4", "--parallel", "displaced", "--out", str(folder / "out.npy")]
    port = free_port()
    commands = [common]
    if processes > 1:
        distributed = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes)]
        commands = [[*common, *distributed, "--process-id", str(i)] for i in range(processes)]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"a process failed: {commands}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/results/multiprocess_time.json")
    args = parser.parse_args()
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for processes in times:
                times[processes].append(run(processes, args.size, args.steps, Path(folder)))
    record = dict(
        command="jaxfusion generate (built-in model), displaced, 4 devices, compile included",
        size=args.size,
        steps=args.steps,
        cpu_count=os.cpu_count(),
        wall_s_1_process_4_devices=times[1],
        wall_s_2_processes_2_devices_each=times[2],
    )
    print(json.dumps(record, indent=2))
    write_text_atomically(Path(args.out), json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
