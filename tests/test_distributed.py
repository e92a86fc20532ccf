"""Two processes x 2 simulated CPU devices (JAX's multi-controller runtime, gloo
collectives), started as `jaxfusion generate` subprocesses on localhost: the image equals the
single-process 4-device run's, only process 0 writes it, and a process that fails makes the
other end with a clear error, not hang."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxfusion
from jaxfusion.builtin import builtin_model_path
from sharding import ParallelConfig

PROMPT = "a red circle at the top left"
SIZE, STEPS, DEVICES, PROCESSES = 64, 3, 4, 2
TIMEOUT_S = 240  # the whole run of both processes, compile included, on a busy machine
ROUNDING = 1e-5  # float32, relative L2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(tmp_path, mode: str, prompt_files: list[str | None] | None = None):
    """`jaxfusion generate` as PROCESSES processes: each writes (or not) tmp_path/out-I.npy;
    returns their (return code, stderr) and the wall time of the slowest."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    env.pop("XLA_FLAGS", None)
    procs = []
    start = time.perf_counter()
    for i in range(PROCESSES):
        prompt = ["--prompt", PROMPT]
        if prompt_files is not None:
            prompt = ["--prompts", prompt_files[i]]
        command = [
            sys.executable,
            "-m",
            "jaxfusion.cli",
            "generate",
            *prompt,
            *("--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)),
            *(
                "--devices",
                str(DEVICES),
                "--parallel",
                mode,
                "--out",
                str(tmp_path / f"out-{i}.npy"),
            ),
            *("--coordinator", f"localhost:{port}", "--num-processes", str(PROCESSES)),
            *("--process-id", str(i), "--distributed-timeout", "30"),
        ]
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=TIMEOUT_S - (time.perf_counter() - start))
            results.append((proc.returncode, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results, time.perf_counter() - start


@pytest.fixture(scope="module")
def pipe():
    return jaxfusion.load_pipeline(builtin_model_path())


def single_process(pipe, mode: str) -> np.ndarray:
    parallel = ParallelConfig(devices=DEVICES, mode=mode)
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, parallel=parallel)[0]


def check_equals_single_process(pipe, tmp_path, mode: str) -> None:
    results, _ = run_processes(tmp_path, mode)
    for rc, stderr in results:
        assert rc == 0, stderr[-3000:]
    assert not (tmp_path / "out-1.npy").exists()  # only process 0 writes
    image = np.load(tmp_path / "out-0.npy")
    expected = single_process(pipe, mode)
    error = np.linalg.norm(image - expected) / np.linalg.norm(expected)
    print(f"{mode}: relative L2 against the single-process run {error:.2e}")
    assert error < ROUNDING


@pytest.mark.slow
def test_two_processes_sync_equal_one_process(pipe, tmp_path):
    check_equals_single_process(pipe, tmp_path, "sync")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["displaced", "naive"])
def test_two_processes_equal_one_process(pipe, tmp_path, mode):
    check_equals_single_process(pipe, tmp_path, mode)


def test_a_failing_process_ends_the_other(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text(PROMPT + "\n")
    results, wall = run_processes(tmp_path, "sync", [str(good), str(tmp_path / "missing.txt")])
    (rc0, err0), (rc1, err1) = results
    assert rc1 != 0 and "missing.txt" in err1
    assert rc0 != 0 and "process(es) [1] failed while preparing the run" in err0, err0[-3000:]
    assert not (tmp_path / "out-0.npy").exists()
    assert wall < TIMEOUT_S


def test_host_links_count_the_pairs_that_cross_the_host_boundary():
    from jaxfusion.bench.analyze import abstract_inputs, load_config
    from sharding.analysis import host_links, trace_step

    config = load_config(str(builtin_model_path()))
    unet, sampling, latents = abstract_inputs(config, 32, 32, "float32")

    def links(**layout):
        parallel = ParallelConfig(devices=4, mode="displaced", **layout)
        return host_links(trace_step(unet, sampling, latents, parallel, "displaced"), hosts=2)

    # P = 4 over hosts {0, 1}, {2, 3}: of the halo pairs (p, p +- 1) one in three crosses,
    # of the all_gather pairs 8 in 12.
    patches = links()
    assert patches["ppermute"]["cross_host"] * 2 == patches["ppermute"]["within_host"] > 0
    assert patches["all_gather"]["cross_host"] == 2 * patches["all_gather"]["within_host"] > 0
    # C = 2 x P = 2: the patches of a guidance half share a host, the halves do not.
    halves = links(cfg=2)
    assert halves["ppermute"]["cross_host"] == 0
    assert halves["all_gather"]["cross_host"] > 0
