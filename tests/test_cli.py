"""The installed `jaxfusion` console script, run as a user runs it (a subprocess), with one
cache folder for the whole module: compiled programs are shared through JAX's persistent
cache. Refusals and conversions run its entry point in this process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from commands import jaxfusion_command, refused
from PIL import Image
from pipelines import SIZE, save_random_pipeline

from jaxfusion import cli
from jaxfusion.cli import running
from jaxfusion.cli.generate import describe_parallel
from jaxfusion.cli.options import lora_option
from jaxfusion.images import psnr

PROMPT = "a red circle at the top left"
FAST = ["--steps", "3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_generate_builtin_png_then_npy_from_the_disk_cache(cache, tmp_path):
    png, npy = tmp_path / "image.png", tmp_path / "image.npy"
    first = jaxfusion_command(cache, "generate", "--prompt", PROMPT, *FAST, "--out", str(png))
    assert "trained on coloured shapes" in first.stderr and "compiling" in first.stderr
    assert "from the disk cache" not in first.stderr
    assert "single device" in first.stderr.splitlines()
    second = jaxfusion_command(cache, "generate", "--prompt", PROMPT, *FAST, "--out", str(npy))
    # What the stage did, in its last line: not compiled (no "✓ compiling" line).
    assert "✓ traced; the compiled program came from the disk cache (" in second.stderr
    assert "✓ compiling" not in second.stderr
    # A new size compiles its own program (small helper programs may come from the cache).
    new_size = jaxfusion_command(
        cache,
        "generate",
        "--prompt",
        PROMPT,
        *FAST,
        "--height",
        "80",
        "--out",
        str(tmp_path / "80.npy"),
    )
    assert "✓ compiling" in new_size.stderr and "from the disk cache" not in new_size.stderr
    (tmp_path / "80.npy").unlink()
    array = np.load(npy)
    assert array.shape == (64, 64, 3) and array.dtype == np.float32
    pixels = np.asarray(Image.open(png))
    np.testing.assert_array_equal(pixels, np.round(array * 255).astype(np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.npy", "image.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary file's 0o600

    # The same request through the Python API gives the same image, bit for bit: run in a
    # process like the command's, with one CPU device (and the command's compilation cache).
    # This test's own process has 8 simulated devices (conftest.py), for which XLA compiles
    # the same program with other CPU loop partitions: rounding differs there, by up to about
    # 1e-6 depending on the machine.
    api = tmp_path / "api.npy"
    code = (
        "import numpy as np\n"
        "import jaxfusion\n"
        "from jaxfusion.builtin import builtin_model_path\n"
        "from jaxfusion.compilation_cache import enable_compilation_cache\n"
        "enable_compilation_cache()\n"
        "pipe = jaxfusion.load_pipeline(builtin_model_path())\n"
        f"np.save({str(api)!r}, pipe({PROMPT!r}, num_inference_steps=3)[0])\n"
    )
    env = dict(os.environ, JAXFUSION_CACHE=str(cache), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    np.testing.assert_array_equal(np.load(api), array)


def test_refusals_before_compiling(tmp_path, capsys):
    out = str(tmp_path / "image.png")
    bad_height = refused(capsys, "generate", "--prompt", PROMPT, "--height", "62", "--out", out)
    assert "height=62" in bad_height and "use 56 or 64" in bad_height
    assert "compiling" not in bad_height
    bad_suffix = refused(capsys, "generate", "--prompt", PROMPT, "--out", str(tmp_path / "x.jpg"))
    assert ".png" in bad_suffix
    nowhere = str(tmp_path / "nowhere")
    missing = refused(capsys, "generate", "--model", nowhere, "--prompt", PROMPT, "--out", out)
    assert "no such folder" in missing
    unknown = refused(capsys, "generate", "--prompt", PROMPT, "--scheduler", "pndm", "--out", out)
    assert "euler" in unknown
    assert not list(tmp_path.iterdir())


def test_mistakes_are_refused_in_the_options_words(tmp_path, capsys, monkeypatch):
    """Each refusal names the option at fault and what would work, before anything loads."""
    monkeypatch.setattr(running, "simulate_cpu_devices", lambda count: None)  # JAX has started
    out = str(tmp_path / "image.png")

    def refusal(*argv: str) -> str:
        error = refused(capsys, *argv)
        assert "loading" not in error and "compiling" not in error
        return error

    def generate(*options: str) -> str:
        return refusal("generate", "--prompt", PROMPT, *options)

    lora = tmp_path / "style.safetensors"
    lora.touch()
    bad_scale = generate("--lora", f"{lora}:abc", "--out", out)
    assert "argument --lora" in bad_scale and "'abc'" in bad_scale and "PATH:SCALE" in bad_scale
    missing = refusal("generate", "--prompts", str(tmp_path / "missing.txt"), "--out", out)
    assert f"--prompts {tmp_path / 'missing.txt'}: No such file" in missing
    (tmp_path / "one.txt").touch()
    under_a_file = generate("--out", str(tmp_path / "one.txt" / "o.png"))
    assert f"{tmp_path / 'one.txt'} is a file, not a folder" in under_a_file
    for strength in ("0", "1.5"):
        assert f"argument --strength: {strength} is not in (0, 1]" in generate(
            "--image", out, "--strength", strength, "--out", out
        )
    assert "--no-cfg-parallel" in generate(
        "--devices", "2", "--cfg-parallel", "--guidance", "0", "--out", out
    )
    negative = generate("--guidance", "-3", "--out", out)
    assert "argument --guidance: -3 is negative: use 0 to 1" in negative
    few_steps = refusal("profile", "--devices", "4", "--steps", "3", "--out", str(tmp_path / "p"))
    assert "--steps 3: no steady-state loop" in few_steps and "use --steps 4 or more" in few_steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt", "style.safetensors"]
    # The range refused is the one documented.
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    documented = " ".join(capsys.readouterr().out.split())
    assert "with --image: how much to change it, in (0, 1]" in documented


def test_lora_scale_after_the_last_colon(tmp_path):
    with_colon = tmp_path / "a:b.safetensors"
    with_colon.touch()
    assert lora_option(f"{tmp_path}/x.safetensors:0.5") == (f"{tmp_path}/x.safetensors", 0.5)
    assert lora_option(str(with_colon)) == (str(with_colon), 1.0)  # a path, not a scale
    assert lora_option("user/lora") == ("user/lora", 1.0)


def test_the_run_says_its_mode_and_devices_once():
    from sharding.parallel import ParallelConfig

    lines = {
        "single device": ParallelConfig(),
        "displaced on 4 devices, steps 0-4 synchronous": ParallelConfig(devices=4),
        "displaced on 2 devices, step 0 synchronous, exchange compressed int8": ParallelConfig(
            devices=2, warmup_steps=0, compress="int8"
        ),
        "sync on 8 devices (2 guidance halves x 4 patches)": ParallelConfig(
            devices=8, cfg=2, mode="sync"
        ),
        "naive on 4 devices (2 prompt groups x 2 patches), row slabs": ParallelConfig(
            devices=4, data=2, mode="naive"
        ),
    }
    for line, parallel in lines.items():
        assert describe_parallel(parallel, 50) == line


@pytest.mark.slow
def test_latents_file_and_convert_round_trip(cache, tmp_path, capsys):
    """A diffusers folder -> Flax (orbax) -> diffusers again (converted in this process); each
    generates the same image from the same --latents file, and diffusers loads the last one."""
    source = save_random_pipeline(tmp_path / "source", "sdxl-light")
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    flax_folder, back = tmp_path / "flax", tmp_path / "back"
    assert cli.main(["convert", str(source), str(flax_folder)]) == 0
    assert (flax_folder / "unet" / "flax_params").is_dir()
    assert not list(flax_folder.glob("*/*.safetensors"))
    assert cli.main(["convert", str(flax_folder), str(back), "--to-diffusers"]) == 0
    assert "exists" in refused(capsys, "convert", str(flax_folder), str(back))

    images = {}
    for name, folder in (("source", source), ("flax", flax_folder), ("back", back)):
        out = tmp_path / f"{name}.npy"
        jaxfusion_command(
            cache, "generate", "--model", str(folder), "--prompt", PROMPT, *FAST,
            "--latents", str(tmp_path / "latents.npy"), "--out", str(out),
        )  # fmt: skip
        images[name] = np.load(out)
    assert images["source"].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(images["flax"], images["source"])
    np.testing.assert_array_equal(images["back"], images["source"])
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLPipeline"
    )


@pytest.mark.slow
def test_compare_with_diffusers(cache, tmp_path):
    source = save_random_pipeline(tmp_path / "source", "sd")
    out = tmp_path / "compare.png"
    result = jaxfusion_command(
        cache, "compare", "--model", str(source), "--prompt", PROMPT, *FAST,
        "--scheduler", "dpmpp", "--runs", "2", "--out", str(out),
    )  # fmt: skip
    match = re.search(r"PSNR ([\d.]+|inf) dB", result.stderr)
    assert match, result.stderr
    assert float(match.group(1)) >= 60
    assert re.search(r"jaxfusion [\d.]+ s, diffusers [\d.]+ s", result.stderr)
    assert "single device" in result.stderr  # the run's mode, said as generate says it
    image = np.asarray(Image.open(out))
    assert image.shape == (SIZE, 3 * SIZE + 2 * 4, 3)
    # The middle panel is diffusers' image: check it against the PSNR the command printed.
    ours, theirs = image[:, :SIZE] / 255, image[:, SIZE + 4 : 2 * SIZE + 4] / 255
    assert psnr(ours, theirs) > 40


@pytest.mark.slow
def test_generate_on_simulated_devices(cache, tmp_path):
    """--devices 8 works on a CPU-only machine as it is: the command simulates the devices.
    Synchronous patch parallelism (4 patches, CFG halves split) gives the single-device
    image."""
    images = {}
    for mode, options in (("single", []), ("sync", ["--devices", "8", "--cfg-parallel"])):
        out = tmp_path / f"{mode}.npy"
        jaxfusion_command(
            cache, "generate", "--prompt", PROMPT, *FAST, "--parallel", mode, *options,
            "--out", str(out),
        )  # fmt: skip
        images[mode] = np.load(out)
    np.testing.assert_allclose(images["sync"], images["single"], atol=1e-4)
