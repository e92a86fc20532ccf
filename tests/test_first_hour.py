"""What a new user meets first: refusals that come before any weight is read or any program
compiles and name the file or flag at fault, true messages, quiet output, outputs that
never stay half-written, and the built-in model one call away."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from commands import jaxfusion_command, refused
from pipelines import count_compiles, save_random_pipeline
from rich.console import Console

import jaxfusion
from convert.files import TensorReader
from jaxfusion.builtin import builtin_model_path
from jaxfusion.cli import running
from jaxfusion.display import StageDisplay
from sharding.parallel import ParallelConfig

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random SDXL-shaped pipeline folder (safetensors weights), 32x32 images."""
    return save_random_pipeline(tmp_path_factory.mktemp("first-hour") / "sdxl", "sdxl-light")


@pytest.fixture(autouse=True)
def devices_as_they_are(monkeypatch):
    """The command in this process uses its 8 simulated devices (conftest.py): JAX has
    started, so the command's own device setup cannot run again."""
    monkeypatch.setattr(running, "simulate_cpu_devices", lambda count: None)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the weight tensors read from files while the test runs."""
    names = []
    read = TensorReader.read

    def counted(self, key):
        names.append(key)
        return read(self, key)

    monkeypatch.setattr(TensorReader, "read", counted)
    return names


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--height", "30"], "height=30 is not a positive multiple of 8"),
        (["--steps", "0"], "num_inference_steps=0"),
        (["--devices", "0"], "devices=0: use 1 or more"),
        (["--devices", "3", "--cfg-parallel"], "3 devices do not factor into 2 (CFG)"),
        (["--devices", "2", "--guidance", "1", "--cfg-parallel"], "guidance is off"),
        (["--devices", "2", "--height", "8"], "height=8 does not split into 2 patches"),
    ],
)
def test_request_refused_before_reading_weights_or_compiling(
    folder, tmp_path, capsys, reads, options, message
):
    out = str(tmp_path / "image.png")
    with count_compiles() as compiles:
        error = refused(capsys, "generate", "--model", str(folder), "--prompt", PROMPT,
                        "--out", out, *options)  # fmt: skip
    assert message in error
    assert reads == [] and compiles == []
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_an_existing_folder_names_overwrite(folder, tmp_path, capsys, reads):
    (tmp_path / "taken").mkdir()
    error = refused(capsys, "convert", str(folder), str(tmp_path / "taken"))
    assert "--overwrite" in error and str(tmp_path / "taken") in error
    assert reads == []


def test_compare_without_the_test_extras_says_what_to_install(folder, capsys, reads,
                                                              monkeypatch):  # fmt: skip
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "diffusers" else find_spec(name, *a),
    )
    error = refused(capsys, "compare", "--model", str(folder), "--prompt", PROMPT)
    assert "needs diffusers: pip install 'jaxfusion[test]'" in error
    assert reads == []
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    error = refused(capsys, "compare", "--model", str(folder), "--prompt", PROMPT,
                    "--lora", "some.safetensors")  # fmt: skip
    assert "no LoRA file at some.safetensors" in error  # compare fuses LoRAs on both sides
    assert reads == []


def test_unwritable_out_folder_refused_before_loading(folder, capsys, reads):
    # /proc takes no new files, whoever runs the test (root ignores permission bits).
    error = refused(capsys, "generate", "--model", str(folder), "--prompt", PROMPT,
                    "--out", "/proc/image.png")  # fmt: skip
    assert "--out /proc/image.png: cannot write in folder /proc" in error
    assert reads == []


def test_corrupt_config_names_the_file(folder, tmp_path, capsys, reads):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(folder), str(broken)], check=True)
    (broken / "unet" / "config.json").write_text('{"sample_size": 16, oops}')
    error = refused(capsys, "generate", "--model", str(broken), "--prompt", PROMPT,
                    "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert f"{broken / 'unet' / 'config.json'} is not valid JSON" in error
    assert "re-download or re-convert" in error
    assert reads == []


def test_truncated_weights_name_the_file(folder, tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(folder), str(broken)], check=True)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    result = jaxfusion_command(
        tmp_path / "cache", "generate", "--model", str(broken), "--prompt", PROMPT,
        "--out", str(tmp_path / "x.png"), expect=2,
    )  # fmt: skip
    error = " ".join(result.stderr.split())
    assert f"{weights} is truncated" in error and "re-download or re-convert it" in error
    assert "Traceback" not in result.stderr


def test_junk_latents_file_names_the_flag(folder, tmp_path, capsys, reads):
    junk = tmp_path / "latents.npy"
    junk.write_text("not an array")
    error = refused(capsys, "generate", "--model", str(folder), "--prompt", PROMPT,
                    "--latents", str(junk), "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert f"--latents {junk} is not a .npy array file" in error
    assert "pickle" not in error.split(": ", 1)[0]
    assert reads == []


def test_python_api_refusals(folder):
    pipe = jaxfusion.load_pipeline(folder, abstract=True)
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list"):
        pipe.prepare(None)
    latents = np.full((1, 4, 16, 16), np.nan, np.float32)
    with pytest.raises(ValueError, match="latents contain NaN"):
        pipe.prepare(PROMPT, latents=latents)
    with pytest.warns(UserWarning, match="warm-up covers all 5 steps"):
        pipe.prepare(PROMPT, num_inference_steps=5, parallel=ParallelConfig(2, warmup_steps=10))
    with pytest.raises(ValueError, match="jax_num_cpu_devices"):
        ParallelConfig(64).mesh()
    with pytest.raises(ValueError, match="devices=0: use 1 or more"):
        ParallelConfig(0)


def test_abstract_pipeline_reads_no_weights(folder, reads):
    pipe = jaxfusion.load_pipeline(folder, abstract=True)
    assert reads == []
    full = jaxfusion.load_pipeline(folder)
    assert reads  # the same loader reads them when not abstract
    assert type(pipe) is type(full) and pipe.unet.config == full.unet.config


def test_load_pipeline_without_arguments_is_the_builtin_model():
    for pipe in (jaxfusion.load_pipeline(), jaxfusion.load_pipeline("builtin")):
        expected = jaxfusion.load_pipeline(builtin_model_path(), abstract=True)
        assert type(pipe) is type(expected)
        assert pipe.unet.config == expected.unet.config
        assert pipe.vae.config == expected.vae.config


def test_stage_start_is_shown_off_a_terminal():
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    display = StageDisplay(console)
    with display("compiling"):
        assert console.file.getvalue().splitlines() == ["compiling ..."]
    assert console.file.getvalue().splitlines()[-1].startswith("✓ compiling (")


def test_long_prompt_truncation_is_one_line(folder):
    """The command shows the truncation warning as one line, without the warning's source."""
    console = Console(file=io.StringIO(), force_terminal=False, width=500)
    running.show_warnings_as_notes(StageDisplay(console))
    pipe = jaxfusion.load_pipeline(folder, abstract=True)
    pipe.prepare(" ".join(["a red circle at the top left"] * 20))
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: prompt truncated to CLIP's 77 tokens")
    assert ".py" not in lines[0]


def test_sigterm_during_a_write_leaves_no_file(tmp_path):
    """The command's SIGTERM handling with the real atomic writer: killed while writing,
    neither the output nor its temporary file stays."""
    ready, target = tmp_path / "ready", tmp_path / "image.png"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from jaxfusion.cli import end_on_termination
        from jaxfusion.files import write_atomically

        def slow_write(tmp):
            Path(tmp).write_bytes(b"partial")
            Path({str(ready)!r}).touch()
            time.sleep(60)

        end_on_termination()
        write_atomically(Path({str(target)!r}), slow_write)
    """)
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]
