"""lensexp: strong-lens parameters from neural networks, with calibrated uncertainties."""

__version__ = "0.1.0"
