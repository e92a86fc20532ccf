"""Two processes x 2 simulated CPU devices (JAX's multi-controller runtime, gloo
collectives), started as `jaxfusion generate` subprocesses on localhost: the image equals the
single-process 4-device run's, only process 0 writes it, a process that fails makes the
other end with a clear error, not hang, and a signal to one ends both. A start-up that
cannot succeed (no coordinator, a process id out of range, processes started with other
options) is refused in one line, before JAX would abort."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from commands import refused

import jaxfusion
from jaxfusion.builtin import builtin_model_path
from sharding import ParallelConfig

PROMPT = "a red circle at the top left"
SIZE, STEPS, DEVICES, PROCESSES = 64, 3, 4, 2
TIMEOUT_S = 400  # the whole run of both processes, compile included, on a busy machine
# --distributed-timeout: how long a process waits in a collective for one still compiling
PEER_TIMEOUT_S = 120
ROUNDING = 1e-5  # float32, relative L2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(tmp_path, arguments, timeout_s: int = PEER_TIMEOUT_S) -> list[subprocess.Popen]:
    """`jaxfusion ARGUMENTS(I)` as process I of PROCESSES on a free localhost port, with
    `--distributed-timeout timeout_s`; its stdout and stderr go to tmp_path/log-I.txt."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # The suite's XLA flags (conftest.py), but no forced device count: `--devices` sets it.
    flags = os.environ.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    procs = []
    for i in range(PROCESSES):
        command = [
            *(sys.executable, "-m", "jaxfusion.cli", *arguments(i)),
            *("--coordinator", f"localhost:{port}", "--num-processes", str(PROCESSES)),
            *("--process-id", str(i), "--distributed-timeout", str(timeout_s)),
        ]
        with open(tmp_path / f"log-{i}.txt", "w") as log:
            procs.append(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=log,
                    stderr=log,
                    text=True,
                    # As a terminal's foreground job: SIGINT not ignored (a background job's is).
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                )
            )
    return procs


def finish(tmp_path, procs: list[subprocess.Popen], start: float) -> list[tuple[int, str]]:
    """Each process's (return code, output) once all ended, TIMEOUT_S after `start` at most
    (then the test fails on the timeout, and the processes are killed)."""
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - start)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [(p.returncode, (tmp_path / f"log-{i}.txt").read_text()) for i, p in enumerate(procs)]


def generate_arguments(
    tmp_path, mode: str, prompt_files=None, devices=DEVICES, height=SIZE, steps=STEPS
):
    """The `jaxfusion generate` arguments of process I: it writes tmp_path/out-I.npy."""

    def arguments(i: int) -> list[str]:
        prompt = ["--prompt", PROMPT] if prompt_files is None else ["--prompts", prompt_files[i]]
        return [
            *("generate", *prompt, "--height", str(height), "--width", str(SIZE)),
            *("--steps", str(steps), "--devices", str(devices), "--parallel", mode),
            *("--out", str(tmp_path / f"out-{i}.npy")),
        ]

    return arguments


def run_processes(tmp_path, mode: str, prompt_files=None, devices: int = DEVICES, height=SIZE):
    """`jaxfusion generate` as PROCESSES processes: each writes (or not) tmp_path/out-I.npy;
    returns their (return code, output) and the wall time of the slowest."""
    start = time.perf_counter()
    procs = launch(tmp_path, generate_arguments(tmp_path, mode, prompt_files, devices, height))
    return finish(tmp_path, procs, start), time.perf_counter() - start


@pytest.fixture(scope="module")
def pipe():
    return jaxfusion.load_pipeline(builtin_model_path())


def single_process(pipe, mode: str, devices: int = DEVICES, height: int = SIZE) -> np.ndarray:
    parallel = ParallelConfig(devices=devices, mode=mode)
    call = dict(height=height, width=SIZE, num_inference_steps=STEPS, parallel=parallel)
    return pipe(PROMPT, **call)[0]


def check_equals_single_process(
    pipe, tmp_path, mode: str, devices: int = DEVICES, height: int = SIZE
) -> None:
    results, wall = run_processes(tmp_path, mode, devices=devices, height=height)
    for rc, output in results:
        assert rc == 0, output[-3000:]
    assert not (tmp_path / "out-1.npy").exists()  # only process 0 writes
    image = np.load(tmp_path / "out-0.npy")
    expected = single_process(pipe, mode, devices, height)
    error = np.linalg.norm(image - expected) / np.linalg.norm(expected)
    print(
        f"{mode}, {PROCESSES} processes x {devices // PROCESSES} devices: relative L2 against "
        f"the single-process run {error:.2e} ({wall:.1f} s)"
    )
    assert error < ROUNDING


