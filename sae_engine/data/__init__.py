"""Activation sources and the registry that names them."""
