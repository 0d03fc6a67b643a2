"""Lossless graph clean-up passes (wrapping onnx-ir's common passes with optc's contract)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from optc.passes.base import OptcPass


class _Wrapped(OptcPass):
    inner: type

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner()(model)
        return ir.passes.PassResult(model, result.modified)


class EliminateCommonSubexpressions(_Wrapped):
    """Merge nodes that compute the same value from the same inputs."""

    name = "eliminate_common_subexpressions"
    inner = common.CommonSubexpressionEliminationPass


class EliminateIdentity(_Wrapped):
    """Remove Identity nodes, wiring their consumers to the input."""

    name = "eliminate_identity"
    inner = common.IdentityEliminationPass


class RemoveUnused(OptcPass):
    """Drop nodes, functions and opset imports that nothing uses."""

    name = "remove_unused"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (common.RemoveUnusedNodesPass, common.RemoveUnusedFunctionsPass, common.RemoveUnusedOpsetsPass):
            modified |= p()(model).modified
        return ir.passes.PassResult(model, modified)

