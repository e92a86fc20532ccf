"""Reading traced programs: the equations of a jaxpr and of its inner programs, and the
keys-and-values messages that travel between patches (the transformer tests)."""

from collections.abc import Iterator

import jax


def equations(jaxpr, in_scan: bool = False) -> Iterator[tuple]:
    """Every equation of `jaxpr` and of its inner programs, with whether a scan runs it."""
    for eqn in jaxpr.eqns:
        yield eqn, in_scan
        for param in jax.tree.leaves(eqn.params, is_leaf=lambda p: hasattr(p, "eqns")):
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from equations(inner, in_scan or eqn.primitive.name == "scan")


def kv_messages(jaxpr) -> list[tuple[int, ...]]:
    """The shapes of every keys-and-values message gathered over the patches, (2, B, tokens,
    heads * head_dim) (`sharding.KVExchange`), in `jaxpr` and its inner programs."""
    return [
        eqn.invars[0].aval.shape
        for eqn, _ in equations(jaxpr)
        if eqn.primitive.name == "all_gather" and eqn.invars[0].aval.ndim == 4
    ]
