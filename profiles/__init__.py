"""NPU device profiles (YAML, one per device), read by `optc.backends.npu.profile`.

This folder holds data only; it is a package so that the YAML files install with optc."""
