"""`jaxfusion profile`: the HLO readers against a hand-written scheduled module (loops,
trip counts, an overlapped and a back-to-back async collective); the command on a tiny random
SDXL pipeline, whose steady-state collectives per step equal those of the traced displaced
step (an independent derivation, from the jaxpr); and the refusal of a used --out folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from pipelines import LATENT_SIZE, save_random_pipeline

from jaxfusion import cli
from jaxfusion.bench.analyze import abstract_inputs, load_config
from jaxfusion.bench.profile import (
    AsyncCollective,
    async_collectives,
    describe_steady_state,
    loop_collectives,
    program_parts,
    scans,
    steady_state,
)
from jaxfusion.bench.schedule import Array, read_schedule
from sharding.analysis import trace_step
from sharding.parallel import ParallelConfig

SCRIPT = Path(sys.executable).with_name("jaxfusion")
HLO_NAMES = {
    "ppermute": "collective-permute",
    "all_gather": "all-gather",
    "psum": "all-reduce",
    "all_to_all": "all-to-all",
}

# A loop body with an all-gather that two compute instructions overlap and a
# collective-permute with only a bitcast between start and done; an all-reduce before it.
HLO = """HloModule profile_test, is_scheduled=true

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%fused (f: f32[2,8]) -> f32[2,8] {
  %f = f32[2,8]{1,0} parameter(0)
  ROOT %negate = f32[2,8]{1,0} negate(%f)
}

%cond (c: (s32[], f32[2,8])) -> pred[] {
  %c = (s32[], f32[2,8]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%n, %three), direction=LT
}

%body (carry: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %carry = (s32[], f32[2,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %x = f32[2,8]{1,0} get-tuple-element(%carry), index=1
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3}}, dimensions={0}
  %fusion.1 = f32[2,8]{1,0} fusion(%x), kind=kLoop, calls=%fused
  %gemm = f32[2,8]{1,0} custom-call(%fusion.1), custom_call_target="__cublas$gemm"
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  %cps = (f32[2,8]{1,0}, f32[2,8]{1,0}, u32[], u32[]) collective-permute-start(%gemm), source_target_pairs={{0,1},{1,2},{2,3}}
  %bitcast.2 = f32[16]{0} bitcast(%x)
  %cpd = f32[2,8]{1,0} collective-permute-done(%cps)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %tuple = (s32[], f32[2,8]{1,0}) tuple(%next, %cpd)
}

