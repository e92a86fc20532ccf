"""Where a model's weights live: placed on each mesh once, replicated, and reused.

Without this every call of a patch-parallel program copied all weights from the first
device to every other one (about 7 GB x P for SDXL), since the program wants them
replicated and they lived on one device.
"""

import jax
from jax.sharding import NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from sharding.parallel import ParallelConfig
from sharding.rows import ROWS


class Placement:
    """A pytree of weights (`state`: arrays, or `jax.ShapeDtypeStruct`s for programs built
    from shapes) and its replicas on the meshes it has run on."""

    def __init__(self, state):
        self.state = state
        self._replicas: dict[jax.sharding.Mesh, object] = {}

    def replicated(self, parallel: ParallelConfig) -> Sharding:
        """The sharding of weights and other replicated inputs under `parallel`."""
        if parallel.mode == "single":
            return single_device(parallel)
        return NamedSharding(parallel.mesh(), P())

    def rows(self, parallel: ParallelConfig, height: int) -> Sharding:
        """Arrays (B, `height`, ...) split by rows over the patch axis and by batch over the
        data axis; replicated where the height does not divide into P equal slabs (a jit
        boundary splits only evenly; the program's slabs of unequal real rows,
        `sharding.split`, live inside it); on one device: whole."""
        if parallel.mode == "single":
            return single_device(parallel)
        if height % parallel.patches:
            return self.replicated(parallel)
        return NamedSharding(parallel.mesh(), ROWS)

    def on(self, parallel: ParallelConfig):
        """The weights replicated on the devices of `parallel`: placed on the first call for
        a mesh, the same arrays on every later one."""
        if parallel.mode == "single":
            return self.state
        mesh = parallel.mesh()
        if mesh not in self._replicas:
            self._replicas[mesh] = replicate(self.state, self.replicated(parallel))
        return self._replicas[mesh]


def single_device(parallel: ParallelConfig) -> Sharding:
    """The sharding of mode single: the one device of `parallel.mesh()` (this process's
    first: every process of a multi-process run computes a single-device program alone)."""
    return SingleDeviceSharding(parallel.mesh().devices.flat[0])


def replicate(tree, sharding: Sharding):
    """Every array of `tree` replicated over `sharding`'s devices. An array's existing
    buffer serves its own device, so the device it was on holds it once, not twice."""

    def one(x: jax.Array) -> jax.Array:
        (home,) = x.devices() if len(x.devices()) == 1 else (None,)
        devices = sharding.addressable_devices_indices_map(x.shape)
        shards = [x if device == home else jax.device_put(x, device) for device in devices]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

    return jax.tree.map(one, tree)
