"""A decode step recorded once as a CUDA graph and replayed: one launch per step instead of hundreds.

At batch 1 a decode step is bound by the host (each layer issues tens of kernel launches, each costing a few
microseconds of Python and driver time) rather than by the GPU, which only needs to read the weights once.
Replaying a CUDA graph issues the whole step at once. It needs a step whose every launch has the same
arguments each time: the same tensors (fixed input buffers that the caller refills between replays) and the
same shapes, and no host synchronisation inside.
"""
import warnings

import torch


class StepGraph:
    """Runs ``body()`` eagerly, or (``device`` a CUDA device) records it as a CUDA graph the first time and
    replays it.

    ``body`` must read its inputs only from fixed buffers, return a tensor of a fixed shape, and be idempotent
    for the same inputs, except for the tensors listed in ``state``, which it may update in place (e.g. advance
    its own positions): it runs twice to warm up — compiling the Triton kernels and settling the allocator —
    before it is recorded, and ``state`` is put back as it was after each warm-up run. The returned tensor is the
    same buffer after every replay: consume it before the next call. If recording fails, a warning is given and
    the step runs eagerly from then on.
    """

    def __init__(self, body, device=None, state=()):
        self.body = body
        self.state = tuple(state)
        self.device = torch.device(device) if device is not None else None
        self.use_graph = self.device is not None and self.device.type == "cuda"
        self.graph = None
        self.output = None

    def __call__(self):
        if not self.use_graph:
            return self.body()
        # the streams, the recording and the replay all belong to the body's device, which need not be the
        # current one (a graph recorded from another device's stream would capture nothing)
        with torch.cuda.device(self.device):
            if self.graph is None:
                self._record()
            if self.graph is None:
                return self.body()
            self.graph.replay()
        return self.output

    def _record(self):
        current = torch.cuda.current_stream(self.device)
        warm_up = torch.cuda.Stream(device=self.device)
        warm_up.wait_stream(current)
        with torch.cuda.stream(warm_up):
            saved = [t.clone() for t in self.state]
            for _ in range(2):
                self.body()
                for t, before in zip(self.state, saved):
                    t.copy_(before)
        current.wait_stream(warm_up)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device=self.device)):
                self.output = self.body()
        except Exception as error:  # keep generating, eagerly, rather than fail the whole call
            warnings.warn(f"recording the decode step as a CUDA graph failed ({type(error).__name__}: {error}); "
                          "running it eagerly", stacklevel=3)
            self.use_graph = False
            self.output = None
            return
        self.graph = graph