ENTRY %main (p: f32[2,8]) -> f32[2,8] {
  %p = f32[2,8]{1,0} parameter(0)
  %all-reduce.1 = f32[2,8]{1,0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,8]{1,0}) tuple(%zero, %all-reduce.1)
  %while.1 = (s32[], f32[2,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[2,8]{1,0} get-tuple-element(%while.1), index=1
}
"""  # noqa: E501


def test_async_collectives_overlap():
    pairs = async_collectives(read_schedule(HLO))
    assert pairs == [
        AsyncCollective("body", "while.1", "all-gather", "ags", "agd", compute_between=2),
        AsyncCollective("body", "while.1", "collective-permute", "cps", "cpd", 0),
    ]
    assert [p.overlapped for p in pairs] == [True, False]


def test_collectives_by_loop_and_step():
    loops = loop_collectives(read_schedule(HLO))
    found = [
        (loop.loop, loop.trip_count, [(c.kind, c.arrays, c.group_size) for c in loop.collectives])
        for loop in loops
    ]
    assert found == [
        (None, 1, [("all-reduce", (Array("f32", (2, 8)),), 4)]),
        (
            "while.1",
            3,
            [
                ("all-gather", (Array("f32", (8, 8)),), 4),
                ("collective-permute", (Array("f32", (2, 8)),), 4),
            ],
        ),
    ]
    # 4 displaced steps without warm-up: step 0 a scan of one step (XLA inlines it, outside
    # the loop), steps 1..3 in the loop.
    parallel = ParallelConfig(4, mode="displaced", warmup_steps=0)
    assert scans(parallel, 4) == [("warm-up steps", range(1)), ("displaced steps", range(1, 4))]
    outside, displaced = program_parts(loops, parallel, steps=4)
    assert (outside.steps, outside.loop, outside.iterations) == ([0], None, 1)
    assert (displaced.label, displaced.steps, displaced.loop) == (
        "displaced steps",
        [1, 2, 3],
        "while.1",
    )
    assert steady_state([outside, displaced], parallel) is displaced
    assert displaced.by_op() == {
        "all-gather": {"count": 1, "received_bytes": 3 * 2 * 8 * 4},
        "collective-permute": {"count": 1, "received_bytes": 2 * 8 * 4},
    }
    # 5 steps would need a loop of 4 iterations: the loop is reported, but not as a step.
    parts = program_parts(loops, parallel, steps=5)
    assert [p.label for p in parts] == ["outside the loops (once)", "while loop while.1"]
    assert steady_state(parts, parallel) is None


def test_steady_state_needs_a_loop_of_two_steps():
    """Without a loop of two steady-state steps, the report names the fewest steps giving
    one: displaced mode after its warm-up steps 0..4, the other modes from the start."""
    displaced = ParallelConfig(4, mode="displaced", warmup_steps=4)
    for steps in (4, 5, 6):
        assert "use --steps 7 or more" in describe_steady_state(None, displaced, steps)
    assert "displaced steps: none" in describe_steady_state(None, displaced, 5)
    assert "displaced steps: 5;" in describe_steady_state(None, displaced, 6)
    assert "do not match" in describe_steady_state(None, displaced, 7)
    sync = ParallelConfig(4, mode="sync")
    assert "use --steps 2 or more" in describe_steady_state(None, sync, 1)


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(model folder, --out folder, the finished process): the command as a user runs it (a
    process of its own: it sets JAX's device count and compilation cache) on 4 simulated
    devices, displaced from step 1 (a scan of 2 steps)."""
    folder = tmp_path_factory.mktemp("profile")
    model, out = save_random_pipeline(folder / "model", "sdxl-light"), folder / "out"
    env = dict(os.environ, JAXFUSION_CACHE=str(folder / "cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(SCRIPT), "profile", "--model", str(model), "--devices", "4", "--parallel",
         "displaced", "--steps", "3", "--warmup-steps", "0", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return model, out, result


@pytest.mark.slow
def test_profile_files(profile):
    _, out, result = profile
    assert list((out / "trace").rglob("*.trace.json.gz"))
    assert (out / "program.hlo.txt").read_text().startswith("HloModule")
    assert "synchronous on this platform (cpu): no overlap to analyse" in result.stderr
    assert "ui.perfetto.dev" in result.stderr


@pytest.mark.slow
def test_profile_steady_state_is_the_traced_step(profile):
    """float32: the CPU compiler keeps the collectives' dtype, so bytes compare exactly."""
    model, out, _ = profile
    report = json.loads((out / "collectives.json").read_text())
    assert [(p["steps"], p["iterations"]) for p in report["parts"]] == [([0], 1), ([1, 2], 2)]
    config = load_config(str(model))
    unet, sampling, latents = abstract_inputs(config, LATENT_SIZE, LATENT_SIZE, jnp.float32)
    parallel = ParallelConfig(4, mode="displaced", warmup_steps=0)
    expected: dict[str, dict[str, int]] = {}
    for c in trace_step(unet, sampling, latents, parallel, "displaced").collectives():
        entry = expected.setdefault(HLO_NAMES[c.kind], {"count": 0, "received_bytes": 0})
        entry["count"] += 1
        entry["received_bytes"] += c.received_bytes
    assert report["steady_state"] == {"label": "displaced steps", "per_step": expected}
    assert expected["collective-permute"]["count"] > 0 and expected["all-gather"]["count"] > 0


def test_used_out_folder_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["profile", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "is not an empty folder" in error and "loading" not in error
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
