"""Measurements: `jaxfusion bench analyze` (per-device cost from compiled shapes)."""
