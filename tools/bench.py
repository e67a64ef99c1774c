"""Forward-time benchmark: ``deft-tvm bench`` as a file to run from a checkout (see ``deft_tvm.bench``).

    python tools/bench.py [--workloads NAME ...] [--dtypes float32 float16 ...] [--tf32 off on] [--iters 20]
                          [--generic-trials N [--generic-dir DIR]] [--commit SHA]
                          [--csv PATH.csv] [--markdown PATH.md] [--plot PATH.png]
    python tools/bench.py --from-csv PATH.csv [--markdown PATH.md] [--plot PATH.png]
"""

import sys

from deft_tvm.bench import gpu_ms, main

__all__ = ["gpu_ms", "main"]  # tools/sweep_cuda_tiling.py imports gpu_ms from here

if __name__ == "__main__":
    sys.exit(main())
