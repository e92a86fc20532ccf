"""Training the built-in model: procedural data (`shapes`), the two training phases
(`trainer`), their settings (`config`). Run it with `jaxfusion train --out DIR`."""
