"""Parity with the original code's outputs on the official_A fixture (fp32, eval mode)."""

import dataclasses
import math

import torch

from conftest import rel_err
from mage.model import MAGE
from mage.vqgan import VQTokenizer


def test_tokenizer_parity(official_a, expected):
    tok = VQTokenizer.from_pretrained(str(official_a / "vqgan_official.pth"))
    assert tok.config.base_channels == 32 and tok.config.channel_mult == (1, 1, 2, 2, 4)
    with torch.no_grad():
        z = tok.encoder(expected["images"])
    assert rel_err(z, expected["vq_z"]) < 1e-4
    ids = tok.encode(expected["images"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 256)
    assert torch.equal(ids, expected["vq_indices"])  # token ids exactly
    dec = tok.decode(expected["vq_indices"])
    assert rel_err(dec, expected["vq_decoded"]) < 1e-4  # decoded pixels


def test_tokenizer_from_mage_file(official_a, expected):
    """The released MAGE file carries the VQGAN under vqgan.*: it loads as a tokenizer too."""
    tok = VQTokenizer.from_pretrained(str(official_a / "mage_official.pth"))
    assert torch.equal(tok.encode(expected["images"]), expected["vq_indices"])


def _official_model(official_a) -> MAGE:
    return MAGE.from_pretrained(str(official_a / "mage_official.pth"), num_heads=4, decoder_num_heads=4)


def test_mage_logits_and_features(official_a, expected):
    m = _official_model(official_a)
    assert (m.vocab.size, m.vocab.mask_id, m.vocab.fake_class_id) == (2025, 2024, 1100)
    with torch.no_grad():
        logits = m.logits(expected["tokens_in"])
        feats = m.features(expected["tokens_in"])
    assert logits.shape == (2, 257, 2025)
    assert rel_err(logits, expected["logits"]) < 1e-4
    assert rel_err(feats, expected["encoder_features"]) < 1e-4


def test_mage_training_loss(official_a, expected):
    """The original's training forward with its masks: 128 dropped, 180 masked, class-token padding, LS 0.1."""
    m = _official_model(official_a)
    drop, mask = expected["train_drop_mask"][:, 1:], expected["train_all_mask"][:, 1:]
    assert drop.sum(1).tolist() == [128, 128] and mask.sum(1).tolist() == [180, 180]
    with torch.no_grad():
        out = m(expected["train_tokens"], drop, mask)
    assert out["latent"].shape == (2, 129, 64)
    assert rel_err(out["latent"], expected["train_encoder_features"]) < 1e-4
    assert math.isclose(out["loss"].item(), expected["train_loss"], rel_tol=1e-5)


def test_quirks_matter(official_a, expected):
    """Each named quirk changes the numbers: undoing it breaks parity (so the parity test is not vacuous)."""
    m = _official_model(official_a)
    drop, mask = expected["train_drop_mask"][:, 1:], expected["train_all_mask"][:, 1:]
    with torch.no_grad():
        # label smoothing 0.1
        m.config = dataclasses.replace(m.config, label_smoothing=0.0)
        assert abs(m(expected["train_tokens"], drop, mask)["loss"].item() - expected["train_loss"]) > 1e-3
        m.config = dataclasses.replace(m.config, label_smoothing=0.1)
        # MLM LayerNorm eps 1e-5 (not 1e-6)
        m.mlm_layer.ln.eps = 1e-6
        assert rel_err(m.logits(expected["tokens_in"]), expected["logits"]) > 1e-6
        m.mlm_layer.ln.eps = 1e-5
        # class-token padding of masked decoder positions: without it, kept [MASK] features leak in
        lat = m.encode(m._with_class_token(expected["tokens_in"]), None)
        ids = m._with_class_token(expected["tokens_in"])
        no_pad = m.decode(lat, None, torch.zeros_like(ids, dtype=torch.bool))
        assert rel_err(no_pad, expected["logits"]) > 1e-3


def test_output_head_is_detached():
    """The tied output head does not send gradients into the word embeddings."""
    from mage.config import mage_preset

    m = MAGE(mage_preset("tiny"))
    x = torch.randn(2, 17, m.config.decoder_embed_dim)
    m.mlm_layer(x, m.token_emb.word_embeddings.weight).sum().backward()
    assert m.token_emb.word_embeddings.weight.grad is None
    assert m.mlm_layer.fc.weight.grad is not None
