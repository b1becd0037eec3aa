"""bpnet: bottom-up multi-person 2D pose estimation with Part Affinity Fields."""

__version__ = "0.1.0"
