"""Gristmill: scripts and workflows on Kubernetes."""

__version__ = "0.1.0"
