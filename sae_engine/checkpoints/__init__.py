"""Checkpoints: layouts (single safetensors, DCP, orbax), reading and writing runs, export."""
