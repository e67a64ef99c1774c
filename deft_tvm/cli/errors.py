"""The command line's user errors: one line naming the bad value and what to do, exit status 2."""

import argparse


class UsageError(Exception):
    """A mistake in the command line or its files; its message names the bad value and what to do.

    ``main`` prints it as ``deft-tvm COMMAND: error: MESSAGE`` and returns 2 (re-raises under ``--debug``).
    """


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr (exit status 2): the message
    and a pointer to ``--help``, without the usage text. Its subparsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
