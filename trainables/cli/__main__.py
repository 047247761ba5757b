"""``python -m trainables.cli``: the ``ancra-tune`` program."""

from .app import entry

entry()
