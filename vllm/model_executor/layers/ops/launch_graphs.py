"""CUDA graphs of a few kernel launches, replayed when they come again.

A sampling step with every feature is two Triton launches of some 30 and 55
arguments: on the host that costs more than the kernels take on the GPU.
Replaying a CUDA graph of them costs one launch. ``LaunchGraphs`` keeps such
graphs keyed by everything the launches take: tensors by address, every
other argument by value. A replay reads the tensors at those addresses as
they are then, so it computes exactly what the launches would; a steady
batch (the same sequences step after step, whose parameter tensors stay
where they are) replays, a batch that just changed launches as usual.

Random numbers drawn in the graph by torch's CUDA generator differ at each
replay (torch moves the generator's offset at every replay), as they would
in the launches.
"""
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from vllm.logger import init_logger

logger = init_logger(__name__)


class LaunchGraphs:
    """The graphs of one device's launch sequences, by key.

    ``run(key, launch, keep)`` replays the graph of ``key`` if there is
    one; else it calls ``launch()``, and once the same key has come
    ``capture_at`` times, it captures ``launch`` instead and replays it (a
    key that comes once, as with a batch changing at every step, never pays
    for a capture). The ``capacity`` graphs used last are kept, each with
    its ``keep``: what it reads or writes beyond the caller's inputs (a
    workspace), alive as long as the graph.

    The caller guarantees that the key determines the launches: the same
    kernels, grids and arguments. In a graph, ``launch`` may neither
    allocate device memory nor wait for the device. A capture that fails
    (a driver or device that cannot) is logged, and every call launches
    from then on.
    """

    def __init__(self, capacity: int = 8, capture_at: int = 2) -> None:
        self.capacity = capacity
        self.capture_at = capture_at
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph,
                                                  object]] = OrderedDict()
        self._sightings: dict[Hashable, int] = {}
        self._stream: torch.cuda.Stream | None = None
        self.captures = 0  # graphs captured so far (tests, benchmarks)
        self.disabled = False  # a capture failed

    def run(self,
            key: Hashable,
            launch: Callable[[], None],
            keep: object = None) -> None:
        entry = self._graphs.get(key)
        if entry is None:
            sightings = self._sightings.get(key, 0) + 1
            if sightings < self.capture_at or self.disabled:
                if len(self._sightings) >= 16 * self.capacity:
                    self._sightings.clear()  # keys that did not come back
                self._sightings[key] = sightings
                launch()
                return
            self._sightings.pop(key, None)
            try:
                graph = self._capture(launch)
            except RuntimeError as error:
                logger.warning(
                    "Capturing launches as a CUDA graph failed (%s); "
                    "launching them at every step from now on.", error)
                self.disabled = True
                launch()
                return
            entry = self._graphs[key] = (graph, keep)
            if len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        entry[0].replay()

    def _capture(self, launch: Callable[[], None]) -> torch.cuda.CUDAGraph:
        # Capture records the launches without running them.
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            # thread_local: other threads may use CUDA meanwhile.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch()
            finally:
                graph.capture_end()
        self.captures += 1
        return graph
