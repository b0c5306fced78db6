"""fusedformers benchmark: ``python -m bench --help``.

One module per part (attention, decode, rmsnorm, models), the shared machinery in ``bench.common``, the CPU
smoke check in ``bench.smoke``. Nothing here imports triton at import time of this package, so ``__main__`` can
set TRITON_INTERPRET first when there is no GPU.
"""
