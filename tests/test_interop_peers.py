"""Round trips with the real peer libraries (SAELens, sparsify, dictionary_learning / InterPLM).

Ours -> peer: train a tiny run here, export, load with the peer's own loader; the peer's codes
and outputs on random activations equal ours. Peer -> ours: build an SAE with the peer's own
classes, save it with the peer's own saver, import; our codes and outputs equal the peer's.
Then an SAE of each peer goes through ``features`` and GO enrichment. The peer packages come
with the ``interop`` extra (``bash .ci/install interop``); the peers are imported once here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # sparsify's Triton decoder needs CUDA; its own switch picks embedding_bag
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the interop extra: bash .ci/install interop")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the interop extra: bash .ci/install interop")
dictionary_learning = pytest.importorskip(
    "dictionary_learning", reason="dictionary-learning is in the interop extra: bash .ci/install interop")
from dictionary_learning import AutoEncoder, JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from dictionary_learning.utils import load_dictionary  # noqa: E402
import nnsight  # noqa: E402  (imported by dictionary_learning)

# nnsight patches torch process-wide on import (FakeTensor.__new__ among others, in a form this
# torch rejects), which breaks torch.compile in every later test; dictionary_learning only needs
# it for activation buffers, so undo the patches with nnsight's own patcher.
nnsight.DEFAULT_PATCHER.__exit__(None, None, None)

from sae_engine.cli import main as cli_main  # noqa: E402
from sae_engine.config import load_config  # noqa: E402
from sae_engine.training.trained import load_trained_sae  # noqa: E402
from sae_engine.interop import InteropError, load_model  # noqa: E402
from sae_engine.training.trainer import train  # noqa: E402

D, N, K = 16, 64, 4
GO = Path(__file__).resolve().parent / "data" / "go"


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within 1e-5 relative to the reference's magnitude (fp32)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    keep = indices >= 0
    # scatter_add: empty slots (index -1) add 0 at column 0 instead of overwriting it
    return torch.zeros(values.shape[0], n).scatter_add_(1, torch.where(keep, indices, 0), torch.where(keep, values.float(), 0.0))


def _ours(run: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our code [B, n] (dense, for comparison) and output [B, d_out] of a run's latest checkpoint."""
    sae = load_trained_sae(run)
    m = sae.config.model
    values, indices = sae.encode(x)
    out = sae.decode(values, indices, x) if m.is_transcoder else sae.reconstruct(x)
    return _dense(values, indices, m.n_latents), out


