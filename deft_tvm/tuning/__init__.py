"""Beside the op, never on its hot path: the workload registry, MetaSchedule search on
profile-distributed offsets, the fused backward's tiling search, and offset statistics of real
models. Used by the CLI, the benchmarks and the tests."""
