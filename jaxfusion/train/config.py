"""The settings of a training run (no heavy imports: the command line reads the defaults)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the built-in model is trained (the defaults made the shipped one)."""

    seed: int = 0
    image_size: int = 64
    vae_steps: int = 600
    vae_batch_size: int = 16
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_batch_size: int = 32
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    unconditional_probability: float = 0.1  # caption dropped: all-zero text conditioning
    min_snr_gamma: float = 5.0  # loss weight min(SNR, gamma) / SNR (arXiv 2303.09556)
