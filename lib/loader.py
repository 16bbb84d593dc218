"""Batches made in DataLoader workers, in the order the main process draws them.

The training mixture draws each step's samples (dataset, row, template) in the main process, so its
sampler state stays the one a checkpoint saves. Worker processes read and preprocess the drawn
batches' images ahead of the step that needs them (a 2544x3056 MIMIC-CXR JPEG takes ~0.1 s to
decode), and on a GPU a thread pins them for an asynchronous copy. With 0 workers the same happens
in the main process: the batches, hence the run, are the same for any number of workers.
"""
import collections

import torch
from torch.utils.data import DataLoader, Dataset


class _Make(Dataset):
    """A map-style dataset whose "index" is a drawn batch: the DataLoader hands each one to `make`."""

    def __init__(self, make):
        self.make = make

    def __getitem__(self, drawn):
        return self.make(drawn)


def _as_is(batch):
    return batch


def drawn_batches(draw, make, workers: int, pin: bool):
    """(make(drawn), drawn, state) for each (drawn, state) = draw(), in order, forever.

    `draw` runs here and may run up to 2 x workers batches ahead of the consumer, so each batch comes
    with the state that `draw` returned with it: the sampler's state right after drawing it."""
    states = collections.deque()

    def drawn():
        while True:
            batch, state = draw()
            states.append((batch, state))
            yield batch
    # its own generator: the loader's worker seeds are not drawn from the global RNG the run saves
    loader = DataLoader(_Make(make), sampler=drawn(), batch_size=None, collate_fn=_as_is, num_workers=workers,
                        pin_memory=pin, prefetch_factor=2 if workers else None, generator=torch.Generator())
    for made in loader:
        yield (made, *states.popleft())
