"""sae-engine: train very wide sparse autoencoders on ESM2 activations and read biology from them."""

__version__ = "0.1.0"
