"""The converter's hyperparameters, read in a child: ``python -m hubquant.exporters.gguf_hparams MODEL OUT``.

llama.cpp's converter reads a model's configuration with ``AutoConfig.from_pretrained(…).to_dict()``
(``ModelBase.load_hparams``). For a Phi model that import chain — the config class pulls in
transformers' docstring helpers, the auto model mapping, generation utilities and through them
torch's compiler stack, and whatever those find installed (sympy, pandas, scikit-learn, accelerate…)
— adds ~0.22 GiB to the converting process, which then stays while the tensors are converted (the
conversion's peak) and while llama.cpp quantizes in the same process. This child runs the
converter's own ``load_hparams`` and hands the dict back (pickled, so tuples and keys stay what they
were); the converter is then given ``hparams=`` and never imports any of it. OUT holds ``None`` when
the child could not read them; the converter then reads them itself, as before.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import hubquant  # noqa: F401 - its import work-arounds first (hubquant._compat)


def main(argv: list[str]) -> int:
    model, out = Path(argv[0]), Path(argv[1])
    try:
        from conversion.base import ModelBase

        hparams = ModelBase.load_hparams(model, False)
    except Exception:  # noqa: BLE001 - the converter will read (or fail to read) them itself
        hparams = None
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(hparams))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
