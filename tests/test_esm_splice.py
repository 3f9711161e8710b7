"""Masked-LM loss recovered with an SAE spliced into a real fair-esm ESM2 (small, random weights)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_engine.config import load_config
from sae_engine.esm.models import load_model, random_esm2
from esm_fixtures import save_hf_esm2
from sae_engine.esm.splice import loss_recovered, mask_residues, masked_lm_loss
from sae_engine.training.torch_backend import TorchSAE

LETTERS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def _sequences(count: int, seed: int = 0) -> list[str]:
    g = np.random.default_rng(seed)
    return ["".join(g.choice(LETTERS, int(g.integers(20, 60)))) for _ in range(count)]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model_dir = save_hf_esm2(random_esm2(num_layers=3, embed_dim=32, attention_heads=4), tmp_path_factory.mktemp("m"))
    return load_model(str(model_dir))


def _reference_losses(loaded, sequences: list[str], layer: int, seed: int) -> tuple[float, float]:
    """Masked-LM loss of the model and with block ``layer``'s output zeroed at residues, computed
    here with fair-esm's own batch converter, modules and forward (no hook, no engine tokenizer).
    -> (loss of the model, loss with zeros)."""
    model, alphabet = loaded.model, loaded.alphabet
    _, _, tokens = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])
    lengths = torch.tensor([len(s) for s in sequences])
    masked, chosen = mask_residues(tokens, lengths, alphabet.mask_idx, 0.15, seed)
    positions = torch.arange(tokens.shape[1])
    residue = (positions >= 1) & (positions[None, :] <= lengths[:, None])
    with torch.no_grad():
        logits_model = model(masked)["logits"]
        # ESM2.forward written out with fair-esm's own modules, zeroing block ``layer``'s output.
        padding = masked.eq(model.padding_idx)
        x = model.embed_scale * model.embed_tokens(masked)
        if model.token_dropout:
            is_mask = masked.eq(model.mask_idx)
            ratio = is_mask.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0) * (1 - 0.15 * 0.8) / (1 - ratio)[:, None, None]
        x = (x * (~padding).unsqueeze(-1).to(x)).transpose(0, 1)
        for index, block in enumerate(model.layers):
            x, _ = block(x, self_attn_padding_mask=padding)
            if index + 1 == layer:
                x = x.masked_fill(residue.T.unsqueeze(-1), 0.0)
        logits_zero = model.lm_head(model.emb_layer_norm_after(x).transpose(0, 1))
    loss = lambda logits: F.cross_entropy(logits[chosen], tokens[chosen]).item()  # noqa: E731
    return loss(logits_model), loss(logits_zero)


def test_model_and_zero_ablation_losses_equal_fair_esms_own(loaded):
    seqs = _sequences(8)  # one batch of masked_lm_loss: its masks use seed + 0
    want_model, want_zero = _reference_losses(loaded, seqs, 2, seed=5)
    perfect = loss_recovered(loaded, seqs, 2, lambda x: x, seed=5)
    assert perfect.loss_model == pytest.approx(want_model, rel=1e-5)
    assert perfect.loss_spliced == pytest.approx(want_model, rel=1e-5) and perfect.fraction == pytest.approx(1.0, abs=1e-4)
    assert perfect.loss_zero == pytest.approx(want_zero, rel=1e-5)
    assert abs(want_zero - want_model) > 0.05  # the ablation changes the loss: the check has teeth
    ablated = loss_recovered(loaded, seqs, 2, torch.zeros_like, seed=5)
    assert ablated.loss_spliced == pytest.approx(want_zero, rel=1e-5) and ablated.fraction == pytest.approx(0.0, abs=1e-4)


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
