"""The data mesh axis: a batch of prompts split over D device groups, each running patch
parallelism over its own (cfg, patch) submesh, gives every prompt the image it gets alone on
one such submesh with the same noise; mismatched counts are refused before compiling."""

import numpy as np
import pytest
from diffusers_models import relative_l2

import jaxfusion
from jaxfusion.builtin import builtin_model_path
from sharding import ParallelConfig

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "two yellow dots"]
SIZE, STEPS = 64, 3
ROUNDING = 1e-5  # float32, relative L2


@pytest.fixture(scope="module")
def pipe():
    return jaxfusion.load_pipeline(builtin_model_path())


def batch_and_alone(pipe, parallel: ParallelConfig, alone: ParallelConfig, scheduler: str):
    """The images of PROMPTS as one batch under `parallel`, and of each prompt alone under
    `alone` with the same noise."""
    noise = pipe.initial_latents(len(PROMPTS), SIZE, SIZE, seed=3)
    call = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, scheduler=scheduler)
    batch = pipe(PROMPTS, latents=noise, parallel=parallel, **call)
    singles = [
        pipe(prompt, latents=noise[i : i + 1], parallel=alone, **call)[0]
        for i, prompt in enumerate(PROMPTS)
    ]
    return batch, np.stack(singles)


@pytest.mark.slow
def test_four_prompts_on_two_groups_of_two_equal_each_prompt_alone(pipe):
    batch, alone = batch_and_alone(
        pipe,
        ParallelConfig(devices=4, data=2, mode="displaced"),
        ParallelConfig(devices=2, mode="displaced"),
        "euler",
    )
    for i in range(len(PROMPTS)):
        assert relative_l2(batch[i], alone[i]) < ROUNDING, i
    assert relative_l2(batch[0], batch[1]) > 1e-2  # the prompts differ


@pytest.mark.slow
def test_data_and_cfg_on_eight_devices_equal_each_prompt_alone(pipe):
    batch, alone = batch_and_alone(
        pipe,
        ParallelConfig(devices=8, data=2, cfg=2, mode="sync"),
        ParallelConfig(devices=4, cfg=2, mode="sync"),
        "euler",
    )
    for i in range(len(PROMPTS)):
        assert relative_l2(batch[i], alone[i]) < ROUNDING, i


def test_mismatched_counts_are_refused_before_compiling(pipe):
    with pytest.raises(ValueError, match="do not factor into 2 \\(data\\) x 2 \\(CFG\\)"):
        ParallelConfig(devices=6, data=2, cfg=2)
    with pytest.raises(ValueError, match="3 prompt\\(s\\) do not split over data=2") as refused:
        pipe.prepare(PROMPTS[:3], parallel=ParallelConfig(devices=4, data=2))
    assert "(e.g. 2 or 4)" in str(refused.value) and "--data-parallel" in str(refused.value)
    with pytest.raises(ValueError, match="cfg and data must be 1"):
        ParallelConfig(devices=1, data=2, mode="single")
