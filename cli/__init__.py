"""The ``iris`` command line: chat, ask, info, history, and the entry points of other front ends."""
