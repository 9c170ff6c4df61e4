"""Typed configs with named presets, command-line overrides and JSON round trips.

Every trainable thing has one dataclass holding both its architecture and its training recipe, so a
checkpoint directory carries the single resolved config that made it (``config.json``).

    cfg = tokenizer_preset("fmnist-32")
    cfg = apply_overrides(cfg, ["lr=2e-4", "channel_mult=1,2,2"])
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from .errors import MageError

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# validation: a config that cannot train or run is refused when it is built (presets, --set, config.json)
# --------------------------------------------------------------------------------------------------
def _check(cfg: Any, rules: list[tuple[str, bool]]) -> None:
    for name, ok in rules:
        if not ok:
            raise MageError(
                f"bad config: {name}={getattr(cfg, name)!r} is not allowed for {type(cfg).__name__}"
                + (f" ({_WHY[name]})" if name in _WHY else "")
            )


_WHY = {
    "num_tokens": "a square token grid, e.g. 64 or 256",
    "num_heads": "must divide embed_dim",
    "decoder_num_heads": "must divide decoder_embed_dim",
    "norm_groups": "must divide base_channels * every channel_mult",
    "mask_ratio_min": "0 <= mask_ratio_min <= mask_ratio_max <= 1",
    "mask_ratio_max": "0 <= mask_ratio_min <= mask_ratio_max <= 1",
    "dropout": "in [0, 1)",
    "seed": "0 <= seed < 2**63",
    "drop_path": "in [0, 1)",
    "label_smoothing": "in [0, 1)",
    "layer_decay": "in (0, 1]",
}


def _recipe_checks(cfg: Any) -> list[tuple[str, bool]]:
    """The training-recipe fields MAGEConfig and FinetuneConfig share."""
    return [
        ("batch_size", cfg.batch_size >= 1),
        ("blr", cfg.blr > 0),
        ("min_lr", cfg.min_lr >= 0),
        ("weight_decay", cfg.weight_decay >= 0),
        ("epochs", cfg.epochs > 0),
        ("warmup_epochs", cfg.warmup_epochs >= 0),
        ("max_steps", cfg.max_steps >= 0),
        ("max_minutes", cfg.max_minutes >= 0),
        ("grad_clip", cfg.grad_clip >= 0),
        ("log_every", cfg.log_every >= 1),
        ("ckpt_every", cfg.ckpt_every >= 1),
        ("seed", 0 <= cfg.seed < 2**63),
    ]


def _check_augment(name: str) -> None:
    from .transforms import check_augment

    _wrap("data_augment", check_augment, name)


def _check_compile(mode: str) -> None:
    from .compiling import check_mode

    _wrap("compile", check_mode, mode)


def _wrap(field: str, check: Callable[[str], None], value: str) -> None:
    """The module that owns a field's valid values checks it; the error says which config field it was."""
    try:
        check(value)
    except MageError as e:
        raise MageError(f"bad config: {field}: {e}") from None


