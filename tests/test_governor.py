"""The serving-first governor: yields the GPU's time to serving while requests are in flight, never when idle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.governor import Governor, decoder_layers


class Clock:
    """A fake clock: work advances it by hand, sleeping advances it by the time slept."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def governor(load: list[int], share: float) -> tuple[Governor, Clock]:
    clock = Clock()
    return Governor(lambda: load[0], share, "cpu", clock=clock, sleep=clock.sleep), clock


def work(g: Governor, clock: Clock, units: int, seconds: float = 0.02) -> None:
    """`units` units of training work of `seconds` each, a yield point after each."""
    for _ in range(units):
        clock.now += seconds
        g.yield_point()


def test_training_takes_its_share_of_the_time_while_requests_are_in_flight():
    load = [3]
    g, clock = governor(load, share=0.25)
    g.yield_point()  # serving began: measuring starts here
    work(g, clock, 10)
    assert clock.now == pytest.approx(10 * 0.02 / 0.25)  # work was a quarter of the time
    assert g.yielded_s == pytest.approx(10 * 0.02 * 3)
    assert max(clock.slept) <= 0.005  # in slices, so that the end of serving is seen soon


def test_an_idle_server_trains_at_full_speed_and_the_end_of_serving_ends_a_pause():
    load = [0]
    g, clock = governor(load, share=0.1)
    work(g, clock, 5)
    assert not clock.slept and g.yielded_s == 0

    load[0] = 1
    g.yield_point()
    clock.now += 0.1
    real_sleep = clock.sleep

    def serving_ends(s: float) -> None:
        real_sleep(s)
        if clock.now >= 0.3:
            load[0] = 0

    g.sleep = serving_ends
    g.yield_point()  # would pause 0.9 s; serving ends after ~0.1 s of it
    assert g.yielded_s == pytest.approx(0.1, abs=0.006)


def test_no_limit_and_suspended_never_wait():
    load = [5]
    g, clock = governor(load, share=1.0)
    work(g, clock, 3)
    g.share = 0.5
    with g.suspend():  # generation is paused for a step: nobody to yield to
        work(g, clock, 3)
    assert not clock.slept
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        g.share = 0


def test_yield_points_sit_before_every_decoder_layer(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen3"))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers and all(isinstance(m, nn.Module) for m in layers)
    calls = []
    g = Governor(lambda: 0, 0.5)
    g.yield_point = lambda: calls.append(1)
    g.install(model)
    model(torch.tensor([[1, 2, 3]]))
    assert len(calls) == len(layers)
