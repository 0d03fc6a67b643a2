"""Weight quantisation passes: `weight_quant` (weight-only int8/int4 MatMuls as ONNX Runtime's
MatMulNBits; `blockwise.py` holds the quantiser and the packed layout) and `outlier_split` (W8A8
QDQ MatMuls with calibrated activation-outlier channels computed in float)."""

from optc.passes.quant.outlier_split import OutlierSplit, OutlierSplitOptions
from optc.passes.quant.weight_quant import WeightQuant, WeightQuantOptions

__all__ = ["OutlierSplit", "OutlierSplitOptions", "WeightQuant", "WeightQuantOptions"]
