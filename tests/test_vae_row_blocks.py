"""The VAE decoder's row-blocked layers (`jaxfusion.models.row_blocks`, forced on a small VAE
by a low threshold) against the plain decode of the same weights, on one device and split by
rows over simulated devices, and against diffusers."""

import diffusers
import jax
import numpy as np
import torch
from diffusers_models import randomize, relative_l2

from jaxfusion.models import AutoencoderKL, load_vae
from jaxfusion.models.row_blocks import set_row_blocks
from sharding import ParallelConfig
from sharding.rows import map_rows

ROUNDING = 1e-5  # float32, relative L2
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
)


def test_row_blocked_decode_equals_plain_and_diffusers(tmp_path):
    torch.manual_seed(0)
    torch_vae = randomize(diffusers.AutoencoderKL(**VAE), scale=0.2)
    torch_vae.save_pretrained(tmp_path)
    plain = load_vae(tmp_path)
    blocked = load_vae(tmp_path)
    # Every decoder layer over 1 KB blocks, in blocks of 3 or 4 rows (heights 16..64:
    # blocks that split the local image unevenly would fail the divisor rule).
    set_row_blocks(blocked, threshold_bytes=1024, block_bytes=4 * 16 * 8 * 4 * 2)
    latents = np.random.default_rng(0).standard_normal((2, 8, 4, 4)).astype("f4")
    expected = np.asarray(jax.jit(plain.decode)(latents))
    loops = [str(jax.make_jaxpr(vae.decode)(latents)).count("scan[") for vae in (plain, blocked)]
    assert loops[1] >= loops[0] + 5  # the blocked path runs (a fori_loop per blocked layer)
    one_device = np.asarray(jax.jit(blocked.decode)(latents))
    assert relative_l2(one_device, expected) < ROUNDING
    split = jax.jit(
        lambda z: map_rows(blocked, AutoencoderKL.decode, z, ParallelConfig(4, mode="sync"))
    )
    assert relative_l2(np.asarray(split(latents)), expected) < ROUNDING
    with torch.no_grad():
        reference = torch_vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    reference = reference.permute(0, 2, 3, 1).numpy()
    assert relative_l2(one_device, reference) < 1e-4
    assert expected.std() > 0.01