@pytest.mark.slow
def test_two_processes_sync_equal_one_process(pipe, tmp_path):
    """At 80 pixels, a 20-row latent: unequal slabs (8, 4, 4, 4 rows in arrays of 8), so the
    image comes back replicated, gathered from the other process's devices too."""
    check_equals_single_process(pipe, tmp_path, "sync", height=80)


# P = 8 (2 processes x 4 devices) needs 8 rows of the built-in model's coarsest level (16
# pixels each, the last one partly). Displaced and naive on 2 processes x 2 devices: the eval
# test below.
@pytest.mark.slow
def test_two_processes_displaced_on_eight_devices_equal_one_process(pipe, tmp_path):
    check_equals_single_process(pipe, tmp_path, "displaced", devices=8, height=128)


@pytest.mark.slow
def test_two_process_eval_equals_the_one_process_eval(pipe, tmp_path):
    """`jaxfusion eval` on 2 processes x 2 devices: process 0 writes metrics.json and prints
    the table, process 1 neither; the metrics equal those of the same eval in one process
    (its displaced and naive images equal the one-process run's to float32 rounding)."""
    from jaxfusion.bench import evaluate
    from jaxfusion.bench.options import EvalOptions

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    request = dict(height=SIZE, width=SIZE, steps=STEPS, seeds=[0], group_norm=["corrected"])

    def arguments(i: int) -> list[str]:
        return [
            *("eval", "--prompts", str(prompts), "--seeds", "0", "--gn", "corrected"),
            *("--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE)),
            *("--devices", str(DEVICES), "--out", str(tmp_path / f"eval-{i}")),
        ]

    start = time.perf_counter()
    (rc0, output0), (rc1, output1) = finish(tmp_path, launch(tmp_path, arguments), start)
    assert rc0 == 0 and rc1 == 0, (output0 + output1)[-3000:]
    assert not (tmp_path / "eval-1").exists()  # only process 0 writes, and checks its --out
    assert "mean quality against single" in output0
    assert "mean quality against single" not in output1
    metrics = json.loads((tmp_path / "eval-0" / "metrics.json").read_text())
    options = EvalOptions(out=tmp_path / "alone", prompts=[PROMPT], devices=DEVICES, **request)
    expected = evaluate.run(pipe, options)
    for name, mean in expected["mean"].items():
        got = metrics["mean"][name]
        print(
            f"eval {name}: {got['psnr_db']:.4f} dB, SSIM {got['ssim']:.6f} on 2 processes; "
            f"{mean['psnr_db']:.4f} dB, SSIM {mean['ssim']:.6f} in one"
        )
        assert got["psnr_db"] == pytest.approx(mean["psnr_db"], abs=1e-3)
        assert got["ssim"] == pytest.approx(mean["ssim"], abs=1e-5)
    assert set(metrics["mean"]) == set(expected["mean"]) == {"displaced-corrected", "naive"}


def test_a_failing_process_ends_the_other(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text(PROMPT + "\n")
    results, wall = run_processes(tmp_path, "sync", [str(good), str(tmp_path / "missing.txt")])
    (rc0, err0), (rc1, err1) = results
    assert rc1 != 0 and "missing.txt" in err1
    assert rc0 != 0 and "process(es) [1] failed while preparing the run" in err0, err0[-3000:]
    assert not (tmp_path / "out-0.npy").exists()
    assert wall < TIMEOUT_S


def test_a_killed_process_ends_the_other_within_the_timeout(tmp_path):
    """Process 1 killed once it compiles: the coordinator misses its heartbeats for the
    timeout and ends process 0 (JAX aborts it, naming the silent process), whatever
    process 0 was doing (compiling, or waiting in a collective)."""
    timeout_s = 10
    start = time.perf_counter()  # 50 steps: process 1 is killed long before they end
    procs = launch(tmp_path, generate_arguments(tmp_path, "sync", steps=50), timeout_s)
    log = tmp_path / "log-1.txt"
    while "compiling" not in log.read_text() and procs[1].poll() is None:
        assert time.perf_counter() - start < TIMEOUT_S, log.read_text()
        time.sleep(0.2)
    procs[1].kill()
    killed = time.perf_counter()
    (rc0, output0), _ = finish(tmp_path, procs, start)
    ended = time.perf_counter() - killed
    print(f"process 0 ended {ended:.1f} s after process 1 was killed (timeout {timeout_s} s)")
    assert rc0 != 0 and "stopped sending heartbeats" in output0, output0[-3000:]
    assert "1\n" in output0.split("stopped sending heartbeats")[1][:40]  # names process 1
    assert ended < timeout_s + 30  # the timeout, and a busy machine's slack
    assert not (tmp_path / "out-0.npy").exists()


@pytest.mark.parametrize(
    ("which", "signum", "stage", "steps", "height"),
    [
        (0, signal.SIGINT, "compiling", STEPS, SIZE),  # process 0 serves the coordinator
        pytest.param(
            1, signal.SIGTERM, "denoising", 1000, 128, marks=pytest.mark.slow
        ),  # in a collective
    ],
)
def test_a_signal_to_one_process_ends_every_process(tmp_path, which, signum, stage, steps, height):
    """SIGINT or SIGTERM to one process of a displaced run over 2 processes x 1 device
    while it compiles or denoises: each ends within moments with the signal's status, one
    line each saying why, and no image."""
    name = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}[signum]
    arguments = generate_arguments(tmp_path, "displaced", devices=2, height=height, steps=steps)
    start = time.perf_counter()
    procs = launch(tmp_path, arguments)
    log = tmp_path / f"log-{which}.txt"
    while not any(line.startswith(stage) for line in log.read_text().splitlines()):
        assert time.perf_counter() - start < TIMEOUT_S and procs[which].poll() is None
        time.sleep(0.05)
    time.sleep(1.0)
    procs[which].send_signal(signum)
    sent = time.perf_counter()
    results = finish(tmp_path, procs, start)
    ended = time.perf_counter() - sent
    print(f"{name} to process {which} while {stage}: both ended within {ended:.2f} s")
    assert ended < 10  # moments, and a busy machine's slack
    for i, (rc, output) in enumerate(results):
        last = output.splitlines()[-1]
        assert rc == 128 + signum, output[-3000:]
        if i == which:
            assert last.startswith(f"stopped by {name} while {stage}"), last
            assert last.endswith("; every process of the run ends"), last
        else:  # at its own stage, if any: on a busy machine it may not be at `stage` yet
            expected = rf"stopped( while [^:]+)?: process {which} was stopped by {re.escape(name)}"
            assert re.match(expected + ", so every process of the run ends$", last), last
        assert "Traceback" not in output and "Check failure" not in output
    assert not list(tmp_path.glob("out-*"))


def test_an_unreachable_coordinator_is_explained_before_jax_aborts(tmp_path):
    """Process 1 alone: no coordinator answers. One line names the address, the timeout
    and what to check, with exit status 2, where JAX would abort with a C++ stack after
    about twice the timeout."""
    port = free_port()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "jaxfusion.cli", "generate", "--prompt", PROMPT),
            *("--devices", "2", "--out", str(tmp_path / "out.npy")),
            *("--coordinator", f"localhost:{port}", "--num-processes", "2"),
            *("--process-id", "1", "--distributed-timeout", "2"),
        ],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"process 1 found no coordinator at localhost:{port} within 2 s" in lines[0]
    assert "process 0 runs on localhost" in lines[0] and "--distributed-timeout" in lines[0]
    assert not (tmp_path / "out.npy").exists()


