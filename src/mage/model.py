"""MAGE: a ViT encoder-decoder over VQGAN tokens (MAGE.md 3), with the original's exact quirks.

Training step (``MAGE.forward``), per batch:
  1. one mask ratio r ~ TruncNormal(mu=0.55, sigma=0.25, [0.5, 1.0]) for the whole batch;
  2. per row, uniform noise ranks the L tokens: the ceil(0.5 L) lowest are *dropped*, the ceil(r L) lowest are
     *masked*, so dropped <= masked (a fixed number dropped keeps the encoder length static);
  3. masked ids -> [MASK], the fake class token is prepended at position 0, everything is embedded, then
     the dropped positions are removed: the encoder sees 1 + L - ceil(0.5 L) tokens, [MASK]s included;
  4. the decoder input is padded back to 1 + L positions with the *class-token feature*, which also
     overwrites every masked position (kept [MASK]s included);
  5. label-smoothed (0.1) cross-entropy over the codebook logits, masked positions only.
The output head scores against the *detached* input word embeddings (``MlmHead``).
Masks are booleans with True = masked / dropped; every random draw takes a ``torch.Generator``.
This is the plain model; :func:`mage.fastpath.apply` switches a built one to the CPU speed tricks (dropout
masks from 16-bit uniforms, written-out attention in training, fc1 + GELU fused in bf16 inference).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import MAGEConfig
from .errors import MageError
from .vocab import Vocab


# --------------------------------------------------------------------------------------------------
# building blocks (timm 0.3.2 names, so the original weights load as they are)
# --------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    """Multi-head self-attention via ``scaled_dot_product_attention`` (fp32 softmax in fp32 mode)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # q, k, v stacked, heads contiguous
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout, inplace=True)  # a Linear's output

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v, dropout on the probabilities: [B, heads, N, hd] each -> [B, heads, N, hd]."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, hd]
        return self.proj_drop(self.proj(self.attend(q, k, v).transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout, inplace=True)  # after GELU and after fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TokenEmbedding(nn.Module):
    """The original's "BertEmbeddings": Dropout(LayerNorm(word[id] + learned_pos[i]))."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout, inplace=True)  # a LayerNorm's output
        self.register_buffer("position_ids", torch.arange(seq_len).unsqueeze(0), persistent=True)
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_embeddings(self.position_ids[:, : ids.shape[1]])
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + pos))  # [B, 1+L, D]


class MlmHead(nn.Module):
    """Linear(dec -> enc) -> GELU -> LayerNorm(eps 1e-5!) -> logits against the DETACHED word embeddings + bias."""

    def __init__(self, dec_dim: int, enc_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(dec_dim, enc_dim)
        self.ln = nn.LayerNorm(enc_dim, eps=1e-5)  # the original's default-eps quirk
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.fc(x)))
        # The original ties the output to the input embeddings with `.data.detach()`: no gradient flows
        # from the logits into the embedding table, which learns only through the encoder input.
        return h @ word_embeddings.detach().t().to(h.dtype) + self.bias  # [B, 1+L, V]


# --------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------
def truncated_normal(mu: float, std: float, lo: float, hi: float, generator: torch.Generator | None = None) -> float:
    """One draw of N(mu, std) truncated to [lo, hi], by inverse CDF (same law as scipy.stats.truncnorm)."""
    a = torch.special.ndtr(torch.tensor((lo - mu) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((hi - mu) / std, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return float((torch.special.ndtri(a + u * (b - a)) * std + mu).clamp(lo, hi))


def masks_from_noise(noise: torch.Tensor, num_dropped: int, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """noise [B, L] -> (drop [B, L], mask [B, L]): the lowest-noise positions; drop <= mask."""
    order = noise.argsort(dim=1)  # positions, lowest noise first
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(noise.shape[1]).expand_as(order))  # its inverse
    return ranks < num_dropped, ranks < num_masked


def kept_positions(drop: torch.Tensor, num_dropped: int) -> torch.Tensor:
    """drop [B, N] with exactly ``num_dropped`` True per row -> kept positions [B, N - num_dropped], ascending.

    A gather with a static length instead of boolean indexing: no host sync and no data-dependent shape, so
    a training step can be captured whole by ``torch.compile`` / CUDA graphs. (Checked on CPU tensors only:
    the check itself would be a host sync on a GPU.)"""
    if drop.device.type == "cpu" and not torch.compiler.is_compiling() and not (drop.sum(1) == num_dropped).all():
        raise MageError(
            f"token dropping needs exactly {num_dropped} dropped positions per row "
            f"(ceil(mask_ratio_min * num_tokens)); got {sorted(set(drop.sum(1).tolist()))}"
        )
    return drop.to(torch.uint8).argsort(dim=1, stable=True)[:, : drop.shape[1] - num_dropped]


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class MAGE(nn.Module):
    """MAGE encoder-decoder. Logits come out over the whole vocabulary; only the first K are codes."""

    def __init__(self, config: MAGEConfig):
        super().__init__()
        self.config = c = config
        self.vocab = Vocab.from_config(c)
        L1 = c.num_tokens + 1  # + fake class token
        self.token_emb = TokenEmbedding(self.vocab.size, L1, c.embed_dim, c.dropout)
        dpr = [c.drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            [Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.dropout, dpr[i]) for i in range(c.depth)]
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L1, c.decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, c.dropout) for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim, eps=1e-6)
        self.mlm_layer = MlmHead(c.decoder_embed_dim, c.embed_dim, self.vocab.size)
        # class-conditional generation: a class embedding replaces the fake class token at position 0;
        # "no class" (label -1, or dropped for guidance) keeps the fake class token.
        self.class_emb = nn.Embedding(c.num_classes, c.embed_dim) if c.num_classes > 0 else None
        # MAGE-C: projection head on the mean-pooled encoder output
        self.contrastive_head = (
            nn.Sequential(
                nn.Linear(c.embed_dim, c.embed_dim), nn.ReLU(inplace=True), nn.Linear(c.embed_dim, c.contrastive_dim)
            )
            if c.contrastive_weight > 0
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)

    # ---- pieces ----------------------------------------------------------------------------------
    def _with_class_token(self, tokens: torch.Tensor) -> torch.Tensor:
        fake = torch.full_like(tokens[:, :1], self.vocab.fake_class_id)
        return torch.cat([fake, tokens], dim=1)  # [B, 1+L]

    def _embed(self, ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = self.token_emb(ids)  # [B, 1+L, D]
        if labels is not None and self.class_emb is not None:
            has = labels >= 0
            cls = self.class_emb(labels.clamp(min=0)).to(x.dtype)  # [B, D]
            x = torch.cat([torch.where(has[:, None], cls, x[:, 0])[:, None], x[:, 1:]], dim=1)
        return x

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.config.grad_checkpointing and self.training and x.requires_grad:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def encode(self, ids: torch.Tensor, keep: torch.Tensor | None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, 1+L] (class token first, [MASK] at masked positions), keep [B, Lk] (ascending positions that
        survive token dropping, see :func:`kept_positions`) or None -> encoder output after the final norm
        [B, Lk, D]."""
        x = self._embed(ids, labels)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, Lk, D]
        return self.norm(self._run(self.blocks, x))

    def decode(self, latent: torch.Tensor, keep: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """latent [B, Lk, D], keep [B, Lk] or None, mask [B, 1+L] -> logits [B, 1+L, V].

        Every dropped or masked position is filled with the projected class-token feature (the original's
        ``pad_with_cls_token``), so the decoder sees encoder output only at position 0 and visible tokens."""
        x = self.decoder_embed(latent)  # [B, Lk, Dd]
        B, _, Dd = x.shape
        cls_feat = x[:, :1].expand(B, mask.shape[1], Dd)  # [B, 1+L, Dd]
        if keep is not None:
            full = cls_feat.scatter(1, keep[..., None].expand(-1, -1, Dd), x)  # kept rows back in place
        else:
            full = x
        x = torch.where(mask[..., None], cls_feat, full) + self.decoder_pos_embed_learned
        x = self.decoder_norm(self._run(self.decoder_blocks, x))
        return self.mlm_layer(x, self.token_emb.word_embeddings.weight)

    # ---- training --------------------------------------------------------------------------------
    def sample_masks(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(drop [B, L], mask [B, L], mask ratio): one ratio per call, per-row random positions."""
        c = self.config
        L = c.num_tokens
        ratio = truncated_normal(c.mask_ratio_mu, c.mask_ratio_std, c.mask_ratio_min, c.mask_ratio_max, generator)
        noise = torch.rand(batch, L, generator=generator)
        drop, mask = masks_from_noise(noise, math.ceil(L * c.mask_ratio_min), math.ceil(L * ratio))
        return drop.to(device), mask.to(device), ratio

    def forward(
        self,
        tokens: torch.Tensor,
        drop: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training forward. tokens [B, L] ground-truth ids; drop/mask [B, L] (drawn when None).
        Returns loss (label-smoothed CE on masked positions), acc (masked-token accuracy), logits, latent."""
        B, L = tokens.shape
        if drop is None or mask is None:
            drop, mask = self.sample_masks(B, generator, tokens.device)[:2]
        if labels is not None and self.class_emb is not None and self.config.class_drop_prob > 0:
            keep = torch.rand(B, generator=generator).to(labels.device) >= self.config.class_drop_prob
            labels = torch.where(keep, labels, torch.full_like(labels, -1))
        pad = torch.zeros_like(mask[:, :1])
        drop1, mask1 = torch.cat([pad, drop], 1), torch.cat([pad, mask], 1)  # [B, 1+L]
        keep = kept_positions(drop1, math.ceil(L * self.config.mask_ratio_min))  # [B, 1+L-n_drop]
        ids = self._with_class_token(torch.where(mask, self.vocab.mask_id, tokens))
        latent = self.encode(ids, keep, labels)  # [B, 1+L-n_drop, D]
        logits = self.decode(latent, keep, mask1)  # [B, 1+L, V]
        code_logits = logits[:, 1:, : self.vocab.codebook_size].float()  # [B, L, K]
        ce = F.cross_entropy(
            code_logits.reshape(-1, code_logits.shape[-1]),
            tokens.reshape(-1),
            reduction="none",
            label_smoothing=self.config.label_smoothing,
        ).view(B, L)
        m = mask.float()
        loss = (ce * m).sum() / m.sum()
        acc = ((code_logits.argmax(-1) == tokens).float() * m).sum() / m.sum()
        out = {"loss": loss, "acc": acc.detach(), "logits": logits, "latent": latent}
        if self.contrastive_head is not None:  # MAGE-C: projection of the mean-pooled image-token features
            out["proj"] = self.contrastive_head(latent[:, 1:].mean(1))
        return out

    # ---- inference -------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.config.num_tokens:
            raise MageError(f"expected tokens [B, {self.config.num_tokens}], got {tuple(tokens.shape)}")

    def features(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] (mask id where unknown) -> encoder output after the final norm [B, 1+L, D]; nothing dropped."""
        self._check_tokens(tokens)
        return self.encode(self._with_class_token(tokens), None, labels)

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] (mask id where unknown) -> logits [B, 1+L, V], as one generation step computes them."""
        self._check_tokens(tokens)
        ids = self._with_class_token(tokens)
        return self.decode(self.encode(ids, None, labels), None, ids == self.vocab.mask_id)

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        map_location: str | torch.device = "cpu",
        num_heads: int | None = None,
        decoder_num_heads: int | None = None,
    ) -> "MAGE":
        """Our checkpoint (run or step directory) or an original ``{'model': state_dict}`` file.

        Head counts are not visible in an original file's shapes and are never guessed: ``num_heads`` /
        ``decoder_num_heads``, else the file's ``args``, else the released widths (768, 1024); otherwise a
        MageError asks for them (:func:`mage.official.resolve_heads`). The file is read without running code."""
        from .checkpoint import load_checkpoint, load_strict, torch_load_official
        from .official import convert_official_mage
        from .released import resolve

        path = resolve(path, "mage")
        if os.path.isdir(path):
            weights, cfg, where = load_checkpoint(path)
            if not isinstance(cfg, MAGEConfig):
                raise MageError(f"{where} holds a {type(cfg).__name__}, not a MAGE model")
            model = cls(cfg)
            load_strict(model, weights, where)
        else:
            cfg, weights, _ = convert_official_mage(torch_load_official(path), path, num_heads, decoder_num_heads)
            model = cls(cfg)
            load_strict(model, weights, path)
        return model.to(map_location).eval()
