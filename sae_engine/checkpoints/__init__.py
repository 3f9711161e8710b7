"""Checkpoints: the layouts (single safetensors, DCP, orbax), the one ``meta.json`` reader, one
way to write and commit a checkpoint, finding one to resume, the run-folder lock, reading runs
and exporting them.

    keys      the checkpoint tensors' names, and which are split by latent
    meta      one folder: layout, meta.json, whether it is readable
    folder    a run's checkpoints: writing, committing, ``latest``, pruning, newest readable
    lock      one training run per run folder
    single    one-process checkpoints;  dcp  torch.distributed ones;  orbax  JAX mesh ones
    state     training state read back from any layout
    runs      a run's model read whole;  export, dcp_export, stream_safetensors  one-file export
"""
from .folder import CheckpointWriteError, latest_checkpoint, newest_readable, step_folders
from .lock import RunLock, RunLockedError
from .meta import CheckpointError, layout_of, read_meta, verify
from .single import load_checkpoint, save_checkpoint

__all__ = ["CheckpointError", "CheckpointWriteError", "RunLock", "RunLockedError", "latest_checkpoint", "layout_of",
           "load_checkpoint", "newest_readable", "read_meta", "save_checkpoint", "step_folders", "verify"]
