"""Work-arounds for Triton's CPU interpreter, installed by the test harness only (never on the GPU path).

triton 3.6-3.9's interpreter stores bfloat16 as raw uint16 and its ``tl.dot`` multiplies those bits as integers,
so a bf16 ``tl.dot`` returns garbage on CPU. We widen bf16 operands to float32 exactly (bf16 is the top half of
a float32) before the interpreter's matmul; fp32 accumulation of exact bf16 products is what the GPU does too.
"""
import numpy as np


def _bf16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def install():
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_fusedformers_bf16_dot", False):
        return
    original_create_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = _bf16_bits_to_float32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_bits_to_float32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
            product = np.matmul(a_data, b_data, dtype=np.float32)
            return interpreter.TensorHandle(product.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._fusedformers_bf16_dot = True
