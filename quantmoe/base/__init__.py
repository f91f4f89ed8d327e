"""The base layer: errors, the options model, paths to the bundled data, atomic files, measurement.

Nothing here imports any other part of quantmoe (docs/architecture.md).
"""
