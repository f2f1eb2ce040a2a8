"""RNG files load with torch.load(weights_only=True): the plain-type format written now, and the numpy-array format of
older checkpoints; a file holding any other object is refused instead of run."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from llmforge.train.checkpoint_files import load_rng, rng_state, set_rng_state


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.parametrize("old_format", [False, True])
def test_rng_state_round_trips_through_a_weights_only_load(tmp_path, old_format):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    if old_format:  # checkpoints written before: numpy's state as its ndarray tuple
        state["numpy"] = np.random.get_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(load_rng(str(tmp_path / "rng.pt")))
    assert _draws() == expected


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_an_rng_file_holding_an_object_is_refused(tmp_path):
    torch.save({"python": _Payload()}, tmp_path / "rng.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_rng(str(tmp_path / "rng.pt"))