def _same(code_a: torch.Tensor, out_a: torch.Tensor, code_b: torch.Tensor, out_b: torch.Tensor) -> None:
    assert torch.equal(code_a > 0, code_b > 0), "the active latents differ"
    assert (code_a > 0).sum() > 0
    _close(code_a, code_b)
    _close(out_a, out_b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny synthetic runs (dataset normalisation on, so export must fold the scale)."""
    root = tmp_path_factory.mktemp("runs")
    base = [f"model.d_in={D}", f"model.n_latents={N}", f"model.k={K}", "data.synthetic.tokens=1280",
            "data.buffer_size=256", "data.eval_tokens=128", "train.batch_size=64", "train.progress=false",
            "train.precision='fp32'", "train.lr=1e-3", "train.warmup_steps=2", "train.eval_every=100"]
    kinds = {
        "topk": [],
        # row cap = n: our BatchTopK inference then keeps every latent above the threshold, as the peers do
        "batchtopk": ["model.kind='batchtopk'", f"model.batchtopk_row_cap={N}"],
        "topk_skip_transcoder": [f"model.d_out={D}", "model.skip_connection=true"],
        "batchtopk_skip_transcoder": ["model.d_out=12", "model.skip_connection=true", "model.kind='batchtopk'",
                                      f"model.batchtopk_row_cap={N}"],
        # at inference a Matryoshka BatchTopK SAE is the BatchTopK SAE it trains: exported as one
        "matryoshka": ["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[4, 16, 64]",
                       f"model.batchtopk_row_cap={N}"],
        # row cap = n: no vector overflows, so the peers' dense JumpReLU keeps the same latents
        "jumprelu": ["model.kind='jumprelu'", f"model.jumprelu_row_cap={N}", "model.l0_coef=0.01"],
    }
    out = {}
    for name, extra in kinds.items():
        train(load_config(None, base + extra + [f"train.out_dir='{root / name}'"]))
        out[name] = root / name
    return out


def _x(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(256, d, generator=torch.Generator().manual_seed(seed)) * 2.0 + 0.5


def _export(run: Path, fmt: str, out: Path) -> Path:
    assert cli_main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    return out


def _import(path: Path, fmt: str, out: Path, *extra: str) -> Path:
    assert cli_main(["import", str(path), "--format", fmt, "--out", str(out), *extra]) == 0
    return out


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random parameters in place (peer inits leave biases at zero, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5))


# -- ours -> peer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "batchtopk_skip_transcoder", "matryoshka", "jumprelu"])
def test_export_to_saelens(runs, kind, tmp_path):
    out = _export(runs[kind], "saelens", tmp_path / "sl")
    peer = sae_lens.SAE.load_from_disk(out)
    x = _x(1)
    with torch.no_grad():
        code, output = peer.encode(x), peer(x)
    _same(code, output, *_ours(runs[kind], x))


@pytest.mark.parametrize("kind", ["topk", "topk_skip_transcoder"])
def test_export_to_sparsify(runs, kind, tmp_path):
    out = _export(runs[kind], "sparsify", tmp_path / "sp")
    peer = sparsify.SparseCoder.load_from_disk(out)
    x = _x(2)
    with torch.no_grad():
        result = peer(x)
    _same(_dense(result.latent_acts, result.latent_indices, N), result.sae_out, *_ours(runs[kind], x))


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_export_to_dictionary_learning(runs, kind, tmp_path):
    out = _export(runs[kind], "dictionary_learning", tmp_path / "dl")
    peer, config = load_dictionary(str(out), "cpu")
    assert type(peer) is {"topk": AutoEncoderTopK, "batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaBatchTopKSAE,
                          "jumprelu": JumpReluAutoEncoder}[kind]
    alone = type(peer).from_pretrained(out / "ae.pt")  # the file on its own loads as well
    x = _x(3)
    with torch.no_grad():
        code = peer.encode(x)
        _same(code, peer.decode(code), *_ours(runs[kind], x))
        torch.testing.assert_close(alone.encode(x), code)


def test_each_peer_refuses_what_it_cannot_hold(runs, tmp_path, capsys):
    cases = [("topk_skip_transcoder", "saelens", "cannot represent a TopK transcoder"),
             ("batchtopk", "sparsify", "BatchTopK"),
             ("batchtopk_skip_transcoder", "sparsify", "BatchTopK"),
             ("topk_skip_transcoder", "dictionary_learning", "transcoder")]
    for kind, fmt, words in cases:
        out = tmp_path / f"{kind}-{fmt}"
        assert cli_main(["export", str(runs[kind]), "--format", fmt, "--out", str(out)]) == 2
        assert words in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".*tmp"))


# -- peer -> ours ----------------------------------------------------------------------------------


def _saelens_topk(tmp: Path, **cfg) -> tuple[object, Path]:
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K, **cfg))
    _randomize(sae, 5)
    sae.save_model(tmp / "peer")
    return sae, tmp / "peer"


@pytest.mark.parametrize("variant", ["plain", "no_b_dec_on_input", "rescale_by_decoder_norm"])
def test_import_from_saelens_topk(variant, tmp_path):
    cfg = {"plain": {}, "no_b_dec_on_input": {"apply_b_dec_to_input": False},
           "rescale_by_decoder_norm": {"rescale_acts_by_decoder_norm": True}}[variant]
    peer, path = _saelens_topk(tmp_path, **cfg)
    run = _import(path, "saelens", tmp_path / "run")
    x = _x(6)
    with torch.no_grad():
        _same(*_ours(run, x), peer.encode(x), peer(x))


def test_import_from_saelens_jumprelu_with_one_threshold(tmp_path):
    peer = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=N))
    _randomize(peer, 7)
    with torch.no_grad():
        peer.threshold.fill_(0.4)
    peer.save_model(tmp_path / "peer")
    run = _import(tmp_path / "peer", "saelens", tmp_path / "run", "--k", str(K), "--row-cap", str(N))
    x = _x(7)
    with torch.no_grad():
        _same(*_ours(run, x), peer.encode(x), peer(x))


def _saelens_jumprelu(tmp: Path) -> tuple[object, Path]:
    """An SAELens JumpReLU SAE with per-latent thresholds, saved by SAELens."""
    peer = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=N))
    _randomize(peer, 8)
    with torch.no_grad():
        peer.threshold.copy_(torch.linspace(0.0, 0.8, N))
    peer.save_model(tmp / "peer")
    return peer, tmp / "peer"


def test_import_from_saelens_jumprelu_runs_through_the_threshold_encoder(tmp_path):
    peer, path = _saelens_jumprelu(tmp_path)
    run = _import(path, "saelens", tmp_path / "run", "--row-cap", str(N))
    assert load_config(run / "train.toml").model.kind == "jumprelu"
    x = _x(8)
    with torch.no_grad():
        _same(*_ours(run, x), peer.encode(x), peer(x))
    with pytest.raises(InteropError, match="pass --row-cap"):
        load_model(path, "saelens")


def test_an_imported_jumprelu_row_cap_is_exact_with_the_overflow_reported(tmp_path):
    """A cap below some vectors' active latents: those keep their lowest-index ones, flagged."""
    peer, path = _saelens_jumprelu(tmp_path)
    x = _x(9)
    with torch.no_grad():
        dense = peer.encode(x)
    active = dense > 0
    cap = int(active.sum(1).median())  # about half the vectors have more
    code = load_model(path, "saelens", row_cap=cap).threshold_code(x)
    assert torch.equal(code.counts, active.sum(1)) and torch.equal(code.overflow, active.sum(1) > cap)
    assert 0 < int(code.overflow.sum()) < x.shape[0]
    kept = torch.zeros_like(dense).scatter_add_(1, code.indices.clamp_min(0), torch.where(code.indices >= 0, code.values, 0.0))
    first = active & (active.cumsum(1) <= cap)  # each row's lowest-index active latents, up to the cap
    _close(kept, dense * first)


def test_a_matryoshka_run_round_trips_through_dictionary_learning(runs, tmp_path):
    """Exported as MatryoshkaBatchTopKSAE (group sizes = the prefixes' differences), imported back
    as a Matryoshka BatchTopK run with the same prefixes and the same code."""
    out = _export(runs["matryoshka"], "dictionary_learning", tmp_path / "dl")
    peer, _ = load_dictionary(str(out), "cpu")
    assert peer.group_sizes.tolist() == [4, 12, 48]
    run = _import(out, "dictionary_learning", tmp_path / "run", "--row-cap", str(N))
    model = load_config(run / "train.toml").model
    assert (model.kind, model.matryoshka_prefixes) == ("matryoshka_batchtopk", [4, 16, 64])
    x = _x(12)
    with torch.no_grad():
        code = peer.encode(x)
        _same(*_ours(run, x), code, peer.decode(code))


def test_import_from_dictionary_learning_jumprelu(tmp_path):
    peer = JumpReluAutoEncoder(D, N)
    _randomize(peer, 11)
    with torch.no_grad():
        peer.threshold.copy_(torch.linspace(0.0, 0.8, N))
    (tmp_path / "peer").mkdir()
    torch.save(peer.state_dict(), tmp_path / "peer" / "ae.pt")
    (tmp_path / "peer" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "JumpReluAutoEncoder"}}))
    run = _import(tmp_path / "peer", "dictionary_learning", tmp_path / "run", "--row-cap", str(N))
    x = _x(11)
    with torch.no_grad():
        code = peer.encode(x)
        _same(*_ours(run, x), code, peer.decode(code))


