"""mage: MAGE (MAsked Generative Encoder, Li et al., CVPR 2023) in PyTorch.

One model, trained once by masked token modeling, both generates and recognizes images.

    import mage
    tok = mage.VQTokenizer.from_pretrained("runs/tok")       # images <-> token ids
    model = mage.MAGE.from_pretrained("runs/mage")           # masked token modeling encoder-decoder
    pipe = mage.MAGEPipeline.from_pretrained("runs/mage")    # model + its tokenizer ("fashion-mnist": the release)
    images = pipe.generate(16, class_label="Bag")            # [16, 3, H, W] in [0, 1]
    filled = mage.inpaint(pipe, image, box_mask)             # / mage.outpaint(pipe, image, left=8, right=8)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VQTokenizer": "vqgan",
    "MAGE": "model",
    "MageError": "errors",
    "TokenizerConfig": "config",
    "MAGEConfig": "config",
    "load_dataset": "data",
    "MAGEPipeline": "pipeline",
    "inpaint": "pipeline",
    "outpaint": "pipeline",
    "Classifier": "recognition",
}


def __getattr__(name: str) -> Any:  # lazy, so `import mage` stays fast
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mage' has no attribute {name!r}")


__all__ = list(_LAZY)
