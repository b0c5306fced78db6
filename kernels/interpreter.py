"""Work-arounds for Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied by ``fusedformers.kernels`` itself
when the interpreter is on: importing the package is all it takes to run the kernels on CPU. Never on the GPU path
(nothing here runs unless the interpreter is on).

triton 3.6-3.9's interpreter stores bfloat16 as raw uint16 and its ``tl.dot`` multiplies those bits as integers,
so a bf16 ``tl.dot`` returns garbage on CPU. We widen bf16 operands to float32 exactly (bf16 is the top half of
a float32) before the interpreter's matmul; fp32 accumulation of exact bf16 products is what the GPU does too.

The interpreter also holds a scalar (a loaded value, a min/max of scalars) as a 1-element array and turns it
into a Python int with ``int(array)``, which NumPy >= 2.3 refuses for arrays of one dimension; a loop bound read
from memory (``range(lo, hi)``) then fails. We make ``__index__`` take the single element instead.

Its float32 -> bfloat16 cast truncates (rounds toward zero) where the GPU rounds to nearest even; the bias
adds up in long sums (e.g. P^T dO over many rows), so we round to nearest even as the hardware does.
"""
import os

# the triton releases whose interpreter these fixes were written and tested against (major, minor); the defects
# are also in 3.7-3.9's source, but the fixes have not been run there
KNOWN_TRITON_VERSIONS = ((3, 6),)
# FUSEDFORMERS_INTERPRETER_FIXES=0 runs the interpreter unpatched (bf16 results are then wrong, see above)
_DISABLE = os.environ.get("FUSEDFORMERS_INTERPRETER_FIXES") == "0"


def _bf16_bits_to_float32(bits):
    import numpy as np  # here, not at import: numpy is needed only by the interpreter (triton's own extra)

    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16_bits_rne(values):
    import numpy as np

    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)   # ties go to the even bf16 neighbour
    rounded = ((bits + rounding_bias) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def interpreter_on():
    """Triton's interpreter is on: TRITON_INTERPRET=1 (triton reads it when it is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_version(version):
    """RuntimeError unless ``version`` (a triton version string) is one the fixes were written for: patching an
    interpreter whose internals changed could be silently wrong."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor not in KNOWN_TRITON_VERSIONS:
        known = ", ".join(f"{major}.{minor}" for major, minor in KNOWN_TRITON_VERSIONS)
        raise RuntimeError(f"TRITON_INTERPRET=1 with triton {version}: fusedformers' interpreter fixes "
                           f"(fusedformers/kernels/interpreter.py) were written for triton {known}; install one of "
                           f"those, or set FUSEDFORMERS_INTERPRETER_FIXES=0 to run the interpreter unpatched "
                           f"(bfloat16 results are then wrong)")


def install():
    """Patch Triton's interpreter (idempotent). Called by ``fusedformers.kernels`` on import when
    TRITON_INTERPRET=1; RuntimeError on a triton version the fixes were not written for."""
    if _DISABLE:
        return
    import numpy as np
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_fusedformers_bf16_dot", False):
        return
    check_triton_version(triton.__version__)
    missing = [name for name in ("create_dot", "cast_impl") if not hasattr(builder_cls, name)]
    if missing or not hasattr(interpreter, "_patch_lang_tensor"):
        raise RuntimeError(f"triton {triton.__version__}'s interpreter lacks {missing or ['_patch_lang_tensor']}, "
                           f"which fusedformers' interpreter fixes patch")
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

    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_float32_to_bf16_bits_rne(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl
    for name in ("create_fp_trunc", "create_fp_ext", "create_si_to_fp", "create_ui_to_fp", "create_fp_to_si",
                 "create_fp_to_ui"):
        setattr(builder_cls, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))

    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
