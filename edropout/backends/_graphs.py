"""Replaying a captured scoring pass: the triton backend's ``cuda_graphs=True``.

A scoring pass launches a fixed sequence of kernels for fixed shapes, so on CUDA it can be captured once into a
``torch.cuda.CUDAGraph`` and replayed: one launch of the graph instead of every kernel and PyTorch op. Inputs
are copied into static buffers before each replay and the output is cloned out of the graph's pool. A new shape
or dtype of the inputs captures a new graph (the cache is small: shapes are static in training). The weights and
BatchNorm statistics are read at replay time, so the graph stays valid while they train in place; what must not
change between replays is anything the capture baked in: the model's structure, the scoring mode and the
backend's plan (the backend captures only after its first eager call has built and checked the plan).
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class CudaGraphFactory:
    """Captures ``fn(*static_inputs)`` into a CUDA graph; ``replay()`` reruns it (CUDA only)."""

    def capture(self, fn, inputs):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*inputs)  # warm-up outside the graph: compiles kernels and settles the allocator
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*inputs)
        return graph, out


class GraphedCall:
    """``fn`` over tensors, replayed from a capture per input signature (shape, dtype, device).

    ``factory.capture(fn, static_inputs) -> (graph, static_output)``; ``graph.replay()`` recomputes the static
    output from the static inputs. ``CudaGraphFactory`` on CUDA; tests pass a stand-in that reruns ``fn``."""

    def __init__(self, fn, factory=None, max_graphs: int = 4):
        self.fn, self.factory, self.max_graphs = fn, factory or CudaGraphFactory(), max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.captures = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            static = [t.clone() for t in inputs]
            graph, out = self.factory.capture(self.fn, static)
            entry = self.graphs[key] = (graph, static, out)
            self.captures += 1
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            graph, static, out = entry
            for buffer, t in zip(static, inputs):
                buffer.copy_(t)
            graph.replay()
        return entry[2].clone()
