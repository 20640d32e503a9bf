"""The `profile` command: the profiler, its options, the prompts and workloads it runs, the
baselines it compares against and the report it writes."""