def test_processes_started_with_other_options_are_refused(tmp_path):
    """Two processes whose --height differs: each refuses the run, naming the option, the
    values and the processes, before loading anything."""

    def arguments(i: int) -> list[str]:
        return generate_arguments(tmp_path, "sync", devices=2, height=[64, 128][i])(i)

    results = finish(tmp_path, launch(tmp_path, arguments), time.perf_counter())
    for i, (rc, output) in enumerate(results):
        assert rc == 2, output[-3000:]
        mine, theirs = ("64", "128") if i == 0 else ("128", "64")
        expected = f"--height {mine} on process {i}, {theirs} on process {1 - i}"
        assert output.splitlines() == [
            f"error: the processes of the run differ: {expected}"
            + (
                ": start every process with the same command and options (all but --process-id "
                "and file paths) and the same versions of jaxfusion, jax and jaxlib"
            )
        ]


class Store:
    """The coordination service's key-value store as `check_same_arguments` uses it; a
    process that never publishes makes the read fail, as JAX's deadline does."""

    def __init__(self, published: dict[str, str]):
        self.published = published

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        if key in self.published and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        self.published[key] = value

    def blocking_key_value_get(self, key: str, timeout_ms: int) -> str:
        if key not in self.published:
            raise RuntimeError("DEADLINE_EXCEEDED: Deadline Exceeded")
        return self.published[key]


