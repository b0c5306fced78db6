"""Preallocated key/value cache written in place (no torch.cat per step)."""
import torch


class KVCache:
    """Per layer, keys and values ``[B, Hkv, max_len, D]`` allocated once; positions ``[0, length)`` are filled.

    A forward step calls ``update(layer, k_new, v_new)`` for every layer (each writes at ``length`` and gets the
    views ``[:, :, :length + n]`` back), then ``advance(n)`` once. ``reorder(beam_idx)`` permutes the batch rows in
    place for beam search.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, max_len, head_dim, *, dtype=torch.float32,
                 device="cpu"):
        if max_len <= 0:
            raise ValueError(f"KVCache max_len must be positive, got {max_len}")
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def num_layers(self):
        return len(self.k)

    @property
    def batch_size(self):
        return self.k[0].shape[0] if self.k else 0

    def __len__(self):
        return self.length

    def update(self, layer_idx, k_new, v_new):
        """Write ``k_new, v_new [B, Hkv, n, D]`` (any strides) at positions ``[length, length + n)`` of one layer.

        Returns views ``k, v [B, Hkv, length + n, D]`` of the cache (no copy). ``length`` moves only on advance().
        """
        n = k_new.shape[2]
        end = self.length + n
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: writing {n} positions at length {self.length} exceeds "
                             f"max_len {self.max_len}; allocate the cache for prompt + max_new_tokens")
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        if k_new.shape[:2] != k_cache.shape[:2] or k_new.shape[3] != k_cache.shape[3]:
            raise ValueError(f"KVCache layer {layer_idx} holds [B, Hkv, *, D] = {tuple(k_cache.shape)}, "
                             f"got k_new {tuple(k_new.shape)}")
        k_cache[:, :, self.length:end].copy_(k_new)
        v_cache[:, :, self.length:end].copy_(v_new)
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def write_slot(self, layer_idx, slot, k_new, v_new):
        """Write one position ``k_new, v_new [B, Hkv, 1, D]`` at the position held in the device tensor
        ``slot`` ``[1]`` (no host value: a CUDA graph can replay it); returns the whole buffers
        ``[B, Hkv, max_len, D]``. ``length`` is not moved."""
        k_cache, v_cache = self.k[layer_idx], self.v[layer_idx]
        k_cache.index_copy_(2, slot, k_new)
        v_cache.index_copy_(2, slot, v_new)
        return k_cache, v_cache

    def reserve(self, length):
        """Make room for ``length`` positions: when the cache is shorter, its buffers are reallocated (at least
        doubled, so a cache grown step by step is copied O(log n) times) and the filled part copied over."""
        if length <= self.max_len:
            return
        new_len = max(length, 2 * self.max_len)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[:2] + (new_len,) + old.shape[3:])
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new
        self.max_len = new_len

    def advance(self, n):
        """Mark ``n`` more positions as filled (after every layer wrote them)."""
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache overflow: advancing {n} from length {self.length} exceeds max_len "
                             f"{self.max_len}")
        self.length += n

    def reorder(self, beam_idx):
        """Permute/duplicate batch rows in place: row b becomes old row ``beam_idx[b]`` (beam search)."""
        beam_idx = beam_idx.to(device=self.k[0].device, dtype=torch.long) if self.k else beam_idx
        for cache in self.k + self.v:
            cache[:, :, :self.length].copy_(cache[:, :, :self.length].index_select(0, beam_idx))

    def reset(self):
        self.length = 0
