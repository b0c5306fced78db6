"""fusedformers benchmark: ``python -m fusedformers.bench --help``.

One module per part (attention, decode, rmsnorm, models), the shared machinery in
``fusedformers.bench.common``, the CPU smoke check in ``fusedformers.bench.smoke``, the offline compile
report (no GPU needed) in ``fusedformers.bench.static``. Nothing here imports triton
at import time of this package, so ``__main__`` can set TRITON_INTERPRET first when there is no GPU.
"""
