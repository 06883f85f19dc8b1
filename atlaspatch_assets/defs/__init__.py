"""The Dagster layer: thin adapters over `core.stages` (assets, resources, partitions, jobs,
sensors, checks); `definitions.defs` is the code location."""
