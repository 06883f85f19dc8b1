"""Dagster-free core library: slides, geometry, segmentation, tiling, storage."""
