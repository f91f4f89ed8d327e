"""quantmoe's version, recorded in every output's manifest and quantization_config."""

__version__ = "0.1.0"
