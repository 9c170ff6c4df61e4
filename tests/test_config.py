"""Configs refuse values that cannot train or run; the CLI refuses bad numbers in one line, exit 2."""

from __future__ import annotations

import dataclasses

import pytest

from mage.cli import main
from mage.config import (
    FINETUNE_PRESETS,
    MAGE_PRESETS,
    TOKENIZER_PRESETS,
    PretrainConfig,
    apply_overrides,
    finetune_preset,
    from_dict,
    mage_preset,
    pretrain_preset,
    to_dict,
    tokenizer_preset,
    tokenizer_training_preset,
)
from mage.errors import MageError


def test_presets_are_valid_and_round_trip():
    for table in (TOKENIZER_PRESETS, MAGE_PRESETS, FINETUNE_PRESETS):
        for entry in table.values():
            for cfg in entry if isinstance(entry, tuple) else (entry,):
                assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "make, override, field",
    [
        (tokenizer_preset, "image_size=17", "image_size"),  # not a multiple of the downsampling (4)
        (tokenizer_preset, "norm_groups=3", "norm_groups"),  # GroupNorm needs it to divide every width
        (tokenizer_preset, "codebook_size=0", "codebook_size"),
        (tokenizer_training_preset, "batch_size=0", "batch_size"),
        (tokenizer_training_preset, "max_steps=0", "max_steps"),
        (tokenizer_training_preset, "data_augment=jitter", "data_augment"),
        (mage_preset, "num_heads=3", "num_heads"),  # 128 wide: 3 heads do not divide it
        (mage_preset, "num_tokens=60", "num_tokens"),  # not a square grid
        (mage_preset, "mask_ratio_min=1.5", "mask_ratio_min"),
        (mage_preset, "mask_ratio_max=0.4", "mask_ratio"),  # below mask_ratio_min (0.5)
        (mage_preset, "dropout=1", "dropout"),
        (mage_preset, "label_smoothing=-0.1", "label_smoothing"),
        (mage_preset, "contrastive_temperature=0", "contrastive_temperature"),
        (pretrain_preset, "batch_size=0", "batch_size"),
        (pretrain_preset, "epochs=0", "epochs"),
        (pretrain_preset, "max_steps=-1", "max_steps"),
        (pretrain_preset, "compile=fastest", "compile"),
        (finetune_preset, "layer_decay=0", "layer_decay"),
        (finetune_preset, "drop_path=1.0", "drop_path"),
        (finetune_preset, "blr=0", "blr"),
    ],
)
def test_bad_config_values_are_refused(make, override, field):
    with pytest.raises(MageError) as info:
        apply_overrides(make("fmnist-32"), [override])
    msg = str(info.value)
    assert msg.startswith("bad config:") and field in msg and "\n" not in msg
    with pytest.raises(MageError):  # the Python API too, not only --set
        key, value = override.split("=")
        dataclasses.replace(make("fmnist-32"), **{key: type(getattr(make("fmnist-32"), key))(value)})


def test_good_overrides_still_apply():
    cfg = apply_overrides(mage_preset("fmnist-32"), ["num_heads=8", "num_tokens=256", "mask_ratio_min=0.0"])
    assert (cfg.num_heads, cfg.head_dim, cfg.num_tokens, cfg.mask_ratio_min) == (8, 16, 256, 0.0)
    assert PretrainConfig(max_steps=0).max_steps == 0  # 0 = follow epochs


