"""Sweeps: a scenario over a grid of overrides and seeds, on Dask distributed, with statistics."""