@pytest.mark.parametrize("arch", ["StandardSAE", "SkipTranscoder"])
def test_import_from_saelens_relu_models(arch, tmp_path):
    """ReLU models import as threshold encoders (row cap n: every positive latent is kept)."""
    if arch == "StandardSAE":
        peer = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=N))
    else:
        peer = sae_lens.SkipTranscoder(sae_lens.SkipTranscoderConfig(d_in=D, d_sae=N, d_out=12,
                                                                         apply_b_dec_to_input=False))
    _randomize(peer, 10)
    peer.save_model(tmp_path / "peer")
    run = _import(tmp_path / "peer", "saelens", tmp_path / "run", "--k", str(K), "--row-cap", str(N))
    x = _x(10)
    with torch.no_grad():
        _same(*_ours(run, x), peer.encode(x), peer(x))


@pytest.mark.parametrize("skip", [False, True])
def test_import_from_sparsify(skip, tmp_path):
    cfg = sparsify.SparseCoderConfig(num_latents=N, k=K, transcode=skip, skip_connection=skip)
    peer = sparsify.SparseCoder(D, cfg)
    _randomize(peer, 8)
    peer.save_to_disk(tmp_path / "peer")
    run = _import(tmp_path / "peer", "sparsify", tmp_path / "run")
    x = _x(8)
    with torch.no_grad():
        result = peer(x)
    _same(*_ours(run, x), _dense(result.latent_acts, result.latent_indices, N), result.sae_out)


