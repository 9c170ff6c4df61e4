"""The ``mage`` subcommands, one module per group; each command is a :class:`~mage.commands.common.Command`
(name, help, ``add_arguments(parser)``, ``run(args)``). ``COMMANDS`` is their order in ``mage --help``.

    tokenizer.py    train-tokenizer, reconstruct
    pretrain.py     cache-tokens, pretrain
    official.py     import-official
    generate.py     generate, inpaint, outpaint
    recognition.py  embed, probe, finetune, classify
    bench.py        bench
    evaluate.py     evaluate
    demo.py         demo
    studio.py       studio (the web page)
    common.py       what several share: number types, --data / --preset / sampler flags
"""

from __future__ import annotations

from . import bench, demo, evaluate, generate, official, pretrain, recognition, studio, tokenizer
from .common import Command

COMMANDS: tuple[Command, ...] = (
    *tokenizer.COMMANDS,
    *pretrain.COMMANDS,
    *official.COMMANDS,
    *generate.COMMANDS,
    *recognition.COMMANDS,
    *bench.COMMANDS,
    *evaluate.COMMANDS,
    *demo.COMMANDS,
    *studio.COMMANDS,
)
