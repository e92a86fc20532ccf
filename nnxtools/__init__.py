"""Small generic helpers for packages of Flax NNX modules, the leaf both `sharding` and
`jaxfusion` import: `parameters` (a module's parameters, abstract when built without
`rngs`) and `lazy` (a package's names imported on first use, so that importing it does not
import JAX).

They are no part of patch parallelism or of the models: here, both sides use them without
`sharding` importing `jaxfusion` or the other way. It imports nothing of the project."""