@dataclass(frozen=True)
class TokenizerConfig:
    """VQGAN architecture (MAGE.md 2.2): what a tokenizer checkpoint's config.json holds."""

    image_size: int = 256
    in_channels: int = 3
    base_channels: int = 128  # ch
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per level; downsample = 2**(levels-1)
    num_res_blocks: int = 2
    codebook_size: int = 1024
    code_dim: int = 256  # z_channels = embed_dim
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        groups_ok = all(self.base_channels * m % self.norm_groups == 0 for m in self.channel_mult)
        _check(
            self,
            [
                ("image_size", self.image_size >= 1),
                ("in_channels", self.in_channels >= 1),
                ("base_channels", self.base_channels >= 1),
                ("num_res_blocks", self.num_res_blocks >= 1),
                ("channel_mult", len(self.channel_mult) >= 1 and min(self.channel_mult) >= 1),
                ("codebook_size", self.codebook_size >= 2),
                ("code_dim", self.code_dim >= 1),
                ("norm_groups", self.norm_groups >= 1 and groups_ok),
                ("dropout", 0 <= self.dropout < 1),
            ],
        )
        if self.image_size % self.downsample:
            raise MageError(
                f"bad config: image_size={self.image_size} is not a multiple of the downsampling factor "
                f"{self.downsample} (2 ** (len(channel_mult) - 1))"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class TokenizerTraining:
    """The tokenizer's training recipe (losses, discriminator, optimizer, loop): a run's train.json."""

    data_augment: str = "flip"  # none | flip | crop-flip (see transforms.build_transform)
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    max_steps: int = 2000
    max_minutes: float = 0.0  # 0 = no time limit; else stop after this wall time
    warmup_steps: int = 100
    commitment_weight: float = 0.25  # beta of VectorQuantizer2
    codebook_weight: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0  # needs the offline FID Inception weights
    adversarial_weight: float = 0.1
    adversarial_start: int = 1000  # steps of warm-up before the discriminator is used
    disc_channels: int = 64
    disc_layers: int = 3
    dead_code_restart_every: int = 100  # 0 = off; restart codes unused in the last window
    grad_clip: float = 1.0  # max gradient norm of the generator and of the discriminator (0 = off)
    bf16: bool = False  # fp32 training (bf16 tokenizer quality not measured); inference follows the caller
    log_every: int = 20
    sample_every: int = 500  # reconstruction grid PNG
    ckpt_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        weights = ("weight_decay", "commitment_weight", "codebook_weight", "l1_weight", "l2_weight")
        _check(
            self,
            [
                ("batch_size", self.batch_size >= 1),
                ("lr", self.lr > 0),
                ("max_steps", self.max_steps >= 1),
                ("max_minutes", self.max_minutes >= 0),
                ("warmup_steps", self.warmup_steps >= 0),
                ("adversarial_start", self.adversarial_start >= 0),
                ("disc_channels", self.disc_channels >= 1),
                ("disc_layers", self.disc_layers >= 1),
                ("dead_code_restart_every", self.dead_code_restart_every >= 0),
                ("grad_clip", self.grad_clip >= 0),
                ("log_every", self.log_every >= 1),
                ("sample_every", self.sample_every >= 1),
                ("ckpt_every", self.ckpt_every >= 1),
                ("seed", 0 <= self.seed < 2**63),
            ]
            + [(f, getattr(self, f) >= 0) for f in (*weights, "perceptual_weight", "adversarial_weight")],
        )
        _check_augment(self.data_augment)


def _pair(arch: type, recipe: type, **fields: Any) -> tuple[Any, Any]:
    """A preset written as one list of fields -> (architecture config, training recipe)."""
    names = {f.name for f in dataclasses.fields(arch)}
    return arch(**{k: v for k, v in fields.items() if k in names}), recipe(
        **{k: v for k, v in fields.items() if k not in names}
    )


TOKENIZER_PRESETS: dict[str, tuple[TokenizerConfig, TokenizerTraining]] = {
    # seconds-long tests
    "tiny": _pair(
        TokenizerConfig,
        TokenizerTraining,
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        codebook_size=32,
        code_dim=8,
        norm_groups=4,
        batch_size=8,
        max_steps=20,
        adversarial_start=10,
        disc_channels=8,
        disc_layers=2,
        log_every=5,
        sample_every=10,
        ckpt_every=10,
        dead_code_restart_every=5,
        warmup_steps=2,
    ),  # fmt: skip
    # the demo: 32x32 Fashion-MNIST, f=4 -> 8x8 = 64 tokens
    # widths 16-32-64: 2.2x cheaper per step on 2 CPU cores than 32-64-64, so more steps in the budget;
    # no GAN: in a 20-minute run the hinge loss cost ~1.5 dB of PSNR at 32 px (24.9 -> 23.4 dB) for no
    # visible gain (``--set adversarial_weight=0.1`` turns it back on)
    "fmnist-32": _pair(
        TokenizerConfig,
        TokenizerTraining,
        image_size=32,
        base_channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        codebook_size=512,
        code_dim=32,
        norm_groups=16,
        batch_size=32,
        lr=5e-4,
        l2_weight=1.0,
        max_steps=4400,
        max_minutes=19.5,
        adversarial_weight=0.0,
        data_augment="none",
        disc_channels=32,
        disc_layers=2,
        bf16=False,
        sample_every=250,
        ckpt_every=250,
    ),  # fmt: skip
    # exactly the original MaskGIT/MAGE tokenizer (vqgan_jax_strongaug.ckpt)
    "maskgit-256": _pair(
        TokenizerConfig,
        TokenizerTraining,
        data_augment="crop-flip",
        batch_size=32,
        lr=1e-4,
        betas=(0.0, 0.99),
        max_steps=1_000_000,
        adversarial_start=20_000,
    ),  # fmt: skip
}


# --------------------------------------------------------------------------------------------------
# MAGE (encoder-decoder over tokens) and its pre-training recipe
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MAGEConfig:
    """MAGE ViT encoder-decoder (MAGE.md 3) and the masked-token objective it computes: what a MAGE
    checkpoint's config.json holds."""

    # token grid and vocabulary (see vocab.py for the layout derived from these)
    num_tokens: int = 256  # image tokens per image (16x16 for 256 px)
    codebook_size: int = 1024
    legacy_vocab: bool = False  # True: the original's 1024 + 1000 + 1 layout, fake class id 1100
    num_classes: int = 0  # >0: class-conditional (class embedding at position 0)
    # encoder / decoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # attention probs, projections, MLP, embedding
    drop_path: float = 0.0
    # masking (MAGE.md 3.5)
    mask_ratio_min: float = 0.5  # also the fixed drop ratio
    mask_ratio_max: float = 1.0
    mask_ratio_mu: float = 0.55
    mask_ratio_std: float = 0.25
    label_smoothing: float = 0.1
    class_drop_prob: float = 0.1  # label dropout for classifier-free guidance (class-conditional only)
    # contrastive (MAGE-C)
    contrastive_weight: float = 0.0  # lambda; 0 = plain MAGE
    contrastive_temperature: float = 0.2
    contrastive_dim: int = 256
    grad_checkpointing: bool = False  # recompute block activations in the backward (memory for time)

    def __post_init__(self) -> None:
        side = math.isqrt(max(self.num_tokens, 0))
        dec_heads_ok = self.decoder_num_heads >= 1 and self.decoder_embed_dim % self.decoder_num_heads == 0
        _check(
            self,
            [
                ("num_tokens", self.num_tokens >= 1 and side * side == self.num_tokens),
                ("codebook_size", self.codebook_size >= 2),
                ("num_classes", self.num_classes >= 0),
                ("depth", self.depth >= 1),
                ("decoder_depth", self.decoder_depth >= 1),
                ("num_heads", self.num_heads >= 1 and self.embed_dim % self.num_heads == 0),
                ("decoder_num_heads", dec_heads_ok),
                ("mlp_ratio", self.mlp_ratio > 0),
                ("dropout", 0 <= self.dropout < 1),
                ("drop_path", 0 <= self.drop_path < 1),
                ("mask_ratio_min", 0 <= self.mask_ratio_min <= self.mask_ratio_max),
                ("mask_ratio_max", self.mask_ratio_min <= self.mask_ratio_max <= 1),
                ("mask_ratio_std", self.mask_ratio_std > 0),
                ("label_smoothing", 0 <= self.label_smoothing < 1),
                ("class_drop_prob", 0 <= self.class_drop_prob <= 1),
                ("contrastive_weight", self.contrastive_weight >= 0),
                ("contrastive_temperature", self.contrastive_temperature > 0),
                ("contrastive_dim", self.contrastive_dim >= 1),
            ],
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class PretrainConfig:
    """MAGE's pre-training recipe (MAGE.md 6): a run's train.json."""

    batch_size: int = 4096  # global batch, split across ranks
    blr: float = 1.5e-4  # lr = blr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: float = 1600
    warmup_epochs: float = 40
    max_steps: int = 0  # >0 overrides epochs
    max_minutes: float = 0.0  # 0 = no wall-clock limit
    grad_clip: float = 3.0
    ema_decay: float = 0.0  # 0 = no EMA (the original)
    bf16: bool = True
    compile: str = ""  # torch.compile mode of the training forward+backward ("" = eager), see compiling.MODES
    data_augment: str = "crop-flip"
    log_every: int = 20
    ckpt_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self, [("ema_decay", 0 <= self.ema_decay < 1)] + _recipe_checks(self))
        _check_augment(self.data_augment)
        _check_compile(self.compile)


MAGE_PRESETS: dict[str, tuple[MAGEConfig, PretrainConfig]] = {
    "tiny": _pair(
        MAGEConfig,
        PretrainConfig,
        num_tokens=16,
        codebook_size=32,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        batch_size=8,
        blr=1e-3,
        epochs=2,
        warmup_epochs=0.5,
        max_steps=10,
        data_augment="flip",
        log_every=2,
        ckpt_every=5,
    ),  # fmt: skip
    # the demo, paired with the fmnist-32 tokenizer (8x8 tokens, 512 codes). Sized for minutes on 2 CPU cores:
    # width 128 with a 2-block decoder runs 2.2x the images/s of 192 wide x 3, and at equal time (6 min, same
    # tokens) gave loss 5.89 vs 6.14, linear probe 54.4 vs 48.8%, class agreement 12.5 vs 7.0%;
    # dropout 0 because such runs see each image only a few times and CPU dropout costs ~25% of the step.
    "fmnist-32": _pair(
        MAGEConfig,
        PretrainConfig,
        num_tokens=64,
        codebook_size=512,
        embed_dim=128,
        depth=6,
        num_heads=4,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        dropout=0.0,
        batch_size=64,
        blr=4e-3,
        epochs=40,
        warmup_epochs=0.25,
        max_minutes=30.0,
        data_augment="flip",
        ckpt_every=200,
    ),  # fmt: skip
    "vit-b": (MAGEConfig(legacy_vocab=True), PretrainConfig()),
    "vit-l": (
        MAGEConfig(
            legacy_vocab=True,
            embed_dim=1024,
            depth=24,
            num_heads=16,
            decoder_embed_dim=1024,
            decoder_depth=8,
            decoder_num_heads=16,
            grad_checkpointing=True,
        ),
        PretrainConfig(),
    ),  # fmt: skip
}
# the same model with a GPU recipe: ~100 epochs in 6.5 min on an H200 (sharing it with two other runs), with the
# original's dropout and 5 warm-up epochs; lr = 5e-4 * 1024 / 256 = 2e-3. Pair it with a --crops token cache.
MAGE_PRESETS["fmnist-32-gpu"] = (
    dataclasses.replace(MAGE_PRESETS["fmnist-32"][0], dropout=0.1),
    dataclasses.replace(MAGE_PRESETS["fmnist-32"][1], batch_size=1024, blr=5e-4, epochs=100, warmup_epochs=5,
                        max_minutes=0.0, log_every=50, ckpt_every=1000),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# fine-tuning recipe (MAGE.md 5.2); the architecture comes from the pre-trained MAGE's config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end fine-tuning of the MAGE encoder with a classification head (the original's main_finetune)."""

    batch_size: int = 1024  # global batch, split across ranks
    blr: float = 2.5e-4  # lr = blr * batch_size / 256
    min_lr: float = 1e-6
    layer_decay: float = 0.65  # lr scale decay^(depth + 1 - layer_id); token_emb = 0, blocks.i = i + 1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    epochs: float = 100
    warmup_epochs: float = 5
    max_steps: int = 0  # >0 overrides epochs
    max_minutes: float = 0.0  # 0 = no wall-clock limit (else the cosine follows wall time)
    grad_clip: float = 0.0  # the original does not clip
    data_augment: str = "crop-flip"  # used when images are tokenized on the fly (--data); a cache gives flips
    bf16: bool = True
    compile: str = ""  # torch.compile mode of the training step ("" = eager), as pretrain's
    log_every: int = 20
    ckpt_every: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            self,
            [
                ("layer_decay", 0 < self.layer_decay <= 1),
                ("drop_path", 0 <= self.drop_path < 1),
                ("label_smoothing", 0 <= self.label_smoothing < 1),
            ]
            + _recipe_checks(self),
        )
        _check_augment(self.data_augment)
        _check_compile(self.compile)


FINETUNE_PRESETS: dict[str, FinetuneConfig] = {
    "tiny": FinetuneConfig(
        batch_size=8, blr=1e-3, epochs=2, warmup_epochs=0.5, max_steps=10, log_every=2, ckpt_every=5
    ),
    # minutes, not epochs, on 2 CPU cores (~1 epoch in 10 min): a short warm-up and a bolder lr than the
    # original (blr 1e-3 with 0.5 epochs of warm-up spent 215 of the 296 steps of an 8-minute run warming up)
    # bf16 where the CPU has it (fp32 elsewhere): 400 steps from the same model in 52 vs 91 s on AMX, test top-1
    # 63.61 vs 63.67% (Intel Xeon with AMX, 2026-11-29; the preset was fp32 while bf16 only ran emulated, on the
    # first machines)
    "fmnist-32": FinetuneConfig(
        batch_size=64, blr=4e-3, layer_decay=0.75, epochs=10, warmup_epochs=0.05, max_minutes=10.0, ckpt_every=200
    ),
    "vit-b": FinetuneConfig(),
    "vit-l": FinetuneConfig(layer_decay=0.75, drop_path=0.2, epochs=50),
}
# fine-tuning a fmnist-32-gpu model on a GPU: ~35 epochs in 1.5 min on a shared H200 gave 90.5% (165 epochs: 90.7%)
FINETUNE_PRESETS["fmnist-32-gpu"] = dataclasses.replace(
    FINETUNE_PRESETS["fmnist-32"],
    batch_size=1024,
    blr=5e-4,
    epochs=40,
    warmup_epochs=3,
    max_minutes=0.0,
    bf16=True,
    log_every=50,
    ckpt_every=1000,
)


# --------------------------------------------------------------------------------------------------
# presets, overrides, JSON
# --------------------------------------------------------------------------------------------------
def _preset(table: dict[str, T], name: str, what: str) -> T:
    if name not in table:
        raise MageError(f"unknown {what} preset '{name}' (choose from: {', '.join(table)})")
    return table[name]  # frozen: a preset can be shared, changes go through dataclasses.replace


def tokenizer_preset(name: str) -> TokenizerConfig:
    """A named tokenizer architecture."""
    return _preset(TOKENIZER_PRESETS, name, "tokenizer")[0]


def tokenizer_training_preset(name: str) -> TokenizerTraining:
    """The training recipe of a named tokenizer preset."""
    return _preset(TOKENIZER_PRESETS, name, "tokenizer")[1]


def finetune_preset(name: str) -> FinetuneConfig:
    """A named fine-tuning recipe."""
    return _preset(FINETUNE_PRESETS, name, "fine-tune")


def mage_preset(name: str) -> MAGEConfig:
    """A named MAGE architecture."""
    return _preset(MAGE_PRESETS, name, "MAGE")[0]


def pretrain_preset(name: str) -> PretrainConfig:
    """The pre-training recipe of a named MAGE preset."""
    return _preset(MAGE_PRESETS, name, "MAGE")[1]


def _coerce(value: str, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if origin is tuple:
            args = typing.get_args(typ)
            elem = args[0]
            return tuple(elem(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip())
        v = typ(value)
        if typ is float and not math.isfinite(v):
            raise ValueError(value)
        return v
    except ValueError:
        raise MageError(
            f"bad value '{value}' for config field '{name}' (expected {getattr(typ, '__name__', typ)})"
        ) from None


def replace_fields(cfgs: tuple[Any, ...], **changes: Any) -> tuple[Any, ...]:
    """``dataclasses.replace`` over an (architecture, recipe) pair: each field goes to the config that has it.

    cfg, train = replace_fields((mage_preset("tiny"), pretrain_preset("tiny")), embed_dim=64, max_steps=100)"""
    parts: list[dict[str, Any]] = [{} for _ in cfgs]
    for key, value in changes.items():
        owner = next((i for i, c in enumerate(cfgs) if key in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None:
            raise MageError(f"unknown config field '{key}' for {' or '.join(type(c).__name__ for c in cfgs)}")
        parts[owner][key] = value
    return tuple(dataclasses.replace(c, **p) if p else c for c, p in zip(cfgs, parts))


def apply_overrides(cfg: T, overrides: list[str] | None) -> T:
    """A copy of ``cfg`` with ``key=value`` overrides applied (types follow the dataclass fields). ``cfg`` may be a
    tuple of configs (an architecture and its recipe): each key goes to the one that has the field."""
    cfgs = cfg if isinstance(cfg, tuple) else (cfg,)
    hints = {k: v for c in reversed(cfgs) for k, v in typing.get_type_hints(type(c)).items()}
    changes: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise MageError(f"bad override '{item}': expected key=value")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in {f.name for c in cfgs for f in dataclasses.fields(c)}:
            raise MageError(f"unknown config field '{key}' for {' or '.join(type(c).__name__ for c in cfgs)}")
        changes[key] = _coerce(value.strip(), hints[key], key)
    out = replace_fields(cfgs, **changes)
    return out if isinstance(cfg, tuple) else out[0]


def to_dict(cfg: Any) -> dict[str, Any]:
    return {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}


KINDS = {c.__name__: c for c in (TokenizerConfig, TokenizerTraining, MAGEConfig, PretrainConfig, FinetuneConfig)}
# config.json files written before the architecture and the recipe were two configs held both: their recipe
# fields are dropped when such a file is read as an architecture
_RECIPE_OF = {TokenizerConfig: TokenizerTraining, MAGEConfig: PretrainConfig}


def from_dict(d: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output (unknown keys are an error)."""
    d = dict(d)
    kind = KINDS.get(d.pop("type", ""))
    if kind is None:
        raise MageError(f"config.json has no known 'type' (expected one of {', '.join(KINDS)})")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    old = {f.name for f in dataclasses.fields(_RECIPE_OF[kind])} if kind in _RECIPE_OF else set()
    d = {k: v for k, v in d.items() if k in names or k not in old}
    unknown = set(d) - names
    if unknown:
        raise MageError(f"config.json has unknown fields for {kind.__name__}: {sorted(unknown)}")
    for k, v in d.items():
        if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            d[k] = tuple(v)
    return kind(**d)


def save_config(cfg: Any, path: str) -> None:
    from .files import atomic_write_json

    atomic_write_json(path, to_dict(cfg))


def load_config(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return from_dict(d)
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MageError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
