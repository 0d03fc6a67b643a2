"""The NPU target (`--target npu`): device profiles (profile.py), partitioning of a quantised
graph into NPU and CPU parts (partition.py), static shapes with chunked prefill (static.py)."""