def test_overrides_go_to_the_architecture_or_the_recipe():
    """One --set list for an (architecture, recipe) pair; a config.json written before the split still loads."""
    cfg, train = apply_overrides((mage_preset("tiny"), pretrain_preset("tiny")), ["embed_dim=64", "blr=2e-3"])
    assert cfg.embed_dim == 64 and train.blr == 2e-3 and not hasattr(cfg, "blr")
    with pytest.raises(MageError, match="unknown config field 'nope' for MAGEConfig or PretrainConfig"):
        apply_overrides((cfg, train), ["nope=1"])
    old = {**to_dict(cfg), **dataclasses.asdict(train)}  # architecture and recipe in one file
    assert from_dict(old) == cfg
    with pytest.raises(MageError, match="unknown fields"):
        from_dict({**to_dict(cfg), "nope": 1})


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--model", "m", "--num", "0", "--out", "g.png"], "--num: must be >= 1"),
        (["generate", "--model", "m", "--batch-size", "0", "--out", "g.png"], "--batch-size: must be >= 1"),
        (["generate", "--model", "m", "--cfg", "-1", "--out", "g.png"], "--cfg: must be >= 0"),
        (
            ["probe", "few-shot", "--model", "m", "--data", "synthetic", "--shots", "a,b"],
            "--shots: expected comma-separated",
        ),
        (["probe", "few-shot", "--model", "m", "--data", "synthetic", "--shots", "1,0"], "--shots"),
        (["probe", "few-shot", "--model", "m", "--data", "synthetic", "--draws", "0"], "--draws: must be >= 1"),
        (["probe", "linear", "--model", "m", "--data", "synthetic", "--epochs", "0"], "--epochs: must be >= 1"),
        (["classify", "--classifier", "c", "--top", "0", "x.png"], "--top: must be >= 1"),
        (["train-tokenizer", "--data", "synthetic", "--max-steps", "-1", "--out", "t"], "--max-steps: must be >= 1"),
        (["pretrain", "--cache", "c", "--max-minutes", "-1", "--out", "t"], "--max-minutes: must be >= 0"),
        (["pretrain", "--cache", "c", "--limit", "x", "--out", "t"], "--limit: expected an integer"),
        (["bench", "--gen-steps", "x"], "--gen-steps: expected comma-separated"),
        (["bench", "--batch-size", "0"], "--batch-size: must be >= 1"),
        (["demo", "--budget", "0"], "--budget: must be > 0"),
        (["evaluate", "fid", "--model", "m", "--data", "synthetic", "--num", "1"], "--num/--num-samples: must be >= 2"),
    ],
)
def test_cli_refuses_bad_numbers(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_bad_config_and_embed_out_are_one_line(capsys, tmp_path):
    assert (
        main(
            [
                "train-tokenizer",
                "--data",
                "synthetic",
                "--preset",
                "tiny",
                "--set",
                "image_size=17",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert main(["embed", "--model", "m", "--data", "synthetic", "--out", str(tmp_path / "f.txt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("mage: error:") for line in lines), lines
    assert "multiple of the downsampling" in lines[0] and ".npz or .safetensors" in lines[1]


def test_config_files_and_overrides_refuse_what_cannot_run(tmp_path):
    """config.json with wrong-typed fields or bytes that are not UTF-8, --set with nan / inf or a seed past
    63 bits: one-line MageErrors, not a TypeError or a crash later in torch.manual_seed."""
    from mage.config import load_config

    bad = {"wrong type": '{"type": "MAGEConfig", "embed_dim": "wide"}', "not a dict": "[1, 2]"}
    for name, text in bad.items():
        (tmp_path / f"{name}.json").write_text(text)
        with pytest.raises(MageError, match="cannot read config"):
            load_config(str(tmp_path / f"{name}.json"))
    (tmp_path / "bytes.json").write_bytes(b'{"type": "MAGEConfig", "\xff\xfe": 1}')
    with pytest.raises(MageError, match="cannot read config"):
        load_config(str(tmp_path / "bytes.json"))
    pair = (mage_preset("tiny"), pretrain_preset("tiny"))
    for override in ("blr=nan", "max_minutes=inf", "seed=36893488147419103232", "seed=-1"):
        with pytest.raises(MageError) as info:
            apply_overrides(pair, [override])
        assert "\n" not in str(info.value) and override.split("=")[0] in str(info.value)
    assert apply_overrides(pair, ["seed=9223372036854775807"])[1].seed == 2**63 - 1


def test_a_corrupt_classes_json_is_one_line(tmp_path):
    from mage.checkpoint import save_checkpoint
    from mage.model import MAGE
    from mage.pipeline import MAGEPipeline
    from mage.vqgan import VQTokenizer

    save_checkpoint(str(tmp_path / "m"), MAGE(mage_preset("tiny")).state_dict(), mage_preset("tiny"))
    save_checkpoint(str(tmp_path / "m" / "tokenizer"), VQTokenizer(tokenizer_preset("tiny")).state_dict(),
                    tokenizer_preset("tiny"))  # fmt: skip
    for text in ("{not json", '{"a": 1}', ""):
        (tmp_path / "m" / "classes.json").write_text(text)
        with pytest.raises(MageError, match="cannot read class names"):
            MAGEPipeline.from_pretrained(str(tmp_path / "m"))
