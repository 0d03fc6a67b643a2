"""The NPU target (`--target npu`, docs/npu.md): device profiles (profile.py), static shapes with
chunked prefill (static.py), partitioning of a quantised graph into NPU and CPU parts
(partition.py), the backend that writes and checks the partitions (backend.py) and a roofline
estimate of an NPU step (estimate.py). The runtime side is optc.runtime.executors.npu."""
