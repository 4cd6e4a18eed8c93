"""The ``hubquant`` commands, one module per stage (see :mod:`hubquant.cli`)."""
