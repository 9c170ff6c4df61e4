"""The released Fashion-MNIST weights: intact (sha256), found by name from the CLI and the Python API, and as
good as their model card says on real test images (small samples, loose bounds: a broken release fails)."""

import hashlib
import os

import pytest
import torch

from mage.cli import main
from mage.released import resolve, weights_root

ROOT = os.path.join(weights_root(), "fashion-mnist")
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ROOT, "model.safetensors")), reason=f"no released weights at {ROOT}"
)


def test_every_file_matches_its_sha256():
    with open(os.path.join(ROOT, "SHA256SUMS")) as f:
        listed = dict(reversed(line.split("  ", 1)) for line in f.read().splitlines())
    on_disk = {
        os.path.relpath(os.path.join(d, n), ROOT)
        for d, _, names in os.walk(ROOT)
        for n in names
        if n not in ("SHA256SUMS", "README.md")
    }
    assert set(listed) == on_disk
    for name, digest in listed.items():
        with open(os.path.join(ROOT, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    total = sum(os.path.getsize(os.path.join(ROOT, n)) for n in on_disk)
    assert total < 26 * 2**20, f"the release is {total / 2**20:.1f} MiB"


def test_names_resolve_and_paths_win(tmp_path, monkeypatch):
    assert resolve("fashion-mnist") == ROOT
    assert resolve("fashion-mnist", "classifier") == os.path.join(ROOT, "classifier")
    assert resolve("runs/x", "tokenizer") == "runs/x"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-mnist").mkdir()  # a folder of that name in the working directory is taken as a path
    assert resolve("fashion-mnist") == "fashion-mnist"


def test_missing_release_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAGE_WEIGHTS", str(tmp_path))
    assert main(["generate", "--model", "fashion-mnist", "--num", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mage: error: the released 'fashion-mnist' weights are not at") and err.count("\n") == 1


def test_generate_by_name_and_the_judge_agrees():
    import mage
    from mage.evaluate import _resize, load_judge, to_uint8_levels
    from mage.sampler import SamplerConfig

    pipe = mage.MAGEPipeline.from_pretrained("fashion-mnist", device="cpu")
    assert pipe.classes[9] == "Ankle boot" and pipe.model.config.num_classes == 10
    sampler = SamplerConfig(steps=8, choice_temperature=3.0, cfg=4.0, temperature=0.7)
    images = pipe.generate_per_class(5, sampler=sampler, seed=0)  # [50, 3, 32, 32], class-major
    assert images.shape == (50, 3, 32, 32)
    judge, meta = load_judge("fashion-mnist")
    with torch.no_grad():
        pred = judge(to_uint8_levels(_resize(images, meta["image_size"])) / 255).argmax(1)
    agreement = (pred == torch.arange(10).repeat_interleave(5)).float().mean().item()
    assert agreement >= 0.8, agreement  # the card: ~98% on 1,000 samples


@pytest.mark.skipif(
    not os.path.isfile(FMNIST), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_classifier_by_name_on_real_test_images(tmp_path, capsys):
    import mage
    from mage.data import load_dataset
    from mage.transforms import save_image

    test = load_dataset("fashion-mnist", "test", 32, "none", limit=500)
    x = torch.stack([test[i][0] for i in range(len(test))])
    clf = mage.Classifier("fashion-mnist")
    acc = (clf.predict(x).argmax(1) == test.labels()).float().mean().item()
    assert acc >= 0.85, acc  # the card: ~90% on the whole test split
    save_image(x[:1], str(tmp_path / "one.png"))
    assert main(["classify", "--classifier", "fashion-mnist", str(tmp_path / "one.png"), "--top", "2"]) == 0
    assert test.classes[int(test.labels()[0])] in capsys.readouterr().out


def test_probe_features_of_a_release_are_cached_outside_it(tmp_path, monkeypatch):
    from mage.recognition import _features_folder

    monkeypatch.setenv("MAGE_CACHE_DIR", str(tmp_path))
    assert _features_folder(ROOT).startswith(str(tmp_path))  # the release stays as shipped (its sha256 hold)
    assert _features_folder("runs/mage") == os.path.join("runs/mage", "features")
