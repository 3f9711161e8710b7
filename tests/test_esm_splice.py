"""Masked-LM loss recovered with an SAE spliced into a real fair-esm ESM2 (small, random weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_engine.config import load_config
from sae_engine.esm.models import load_model, random_esm2, save_hf_esm2
from sae_engine.esm.splice import loss_recovered, masked_lm_loss
from sae_engine.torch_backend import TorchSAE

LETTERS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def _sequences(count: int, seed: int = 0) -> list[str]:
    g = np.random.default_rng(seed)
    return ["".join(g.choice(LETTERS, int(g.integers(20, 60)))) for _ in range(count)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model_dir = save_hf_esm2(random_esm2(num_layers=3, embed_dim=32, attention_heads=4), tmp_path_factory.mktemp("m"))
    return load_model(str(model_dir))


def test_identity_recovers_everything_and_zeros_nothing(loaded):
    seqs = _sequences(12)
    perfect = loss_recovered(loaded, seqs, 2, lambda x: x)
    assert perfect.loss_spliced == pytest.approx(perfect.loss_model, rel=1e-6)
    assert perfect.fraction == pytest.approx(1.0, abs=1e-5)
    assert perfect.loss_zero != pytest.approx(perfect.loss_model, rel=1e-3)
    ablated = loss_recovered(loaded, seqs, 2, torch.zeros_like)
    assert ablated.fraction == pytest.approx(0.0, abs=1e-6)


def test_closer_reconstructions_stay_closer_to_the_models_loss(loaded):
    seqs = _sequences(16, seed=2)
    g = torch.Generator().manual_seed(0)

    def noisy(scale):
        return lambda x: x + scale * x.std() * torch.randn(x.shape, generator=g)

    close, far = (loss_recovered(loaded, seqs, 1, noisy(s)) for s in (0.01, 1.0))
    assert abs(close.fraction - 1) < 0.1
    assert abs(close.loss_spliced - close.loss_model) < abs(far.loss_spliced - far.loss_model)


def test_a_trained_sae_reconstructs_in_the_models_scale_and_splices_in(loaded):
    from sae_engine.esm.extract import embed

    seqs = _sequences(60, seed=1)
    acts = torch.cat([rows[2] for rows in embed(loaded.model, loaded.alphabet, seqs, [2])])
    for normalize in ("dataset", "layernorm"):
        config = load_config(None, ["model.d_in=32", "model.n_latents=128", "model.k=8", "train.precision='fp32'",
                                    f"model.normalize='{normalize}'"])
        sae = TorchSAE(config, torch.device("cpu"))
        sae.initialize(acts, acts)
        for _ in range(150):
            sae.train_step(acts, acts, 3e-3)
        recon = sae.reconstruct(acts)
        fvu = ((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
        assert fvu < 0.3, normalize
    result = loss_recovered(loaded, seqs[:16], 2, sae.reconstruct)
    assert np.isfinite([result.loss_model, result.loss_spliced, result.loss_zero]).all()


def test_weights_without_an_lm_head_or_bad_layers_are_refused(loaded, tmp_path):
    no_head = load_model(str(save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp_path / "h",
                                          with_lm_head=False)))
    with pytest.raises(ValueError, match="no masked-LM head"):
        masked_lm_loss(no_head, ["ACDE"], 1, None)
    with pytest.raises(ValueError, match=r"intermediate layer, 1..2; got 3"):
        masked_lm_loss(loaded, ["ACDE"], 3, None)
