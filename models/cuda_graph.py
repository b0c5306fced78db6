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
    """Runs ``body()`` once per call: eagerly, or (``device`` a CUDA device) as a CUDA graph recorded on the
    third call and replayed from then on.

    ``body`` must read its inputs only from fixed buffers (which it may update itself: a beam-search step moves
    its own state), return a tensor of a fixed shape, and read no host value. The first ``WARM_UP_CALLS`` calls
    run it eagerly on a side stream (compiling the Triton kernels and settling the allocator, as recording
    requires); they are real steps, so nothing runs twice. The returned tensor is the same buffer after every
    replay: consume it before the next call. If recording fails, a warning is given and the step runs eagerly
    from then on.
    """
    WARM_UP_CALLS = 2

    def __init__(self, body, device=None):
        self.body = body
        self.device = torch.device(device) if device is not None else None
        self.use_graph = self.device is not None and self.device.type == "cuda"
        self.graph = None
        self.output = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if not self.use_graph:
            return self.body()
        # the streams, the recording and the replay all belong to the body's device, which need not be the
        # current one (a graph recorded from another device's stream would capture nothing)
        with torch.cuda.device(self.device):
            if self.graph is None and self.calls <= self.WARM_UP_CALLS:
                return self._warm_up()
            if self.graph is None:
                self._record()
            if self.graph is None:
                return self.body()
            self.graph.replay()
        return self.output

    def _warm_up(self):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            output = self.body()
        current.wait_stream(side)
        return output

    def _record(self):
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
