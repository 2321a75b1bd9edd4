"""Device-resident meters: averages without host syncs, reset at each collect."""

import pytest
import torch

from fastclip.meters import Meters


def test_meters_average_on_device_and_reset():
    meters = Meters(["loss", "scale"], device=torch.device("cpu"))
    for v in (1.0, 2.0, 6.0):
        meters["loss"].update(torch.tensor(v), n=2)
    meters["scale"].update(3.0)
    assert meters.collect() == {"loss": pytest.approx(3.0), "scale": pytest.approx(3.0)}
    out = meters.collect()
    assert out["loss"] != out["loss"]  # nothing since the reset: nan, not a stale number
