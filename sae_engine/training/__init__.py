"""Training: the loop, the backend contract and its torch and JAX backends, optimizer, ring buffer, precision."""