def test_other_versions_or_a_silent_process_are_refused():
    """Process 0 refuses once process 1 has compared too and ends (it serves the
    coordination service: it ends last); a process that never publishes is named."""
    from jaxfusion.multiprocess import (
        ARGUMENTS_KEY,
        COMPARED_KEY,
        REFUSED_KEY,
        check_same_arguments,
    )

    mine = {"the command": "generate", "jax": "0.10.2"}
    theirs = json.dumps(dict(mine, jax="0.10.1"))
    differ = r"differ: jax 0\.10\.2 on process 0, 0\.10\.1 on process 1"
    peer = {ARGUMENTS_KEY.format(1): theirs, COMPARED_KEY.format(1): "1"}
    with pytest.raises(ConnectionError, match="process 1"):  # it never said it ends
        check_same_arguments(Store(dict(peer)), 0, 2, mine, 5)
    with pytest.raises(ValueError, match=differ):
        check_same_arguments(Store(dict(peer, **{REFUSED_KEY.format(1): "1"})), 0, 2, mine, 5)
    with pytest.raises(ConnectionError, match="process 1 joined the run but did not send its"):
        check_same_arguments(Store({}), 0, 2, mine, 5)


def test_start_up_mistakes_are_refused_before_jax(capsys, tmp_path):
    """In the options' words, at once: a process id out of range, an address that is not
    HOST:PORT, a host name that does not resolve, a port in use on process 0's host."""
    port = free_port()

    def refusal(coordinator: str, process_id: int) -> str:
        return refused(
            capsys, "generate", "--prompt", PROMPT, "--out", str(tmp_path / "out.npy"),
            "--coordinator", coordinator, "--num-processes", "2", "--process-id",
            str(process_id),
        )  # fmt: skip

    assert "--process-id 2 is not in 0..1 (--num-processes 2)" in refusal(f"localhost:{port}", 2)
    assert "use HOST:PORT" in refusal("localhost", 1)
    unresolved = refusal(f"nosuch.invalid:{port}", 1)
    assert "the host name nosuch.invalid does not resolve" in unresolved
    with socket.create_server(("", port)):
        in_use = refusal(f"localhost:{port}", 0)
    assert (
        f"cannot serve the coordinator on port {port} of this host (Address already in use)"
        in in_use
    )
    assert not list(tmp_path.iterdir())


def test_host_links_count_the_pairs_that_cross_the_host_boundary():
    from jaxfusion.bench.analyze import abstract_inputs, load_config
    from sharding.analysis import host_links, trace_step

    config = load_config(str(builtin_model_path()))
    unet, sampling, latents = abstract_inputs(config, 32, 32, "float32")

    def links(devices=4, hosts=2, data=1, **layout):
        parallel = ParallelConfig(devices=devices, mode="displaced", **layout)
        traced = trace_step(unet, sampling, latents, parallel, "displaced")
        return host_links(traced, hosts, data)

    # P = 4 over hosts {0, 1}, {2, 3}: of the halo pairs (p, p +- 1) one in three crosses,
    # of the all_gather pairs 8 in 12.
    patches = links()
    assert patches["ppermute"]["cross_host"] * 2 == patches["ppermute"]["within_host"] > 0
    assert patches["all_gather"]["cross_host"] == 2 * patches["all_gather"]["within_host"] > 0
    # C = 2 x P = 2: the patches of a guidance half share a host, the halves do not.
    halves = links(cfg=2)
    assert halves["ppermute"]["cross_host"] == 0
    assert halves["all_gather"]["cross_host"] > 0
    # D = 2 groups of P = 2 (one traced), a group per host: each group's pairs as on one
    # host alone, none across.
    groups, one_group = links(devices=2, data=2), links(devices=2, hosts=1)
    for kind in ("ppermute", "all_gather"):
        assert groups[kind]["cross_host"] == 0
        assert groups[kind]["within_host"] == 2 * one_group[kind]["within_host"] > 0
