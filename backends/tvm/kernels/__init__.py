"""optc's hand-written TIR kernels: attention.py (the fuser and the fused decode attention),
prefill_attention.py (flash-style prefill attention)."""
