"""Falcon Mamba demo: chat with the attention-free Falcon Mamba models and watch the state stay flat."""

__version__ = "0.1.0"
