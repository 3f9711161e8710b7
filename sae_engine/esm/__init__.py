"""ESM2 activations from real proteins, one module per job.

- :mod:`.datadir`: the prepared data folder; :mod:`.prepare`: ``sae-engine data prepare`` builds it
  from registry packages.
- :mod:`.models`: load ESM2 (fair-esm names, ``.pt`` files, Hugging Face directories) offline.
- :mod:`.fasta`: validated FASTA reading and cropping to the model's context.
- :mod:`.batching`: length-planned batches and tokens; :mod:`.forward`: the fast forward pass.
- :mod:`.store`: the on-disk activation store and ``StoreSource``; :mod:`.extract`: extraction
  into memory or a store, resumable.
- :mod:`.live`: ESM2 run inside the ring buffer's producer; :mod:`.splice`: masked-LM loss with
  an SAE spliced in.
- :mod:`.sources`: the ``esm`` and ``esm_live`` training sources (``[data.esm]``), registered
  with :mod:`sae_engine.data.registry`; :mod:`.commands`: the ``sae-engine`` subcommands.

Needs the ``esm`` extra (fair-esm) to load models; importing this package alone imports nothing.
"""
