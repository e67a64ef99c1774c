"""Compile-and-tune script: ``deft-tvm tune`` as a file to run from a checkout.

    python tools/tune.py [--workloads NAME ...] [--dtypes float32 float16 ...] [--trials N]
                         [--device cpu|cuda] [--logs tuning_logs] [--out deft_kernels]

Tunes each registry workload on the DefT design space (MetaSchedule, XGBoost cost model,
measurements on offsets drawn from the workload's profile), writes the JSON databases under
``tuning_logs/<target-tag>/<workload-key>/`` (resumable: rerunning tops them up to ``--trials``
records), the best schedules in readable form under ``schedules/tuned/``, exports every tuned
kernel as one library with a manifest, loads it and checks it against the float64 reference.
"""

import sys

from deft_tvm.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
