"""``python -m deft_tvm.cli``: the ``deft-tvm`` command."""

import sys

from deft_tvm.cli import main

sys.exit(main())
