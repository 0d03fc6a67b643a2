"""Weight quantisation passes: `weight_quant` (weight-only int8/int4 MatMuls as ONNX Runtime's
MatMulNBits). `blockwise.py` holds the quantiser and the packed layout."""

from optc.passes.quant.weight_quant import WeightQuant, WeightQuantOptions

__all__ = ["WeightQuant", "WeightQuantOptions"]
