"""Export and import without the peer libraries: the native single file, bad input, continued
training of an imported run, and the kernels on a peer's stored layout (test_interop_peers.py
checks the files against the peers themselves)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sae_kernels
from sae_engine.checkpoints import latest_checkpoint, load_checkpoint
from sae_engine.cli import main as cli_main
from sae_engine.config import load_config
from sae_engine.interop import FORMATS, InteropError, PortableSAE, kernel_weights, load_model
from sae_engine.training.trainer import train

D, N, K = 16, 48, 4
SMALL = [f"model.d_in={D}", f"model.n_latents={N}", f"model.k={K}", "data.synthetic.tokens=768",
         "data.buffer_size=256", "data.eval_tokens=128", "train.batch_size=64", "train.progress=false",
         "train.precision='fp32'", "train.warmup_steps=2", "train.eval_every=100"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_config(None, SMALL + [f"train.out_dir='{out}'"]))
    return out


def _portable(seed: int = 0, kind: str = "topk") -> PortableSAE:
    g = torch.Generator().manual_seed(seed)
    return PortableSAE(kind=kind, k=K, W_enc=torch.randn(N, D, generator=g) / 4, b_enc=torch.randn(N, generator=g) / 4,
                       W_dec=torch.randn(N, D, generator=g) / 4, b_dec=torch.randn(D, generator=g) / 4,
                       threshold=0.05 if kind == "batchtopk" else None, row_cap=N if kind == "batchtopk" else None)


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_native_export_is_the_checkpoint_model_file_in_one(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    checkpoint = latest_checkpoint(run)
    want = load_file(str(checkpoint / "model.safetensors"))
    got = load_file(str(out))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["config"]) == load_checkpoint(checkpoint)[1]["config"] and int(meta["step"]) > 0
    assert cli_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no such run folder" in capsys.readouterr().err


@pytest.mark.parametrize(("fmt", "kind"), [(fmt, kind) for fmt in sorted(FORMATS) for kind in ("topk", "batchtopk")
                                           if (fmt, kind) != ("sparsify", "batchtopk")])  # sparsify: TopK only
def test_save_then_load_gives_the_same_model(fmt, kind, tmp_path):
    sae = _portable(1, kind)
    FORMATS[fmt].save(sae, tmp_path / "m")
    again = load_model(tmp_path / "m", fmt, k=K, row_cap=N)
    x = torch.randn(64, D)
    v, i = sae.encode(x)
    v2, i2 = again.encode(x)
    assert torch.equal(i, i2) and again.kind == kind and again.k == K
    torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again.decode(v2, i2), sae.decode(v, i), rtol=1e-6, atol=1e-6)


def _saelens_folder(tmp: Path, edit=None, cfg_edit=None) -> Path:
    folder = tmp / "sl"
    FORMATS["saelens"].save(_portable(), folder)
    if edit:
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    if cfg_edit:
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg_edit(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


BAD = {
    "another format": (lambda tmp: _saelens_folder(tmp), "sparsify", "not a sparsify folder"),
    "missing keys": (lambda tmp: _saelens_folder(tmp, edit=lambda t: t.pop("b_enc")), "saelens",
                     "missing tensor(s) ['b_enc']"),
    "shape mismatch": (lambda tmp: _saelens_folder(tmp, edit=lambda t: t.update(b_enc=torch.zeros(N + 1))),
                       "saelens", f"encoder bias has shape ({N + 1},), expected ({N},)"),
    "k too large": (lambda tmp: _saelens_folder(tmp, cfg_edit=lambda c: c.update(k=N + 1)), "saelens",
                    f"k = {N + 1} cannot run"),
    "k zero": (lambda tmp: _saelens_folder(tmp, cfg_edit=lambda c: c.update(k=0)), "saelens", "k = 0 cannot run"),
    "layer-norm input": (lambda tmp: _saelens_folder(tmp, cfg_edit=lambda c: c.update(normalize_activations="layer_norm")),
                         "saelens", "normalize_activations = 'layer_norm'"),
    "not a state dict": (lambda tmp: (tmp / "ae.pt").write_bytes(b"garbage") and tmp / "ae.pt",
                         "dictionary_learning", "not a torch state dict"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_named_and_nothing_is_written(case, tmp_path, capsys):
    make, fmt, words = BAD[case]
    path = make(tmp_path)
    out = tmp_path / "run"
    assert cli_main(["import", str(path), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and str(path) in err
    _nothing_written(out)


def test_existing_output_and_layernorm_runs_are_refused(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cli_main(["export", str(run), "--format", "saelens", "--out", str(taken)]) == 2
    assert "already exists" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    ln = tmp_path / "ln"
    train(load_config(None, SMALL + ["model.normalize='layernorm'", f"train.out_dir='{ln}'"]))
    for fmt in FORMATS:
        assert cli_main(["export", str(ln), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert "layernorm" in capsys.readouterr().err
        _nothing_written(tmp_path / fmt)


def test_export_folds_the_dataset_scale(run, tmp_path):
    """The folded model on raw x gives our latents and our reconstruction in raw units."""
    from sae_engine.training.trained import load_trained_sae

    assert cli_main(["export", str(run), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 0
    folded = load_model(tmp_path / "sp", "sparsify")
    ours = load_trained_sae(run)
    assert float(ours.buffers["in_scale"]) != 1.0
    x = torch.randn(128, D) * 3
    v, i = folded.encode(x)
    v2, i2 = ours.encode(x)
    assert torch.equal(i, i2)
    torch.testing.assert_close(v, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.decode(v, i), ours.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_imported_run_continues_training_with_a_fresh_optimizer(tmp_path, caplog):
    folder = _saelens_folder(tmp_path)
    run = tmp_path / "run"
    assert cli_main(["import", str(folder), "--format", "saelens", "--out", str(run)]) == 0
    imported, meta = load_checkpoint(latest_checkpoint(run))
    assert meta["imported_from"]["format"] == "saelens" and meta["step"] == 0
    config = load_config(run / "train.toml", ["data.synthetic.tokens=448", "data.eval_tokens=128",
                                              "data.buffer_size=256", "train.batch_size=64", "train.progress=false",
                                              "train.lr=1e-9", "train.warmup_steps=0"])
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert "weights imported from" in caplog.text and "optimizer state starts fresh" in caplog.text
    assert result.step == 7
    tensors, meta = load_checkpoint(latest_checkpoint(run))
    assert meta["step"] == 7 and meta["adam_count"] == 7 and "imported_from" not in meta
    # a learning rate of 1e-9 barely moves the weights: training started from the imported ones
    torch.testing.assert_close(tensors["param.W_enc"], imported["param.W_enc"], rtol=0, atol=1e-6)
    assert not torch.equal(tensors["param.W_enc"], imported["param.W_enc"])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_kernels_run_on_the_stored_layout(fmt, impl, tmp_path):
    sae = _portable(2)
    FORMATS[fmt].save(sae, tmp_path / "m")
    W_enc, b_enc, W_dec = kernel_weights(tmp_path / "m", fmt)
    transposed = {"saelens": "W_enc", "dictionary_learning": "W_dec", "sparsify": None}[fmt]
    for name, t in (("W_enc", W_enc), ("W_dec", W_dec)):
        assert t.shape == (N, D)
        assert t.is_contiguous() == (name != transposed)  # a transposed view, not a copy
    x = torch.randn(24, D)
    values, indices = sae_kernels.topk_encode(x - sae.b_dec, W_enc, b_enc, K, impl=impl)
    want_v, want_i = sae.encode(x)
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae_kernels.sparse_decode(values, indices, W_dec, impl=impl),
                               sae_kernels.sparse_decode(want_v, want_i, sae.W_dec), rtol=1e-5, atol=1e-6)


def test_threshold_encoders_need_k(tmp_path):
    sae = _portable(3)
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save({"bias": sae.b_dec, "encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc,
                "decoder.weight": sae.W_dec.T.contiguous()}, folder / "ae.pt")  # a ReLU SAE, as InterPLM's
    with pytest.raises(InteropError, match="has no k; pass --k"):
        load_model(folder, "dictionary_learning")
    relu = load_model(folder / "ae.pt", "dictionary_learning", k=K, row_cap=N)
    x = torch.randn(32, D)
    values, indices = relu.encode(x)
    dense = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    assert torch.equal((indices >= 0).sum(1), (dense > 0).sum(1))
    torch.testing.assert_close(values.sum(1), dense.sum(1), rtol=1e-5, atol=1e-6)
