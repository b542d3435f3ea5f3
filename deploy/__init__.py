"""Reparameterization and deployment compiler: pipeline, command line, model sources and zoo."""

__all__ = []
