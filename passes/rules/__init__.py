"""Shared graph-building helpers of the passes (and, as families grow, onnxscript rewrite rules)."""
