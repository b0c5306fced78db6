"""Argument checks shared by the kernel wrappers: every error names the argument and what was expected."""
import contextlib

import torch

from fusedformers.kernels.interpreter import interpreter_on

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the fused attention kernels put the batch on a CUDA grid axis whose size is limited to 65535 (the split-KV
# decode kernel's grid is 1-D and has no such limit)
MAX_BATCH = 65535


def check_tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_float_dtype(name, t):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_head_dim(head_dim):
    if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
        raise ValueError(f"head dim D must be a multiple of 8 between 16 and 256, got {head_dim}")


def check_attention_inputs(q, k, v, key_padding_mask, kv_batch_index, past_len):
    """Validate attention arguments; returns (batch, num_heads, q_len, head_dim, num_kv_heads, k_len)."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    check_float_dtype("q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask, kv_batch_index=kv_batch_index)
    batch, num_heads, q_len, head_dim = q.shape
    kv_batch, num_kv_heads, k_len, k_head_dim = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k_head_dim != head_dim:
        raise ValueError(f"k and v head dim must equal q's head dim {head_dim}, got {k_head_dim}")
    check_head_dim(head_dim)
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count ({num_heads}) must be a multiple of k/v's head count ({num_kv_heads})")
    if q_len == 0 or k_len == 0 or batch == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kv_batch_index is None:
        if kv_batch != batch:
            raise ValueError(f"k and v batch ({kv_batch}) must equal q's batch ({batch}) without kv_batch_index")
    else:
        check_tensor("kv_batch_index", kv_batch_index, 1)
        if kv_batch_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_batch_index must be int32 or int64, got {kv_batch_index.dtype}")
        if kv_batch_index.shape[0] != batch:
            raise ValueError(f"kv_batch_index must have shape [{batch}] (q's batch), "
                             f"got {tuple(kv_batch_index.shape)}")
        # its range depends on its values: checked by the launchers (check_kv_batch_index_range), on every call
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, 2)
        if tuple(key_padding_mask.shape) != (batch, k_len):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{batch}, {k_len}], "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.is_complex():
            raise TypeError(f"key_padding_mask must be bool or integer (1 = token, 0 = padding), "
                            f"got {key_padding_mask.dtype}")
    if past_len is not None:
        if not isinstance(past_len, int) or isinstance(past_len, bool):
            raise TypeError(f"past_len must be an int, got {type(past_len).__name__}")
        if past_len < 0:
            raise ValueError(f"past_len must be >= 0, got {past_len}")
    return batch, num_heads, q_len, head_dim, num_kv_heads, k_len


def check_kv_batch_index_range(kv_batch_index, kv_batch):
    """Every entry of kv_batch_index must be in [0, Bkv): an index outside would make the kernels read outside
    K/V. Checked on every call, never from a remembered verdict (a write through ``.numpy()`` or ``.data`` does
    not move the version counter). The launchers call this for CPU tensors (the interpreter: a ValueError); on
    CUDA the kernels check each entry they read themselves (``decode_attention.kv_batch_row``: print and trap,
    no host sync, no extra launch); on CUDA this is an asynchronous device assert (one min/max reduction)."""
    with host_only_check(kv_batch_index):
        lowest, highest = torch.aminmax(kv_batch_index)
        in_range = (lowest >= 0) & (highest < kv_batch)
        if kv_batch_index.is_cuda:
            torch._assert_async(in_range, f"kv_batch_index entries must be in [0, {kv_batch}) (k's batch)")
        elif not in_range:
            raise ValueError(f"kv_batch_index entries must be in [0, {kv_batch}) (k's batch), "
                             f"got {kv_batch_index.tolist()}")


class _HostOnlyChecks:
    """Marks the checks that the launchers run for CPU tensors only (through the interpreter), which a CUDA run
    does in the kernels themselves. ``fusedformers.bench.launches`` counts their ops apart (``cpu_only``): they
    are not launches a GPU decode step makes. ``depth`` > 0 inside such a check."""
    depth = 0


def in_host_only_check():
    """True inside :func:`host_only_check` (read by ``fusedformers.bench.launches``)."""
    return _HostOnlyChecks.depth > 0


@contextlib.contextmanager
def host_only_check(t):
    """The body checks ``t`` on the host in place of the kernels (CPU tensors only; see :class:`_HostOnlyChecks`)."""
    cpu = t.device.type == "cpu"
    _HostOnlyChecks.depth += cpu
    try:
        yield
    finally:
        _HostOnlyChecks.depth -= cpu


# read once: triton reads it when it is imported (before this module), and it cannot change after that
_INTERPRETER_ON = interpreter_on()


def triton_can_run(device):
    """Triton kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
    set before triton is imported)."""
    return _INTERPRETER_ON or torch.device(device).type == "cuda"


def check_kernel_device(name, t):
    if not triton_can_run(t.device):
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before triton is imported, to run them slowly on CPU); on CPU use the eager "
                         f"references in fusedformers.kernels.reference, or attn_implementation='eager' in the models")
