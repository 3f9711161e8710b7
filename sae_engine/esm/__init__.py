"""ESM2 activations from real proteins: data preparation, model loading, FASTA, extraction.

- :mod:`.prepare`: ``sae-engine data prepare`` builds standard files from registry packages.
- :mod:`.models`: load ESM2 (fair-esm names, ``.pt`` files, Hugging Face directories) offline.
- :mod:`.fasta`: validated FASTA reading and cropping to the model's context.
- :mod:`.extract`: batched extraction into an on-disk activation store, and ``StoreSource``.

Needs the ``esm`` extra (fair-esm); importing this package alone does not import torch or esm.
"""
