"""Committed tuning databases and offset-statistics profiles (data only), installed as
``deft_tvm.tuning_logs`` so that the package compiles tuned workloads from them on first use."""
