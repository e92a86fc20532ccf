"""2-D convolution whose row padding comes from the neighbouring patches (halo rows)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nnxtools.parameters import parameter, uniform
from sharding.codecs import HALO
from sharding.context import PatchContext, PatchPrimitive


def neighbour_rows(messages: dict, context: PatchContext) -> dict:
    """The halo messages this patch receives (or their payloads): "above" the "down"
    message of the patch above, "below" the "up" message of the patch below; zeros at the
    image's top and bottom edge (the conv's zero padding). Each device sends to its two
    neighbours only (`PatchContext.permute`)."""
    patches = context.patches
    down = [(i, i + 1) for i in range(patches - 1)]
    up = [(i + 1, i) for i in range(patches - 1)]
    routes = {"above": ("down", down), "below": ("up", up)}
    return {
        side: jax.tree.map(lambda m, pairs=pairs: context.permute(m, pairs), messages[sent])
        for side, (sent, pairs) in routes.items()
        if sent in messages
    }


class Conv2d(PatchPrimitive):
    """`torch.nn.Conv2d`, NHWC, zero-padded by `padding = (before, after)` rows and columns.

    The default `padding` is `kernel_size // 2` on every side (`torch.nn.Conv2d(padding=k//2)`);
    `(0, 1)` is diffusers' `Downsample2D(padding=0)`, which pads only the bottom and the right.
    In the patch-parallel program the rows come from the neighbouring patches: `before` rows
    from the patch above, `after` rows from the patch below (see `pad_rows`).

    `current_halo`: the halo always comes from this step's input, in displaced steps too, and
    no stale buffer is kept (for a layer whose input is cheap to exchange: the UNet's
    `conv_in` sees the 4-channel latent).

    Parameters: `kernel` (kh, kw, in, out), `bias` (out,). Stale buffer (displaced steps):
    `halo`, the rows this patch sent in the previous step (see `receive_halo`): {"down": (B,
    before * W, in) its last real rows, "up": (B, after * W, in) its first} in the codec's
    form (`sharding.codecs`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: tuple[int, int] | None = None,
        current_halo: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = (kernel_size // 2,) * 2 if padding is None else tuple(padding)
        self.current_halo = current_halo
        self.dtype = dtype
        init = uniform((in_channels * kernel_size * kernel_size) ** -0.5)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = parameter(rngs, init, shape, dtype)
        self.bias = parameter(rngs, init, (out_channels,), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in) -> (B, H', W', out), H' = (H + before + after - k) // stride + 1
        (H // stride for the default padding and even H)."""
        return self.convolve(self.pad_rows(x))

    def convolve(self, rows: jax.Array) -> jax.Array:
        """The convolution of rows already padded above and below (`pad_rows`; the columns
        are padded here): (B, H + before + after, W, in) -> (B, H', W', out)."""
        y = jax.lax.conv_general_dilated(
            rows.astype(self.dtype),
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((0, 0), self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=jnp.float32,
        )
        return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)

    def pad_rows(self, x: jax.Array) -> jax.Array:
        """Pads `x` (B, H, W, C) with `before` rows on top and `after` underneath: zeros on
        one device and in naive patches, else the rows the neighbours send (`receive_halo`). Where
        padding rows follow this patch's real ones (`real_rows`), the rows from below go
        right after the real rows."""
        above, below = self.padding
        if not above + below:
            return x
        real_rows = self.real_rows(x.shape[1])
        if real_rows is None:
            last = x[:, x.shape[1] - above :]
        else:
            last = jax.lax.dynamic_slice_in_dim(x, real_rows - above, above, axis=1)
        halo = self.receive_halo(x[:, :below], last)
        if halo is None:
            return jnp.pad(x, ((0, 0), (above, below), (0, 0), (0, 0)))
        parts = [halo["above"]] if above else []
        if not below:
            return jnp.concatenate([*parts, x], axis=1)
        if real_rows is None:
            return jnp.concatenate([*parts, x, halo["below"]], axis=1)
        rows = jnp.concatenate([*parts, x, jnp.zeros_like(halo["below"])], axis=1)
        return jax.lax.dynamic_update_slice_in_dim(rows, halo["below"], above + real_rows, axis=1)

    def real_rows(self, rows: int) -> jax.Array | None:
        """How many of this patch's `rows` rows are real where padding rows follow them
        (`PatchContext.uneven`); None where all are."""
        split = None if self.patch is None else self.patch.uneven(rows)
        return None if split is None else split.real_rows(self.patch.index())

    def receive_halo(self, first: jax.Array, last: jax.Array) -> dict[str, jax.Array] | None:
        """The rows this patch receives for the rows it sends, `first` (B, after, W, C) its
        first rows and `last` (B, before, W, C) its last real ones: {"above": (B, before, W,
        C) the patch above's last, "below": (B, after, W, C) the patch below's first}, those
        with rows, zeros at the image's edges (`PatchContext.receive`; compressed in
        displaced steps as `sharding.codecs.HALO` says, but for a `current_halo`). None
        where nothing is received: on one device and in naive patches (zero padding)."""
        above, below = self.padding
        if self.patch is None or not above + below:
            return None
        b, _, w, c = first.shape
        messages = {}
        if above:
            messages["down"] = last.reshape(b, above * w, c)
        if below:
            messages["up"] = first.reshape(b, below * w, c)
        context = self.patch
        received = context.receive(
            self,
            "halo",
            messages,
            lambda messages: neighbour_rows(messages, context),
            current=self.current_halo,
            codec_of=HALO,
        )
        if received is None:
            return None
        rows = {"above": above, "below": below}
        return {side: m.reshape(b, rows[side], w, c) for side, m in received.value.items()}
