"""The GEMM probes the runtime times for the compute roofline (edgevlm/probes/*.onnx): one MatMul per compute
precision, shapes given at run time. Built here with onnx, shipped as files so the runtime needs no onnx.

    python -m edgevlm.export.probes   # rewrites edgevlm/probes/
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

import edgevlm

PROBES = Path(edgevlm.__file__).parent / "probes"


GEMM_K, GEMM_N = 1024, 4096  # the weight's shape: wide enough that the GEMM runs at a large layer's rate


def graphs() -> dict[str, onnx.ModelProto]:
    """precision -> a model computing Y = A @ B: fp32 (MLAS SGEMM), int8 (uint8 x int8 -> int32, the kernel
    int8 activations against int8/int4 weights run on). B [GEMM_K, GEMM_N] is a constant (ConstantOfShape, which
    ONNX Runtime folds into an initializer and then prepacks, as it does a model's weights: a GEMM on a fed B runs
    10-25% slower here), so the file stays a few bytes; A [M, GEMM_K] is fed."""
    out = {}
    for precision, a, b, y, op in (("fp32", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"),
                                   ("int8", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger")):
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [GEMM_K, GEMM_N])
        graph = helper.make_graph(
            [helper.make_node("Constant", [], ["shape"], value=shape),
             helper.make_node("ConstantOfShape", ["shape"], ["B"], value=helper.make_tensor("one", b, [1], [1])),
             helper.make_node(op, ["A", "B"], ["Y"])], f"gemm_{precision}",
            [helper.make_tensor_value_info("A", a, ["M", GEMM_K])],
            [helper.make_tensor_value_info("Y", y, ["M", GEMM_N])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgevlm")
        model.ir_version = helper.find_min_ir_version_for(model.opset_import)  # readable by older ONNX Runtimes
        onnx.checker.check_model(model)
        out[precision] = model
    return out


def main() -> None:
    for precision, model in graphs().items():
        path = PROBES / f"gemm_{precision}.onnx"
        path.write_bytes(model.SerializeToString())
        print(path)


if __name__ == "__main__":
    main()
