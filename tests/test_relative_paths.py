"""Every path the commands take may be relative to the working directory, as the docs write
them: `jaxfusion convert path/to/model model-flax`, `generate --model model-flax`, `convert
model-flax model-again --to-diffusers` (orbax, underneath, takes absolute paths only). A
relative folder that does not exist is refused as a missing folder, not with the hub
client's exception."""

import os
import shutil
import subprocess
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from commands import SCRIPT, refused
from safetensors.numpy import load_file

from jaxfusion import cli
from jaxfusion.builtin import builtin_model_path

PROMPT = "a red circle at the top left"
NETWORKS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def generate(cwd: Path, cache: Path, model: str, out: str) -> np.ndarray:
    """`jaxfusion generate --model MODEL --out OUT` run in `cwd`, as a user runs it."""
    env = dict(os.environ, JAXFUSION_CACHE=str(cache), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [str(SCRIPT), "generate", "--model", model, "--prompt", PROMPT, "--steps", "2",
         "--out", out],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return np.load(cwd / out)


@pytest.mark.slow
def test_convert_there_and_back_and_generate_with_relative_paths(tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(builtin_model_path(), work / "path" / "to" / "builtin")
    monkeypatch.chdir(work)
    assert cli.main(["convert", "path/to/builtin", "builtin-flax"]) == 0
    assert cli.main(["convert", "builtin-flax", "builtin-again", "--to-diffusers"]) == 0
    assert (work / "builtin-flax" / "unet" / "flax_params").is_dir()
    assert sorted(p.name for p in work.iterdir()) == ["builtin-again", "builtin-flax", "path"]
    # There and back, every weight is the source's, bit for bit.
    for network, name in NETWORKS.items():
        source = load_file(work / "path/to/builtin" / network / f"{name}.safetensors")
        again = load_file(work / "builtin-again" / network / f"{name}.safetensors")
        assert source.keys() == again.keys(), network
        for key, array in source.items():
            np.testing.assert_array_equal(again[key], array, err_msg=f"{network} {key}")

    cache = tmp_path / "cache"
    flax = generate(work, cache, "builtin-flax", "flax.npy")
    source = generate(work, cache, "path/to/builtin", "source.npy")
    assert flax.shape == (64, 64, 3)
    np.testing.assert_array_equal(flax, source)


def test_a_missing_relative_folder_is_named(tmp_path, monkeypatch, capsys):
    """ "models/sdxl" may also be a hub id: offline, the hub cannot give it, and the refusal
    says both, from where the path was read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for argv in (
        ["generate", "--model", "models/sdxl", "--prompt", PROMPT, "--out", "image.png"],
        ["convert", "models/sdxl", "sdxl-flax"],
    ):
        error = refused(capsys, *argv)
        assert f"no such folder: models/sdxl (from {tmp_path})" in error, error
        assert "as a Hugging Face hub id it could not be fetched" in error
    missing = refused(capsys, "convert", "sdxl", "sdxl-flax")  # not a hub id
    assert "no such folder: sdxl" in missing
    assert list(tmp_path.iterdir()) == []


def test_lora_from_a_missing_relative_path_is_named(tmp_path, monkeypatch):
    from convert import lora

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"no such folder: loras/mine \(from "):
        lora.read_lora("loras/mine")