@pytest.mark.parametrize("cls", ["AutoEncoderTopK", "BatchTopKSAE", "AutoEncoder"])
def test_import_from_dictionary_learning(cls, tmp_path):
    """AutoEncoder is the ReLU SAE of InterPLM's published ESM2 SAEs (ae.pt, no k)."""
    peer = {"AutoEncoderTopK": lambda: AutoEncoderTopK(D, N, K), "BatchTopKSAE": lambda: BatchTopKSAE(D, N, K),
            "AutoEncoder": lambda: AutoEncoder(D, N)}[cls]()
    _randomize(peer, 9)
    if cls == "BatchTopKSAE":
        peer.threshold.fill_(0.3)
    folder = tmp_path / "peer"
    folder.mkdir()
    torch.save(peer.state_dict(), folder / "ae.pt")  # what dictionary_learning's training loop writes
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "activation_dim": D,
                                                                "dict_size": N, "k": K}}))
    extra = ["--k", str(K), "--row-cap", str(N)] if cls == "AutoEncoder" else ["--row-cap", str(N)]
    run = _import(folder, "dictionary_learning", tmp_path / "run", *extra)
    x = _x(9)
    with torch.no_grad():
        code = peer.encode(x)
        _same(*_ours(run, x), code, peer.decode(code))


# -- an SAE of each peer through features and GO enrichment ---------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A residue store of 48 fixture proteins (random sequences) from a small random ESM2 (d=32)."""
    from sae_engine.esm.extract import ExtractConfig, extract_to_store
    from sae_engine.esm.models import load_model, random_esm2
    from esm_fixtures import save_hf_esm2

    tmp = tmp_path_factory.mktemp("store")
    model_dir = save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp / "esm2")
    accessions = (GO / "population.txt").read_text().split()[::6][:48]
    g = np.random.default_rng(11)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    fasta = tmp / "proteins.fasta"
    fasta.write_text("".join(f">{a}\n{''.join(g.choice(letters, int(g.integers(15, 40))))}\n" for a in accessions))
    extract_to_store(fasta, load_model(str(model_dir)), tmp / "store", ExtractConfig(layers=(1,)), progress=False)
    return tmp / "store", accessions


def _peer_sae(fmt: str, folder: Path):
    """A d=32 SAE built and saved by the peer library; returns (peer module, import args)."""
    d, n = 32, 48
    if fmt == "saelens":
        peer = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d, d_sae=n, k=K))
        _randomize(peer, 12)
        peer.save_model(folder)
        return peer, []
    if fmt == "sparsify":
        peer = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(num_latents=n, k=K))
        _randomize(peer, 13)
        peer.save_to_disk(folder)
        return peer, []
    peer = AutoEncoder(d, n)  # InterPLM's published layout: a ReLU SAE in ae.pt
    _randomize(peer, 14)
    folder.mkdir()
    torch.save(peer.state_dict(), folder / "ae.pt")
    return peer, ["--k", str(K), "--row-cap", str(n)]


def _peer_code(peer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(peer, sparsify.SparseCoder):
            result = peer.encode(x)
            return _dense(result.top_acts, result.top_indices, peer.num_latents)
        return peer.encode(x)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify", "dictionary_learning"])
def test_peer_sae_through_features_and_go_enrichment(fmt, store, tmp_path):
    from sae_engine.esm.extract import ActivationStore

    store_dir, accessions = store
    peer, extra = _peer_sae(fmt, tmp_path / "peer")
    path = tmp_path / "peer" / ("ae.pt" if fmt == "dictionary_learning" else "")
    run = _import(path, fmt, tmp_path / "run", *extra)
    assert cli_main(["features", "--store", str(store_dir), "--layer", "1", "--run", str(run),
                     "--out", str(tmp_path / "acts.npz"), "--study", str(tmp_path / "study.tsv"), "--top-n", "1000"]) == 0
    # The study sets (no cap) are the peer's own encoder's: the proteins where each feature fires.
    st = ActivationStore(store_dir)
    vectors = np.concatenate([np.load(p) for p in st.shard_paths(1)])
    want = set()
    for window in st.index():
        rows = torch.from_numpy(vectors[window["offset"]: window["offset"] + window["rows"]]).float()
        fired = _peer_code(peer, rows).max(dim=0).values > 0
        want |= {(f"f{f}", window["id"]) for f in torch.nonzero(fired).flatten().tolist()}
    got = {tuple(line.split("\t")) for line in (tmp_path / "study.tsv").read_text().splitlines()}
    assert got == want and len(got) > 0
    population = tmp_path / "population.txt"
    population.write_text("\n".join(accessions) + "\n")
    assert cli_main(["enrich", "--study", str(tmp_path / "study.tsv"), "--population", str(population),
                     "--annotations", str(GO / "annotations.tsv"), "--ontology", str(GO / "go_subset.obo"),
                     "--out", str(tmp_path / "go.tsv"), "--max-q", "1"]) == 0
    table = (tmp_path / "go.tsv").read_text().splitlines()
    header = table[0].split("\t")
    rows = [dict(zip(header, line.split("\t"))) for line in table[1:]]
    assert rows and {r["feature"] for r in rows} <= {f for f, _ in want}
    assert all(0 <= float(r["q_value"]) <= 1 for r in rows)
