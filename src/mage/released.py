"""Released weights by name: ``fashion-mnist`` -> ``weights/fashion-mnist/`` (or ``$MAGE_WEIGHTS/fashion-mnist``).

One folder per release, laid out as a MAGE run so every loader takes it as it is::

    weights/fashion-mnist/
      config.json model.safetensors classes.json   the class-conditional MAGE
      tokenizer/                                   its VQGAN
      classifier/                                  the fine-tuned encoder + head (`mage classify`)
      judge/                                       a pixel CNN for class agreement
      reference/                                   Inception features of 500 test / 500 train images (demo FID)
      sampler.json                                 the sampler the card recommends (the default of sampler flags)
      README.md                                    the model card: commands, metrics, sha256 of every file

``resolve(name, part)`` turns a release name into the folder of that part; any other string is returned as it is.
A file or folder of that name in the working directory is taken as a path, not as the release.
"""

from __future__ import annotations

import os

from .errors import MageError

RELEASES = ("fashion-mnist",)
PARTS = ("mage", "tokenizer", "classifier", "judge", "reference")


def weights_root() -> str:
    """``$MAGE_WEIGHTS``, else the ``weights/`` folder of the source checkout this package runs from."""
    env = os.environ.get("MAGE_WEIGHTS")
    if env:
        return env
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "weights"))


def is_release(name: str | None) -> bool:
    return isinstance(name, str) and name in RELEASES and not os.path.exists(name)


def resolve(name: str, part: str = "mage") -> str:
    """The folder of ``part`` of the release ``name``; ``name`` unchanged when it is not a release name."""
    if not is_release(name):
        return name
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r} (one of {', '.join(PARTS)})")
    root = os.path.join(weights_root(), name)
    path = root if part == "mage" else os.path.join(root, part)
    if not os.path.exists(os.path.join(root, "model.safetensors")):
        raise MageError(
            f"the released '{name}' weights are not at {root} (a source checkout has them in weights/; "
            "elsewhere set MAGE_WEIGHTS to the folder that holds them)"
        )
    return path
