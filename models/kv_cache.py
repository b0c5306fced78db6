"""Preallocated key/value cache written in place at device-side positions (no torch.cat per step)."""
import torch


class KVCache:
    """Per layer, keys and values ``[B, Hkv, max_len, D]`` allocated once; positions ``[0, length)`` are filled.

    One write path, keyed by positions held in a device tensor (HF's ``cache_position``, gpt-fast's
    ``input_pos``): a forward computes ``cache_position [n]`` once, every layer calls
    ``update(layer, k_new, v_new, cache_position, kv_len)`` (or ``update_rope``, which takes the packed q/k/v
    projection and writes RoPE'd k and v in the RoPE launch itself), then the caller moves ``length`` with
    ``advance(n)``.
    Prefill and the dynamic decode loop pass ``kv_len = length + n`` and attend over that prefix; a fixed-shape
    decode step (a recorded CUDA graph) passes ``kv_len=None`` and attends over the whole buffer, its mask hiding
    what is not written yet. ``reorder(beam_idx)`` permutes the batch rows in place for beam search.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, max_len, head_dim, *, dtype=torch.float32,
                 device="cpu"):
        if max_len <= 0:
            raise ValueError(f"KVCache max_len must be positive, got {max_len}")
        # one buffer for every layer's keys and values, so that a beam reorder is one gather and one copy
        self.storage = torch.zeros((2, num_layers, batch_size, num_kv_heads, max_len, head_dim), dtype=dtype,
                                   device=device)
        self.max_len = max_len
        self.length = 0

    def layer(self, layer_idx):
        """``(k, v)`` of one layer, ``[B, Hkv, max_len, D]`` views of the storage, made at each call: a view made
        before autograd recorded a write into the storage could not be written in place afterwards."""
        return self.storage[0, layer_idx], self.storage[1, layer_idx]

    @property
    def k(self):
        """Every layer's keys ``[B, Hkv, max_len, D]`` (views)."""
        return [self.storage[0, i] for i in range(self.storage.shape[1])]

    @property
    def v(self):
        """Every layer's values ``[B, Hkv, max_len, D]`` (views)."""
        return [self.storage[1, i] for i in range(self.storage.shape[1])]

    @property
    def num_layers(self):
        return self.storage.shape[1]

    @property
    def batch_size(self):
        return self.storage.shape[2]

    def __len__(self):
        return self.length

    def next_positions(self, n):
        """``cache_position [n]``: the next ``n`` positions ``[length, length + n)``, on the cache's device."""
        return torch.arange(self.length, self.length + n, device=self.storage.device)

    def _check(self, layer_idx, num_kv_heads, head_dim, kv_len, what):
        k_cache = self.storage[0, layer_idx]
        if num_kv_heads != k_cache.shape[1] or head_dim != k_cache.shape[3]:
            raise ValueError(f"KVCache layer {layer_idx} holds [B, Hkv, *, D] = {tuple(k_cache.shape)}, got {what}")
        if kv_len is not None and kv_len > self.max_len:
            raise ValueError(f"KVCache overflow: attending over {kv_len} positions exceeds max_len {self.max_len}; "
                             f"allocate the cache for prompt + max_new_tokens")

    def _views(self, layer_idx, kv_len):
        k_cache, v_cache = self.layer(layer_idx)
        if kv_len is None:
            return k_cache, v_cache
        return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]

    def update(self, layer_idx, k_new, v_new, cache_position, kv_len=None):
        """Write ``k_new, v_new [B, Hkv, n, D]`` (any strides) of one layer at the positions ``cache_position``
        (a device tensor ``[n]``: no host value is read, so a CUDA graph can replay the write).

        Returns views ``k, v [B, Hkv, kv_len, D]`` of the cache (no copy); ``kv_len=None``: the whole buffers
        ``[B, Hkv, max_len, D]``. ``length`` moves only on advance(). k and v that are two views of one packed
        projection (BART's) are written in one launch."""
        k_cache, v_cache = self.layer(layer_idx)
        if k_new.shape[0] != k_cache.shape[0]:
            raise ValueError(f"KVCache layer {layer_idx} holds [B, Hkv, *, D] = {tuple(k_cache.shape)}, "
                             f"got k_new {tuple(k_new.shape)}")
        self._check(layer_idx, k_new.shape[1], k_new.shape[3], kv_len, f"k_new {tuple(k_new.shape)}")
        pair = _as_pair(k_new, v_new)
        if pair is not None:  # k and v are two views of one packed projection: one launch writes both
            self.storage[:, layer_idx].index_copy_(3, cache_position, pair.to(k_cache.dtype))
            return self._views(layer_idx, kv_len)
        # in the cache's dtype: under autocast the projections come out in the autocast dtype
        k_cache.index_copy_(2, cache_position, k_new.to(k_cache.dtype))
        # a view made now: one made before the write above (if it was recorded) could not be written in place
        self.storage[1, layer_idx].index_copy_(2, cache_position, v_new.to(v_cache.dtype))
        return self._views(layer_idx, kv_len)

    def update_rope(self, layer_idx, rope_qkv, qkv, cos, sin, num_heads, cache_position, kv_len=None):
        """``update`` with the RoPE fused in: ``rope_qkv`` (an op registry's, ``fusedformers.models.ops``: the
        fused kernel, or the eager reference) rotates q and k of the packed projection ``qkv [B, n, (Hq + 2 Hkv)
        * D]`` and writes k and v at the positions ``cache_position [n]`` in the same launch (no host value read).

        Returns q ``[B, n, Hq, D]`` and views ``k, v`` as ``update``'s. Not differentiable (the fused op writes
        in place): a call that autograd records goes through ``update``."""
        k_cache, v_cache = self.layer(layer_idx)
        num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
        if qkv.shape[0] != k_cache.shape[0] or qkv.shape[-1] != (num_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError(f"KVCache layer {layer_idx} holds [B, Hkv, *, D] = {tuple(k_cache.shape)}: qkv must be "
                             f"[B, n, (num_heads + 2 * Hkv) * D] with num_heads={num_heads}, got {tuple(qkv.shape)}")
        self._check(layer_idx, num_kv_heads, head_dim, kv_len, f"qkv {tuple(qkv.shape)}")
        q = rope_qkv(qkv, cos, sin, num_heads, num_kv_heads, k_cache=k_cache, v_cache=v_cache,
                     cache_position=cache_position)
        return (q, *self._views(layer_idx, kv_len))

    def reserve(self, length):
        """Make room for ``length`` positions: when the cache is shorter, its buffers are reallocated (at least
        doubled, so a cache grown step by step is copied O(log n) times) and the filled part copied over."""
        if length <= self.max_len:
            return
        new_len = max(length, 2 * self.max_len)
        old = self.storage
        self.storage = old.new_zeros(old.shape[:4] + (new_len,) + old.shape[5:])
        self.storage[:, :, :, :, :self.length] = old[:, :, :, :, :self.length]
        self.max_len = new_len

    def advance(self, n):
        """Mark ``n`` more positions as filled (after every layer wrote them)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache overflow: advancing {n} from length {self.length} exceeds max_len "
                             f"{self.max_len}")
        self.length += n

    def reorder(self, beam_idx, length=None):
        """Permute/duplicate batch rows in place: row b becomes old row ``beam_idx[b]`` (beam search), for every
        layer's keys and values at once (two launches). ``length``: the positions to move (default: the filled
        ones; a fixed-shape step, which does not know the length on the host, passes max_len)."""
        length = self.length if length is None else length
        beam_idx = beam_idx.to(device=self.storage.device, dtype=torch.long)
        rows = self.storage[:, :, :, :, :length]
        rows.copy_(rows.index_select(2, beam_idx))

    def reset(self):
        self.length = 0


def _as_pair(k, v):
    """``[2, *k.shape]`` viewing k and v at once, when they are views of one buffer with the same shape and
    strides and v lies after k (the k and v heads of a packed projection, as BART's); else None. Not for
    tensors autograd records (the cache writes of training calls take the two-launch path)."""
    if (k.requires_grad or v.requires_grad or k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype
            or k.device != v.device or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()):
        return None
    gap = v.storage_offset() - k.storage_offset()
    if gap <= 0:
        return None
    return k.as_strided((2, *k.shape), (gap, *k.stride()), k.storage_offset())
