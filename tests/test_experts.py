"""A mixture of experts' fused expert weights, trained as one matrix per expert: a tiny Qwen3-MoE from
transformers (its experts are [experts, m, n] stacks), offline."""

from __future__ import annotations

import pytest
import torch
import transformers

from apollo_train.shared.config import Settings
from worker import memory
from worker.chat_tokens import Encoded
from worker.param_groups import make_optimizer, optimizer_state_bytes
from worker.trainer import Trainer, collate

EXPERTS, HIDDEN, INTERMEDIATE = 16, 64, 32


def moe_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        num_experts=EXPERTS, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)
    return transformers.Qwen3MoeForCausalLM(config)


def batch() -> list[Encoded]:
    return [Encoded(input_ids=[5, 9, 17, 3], target_start=2, key="a")]  # 4 tokens x 2 of 16 experts


def stacks(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.ndim == 3}


def routed_experts(model) -> dict[str, set[int]]:
    """The experts each layer's router sends the batch's tokens to (its gradient is non-zero there)."""
    model.zero_grad(set_to_none=True)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_tokens_per_step=64).loss(
        *collate(batch())).backward()
    out = {n: {e for e in range(EXPERTS) if p.grad[e].abs().sum() > 0} for n, p in stacks(model).items()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "adamw"])
def test_only_the_experts_a_step_routed_to_change(name):
    model = moe_model()
    routed = routed_experts(model)
    assert all(0 < len(r) < EXPERTS for r in routed.values())  # some experts unused: the point of the test
    opt = make_optimizer(model, name, lr=1e-2)
    assert [g["experts"] for g in opt.param_groups].count(True) == 1
    trainer = Trainer(model, opt, max_tokens_per_step=64)
    before = {n: p.detach().clone() for n, p in stacks(model).items()}
    trainer.train(batch())
    for n, p in stacks(model).items():
        changed = {e for e in range(EXPERTS) if not torch.equal(p[e], before[n][e])}
        assert changed == routed[n] and set(opt.state[p]["experts"]) == routed[n], n
    # the step moved the router too: each expert counts the steps that routed to it
    again = routed_experts(model)
    trainer.train(batch())
    for n, p in stacks(model).items():
        steps = {e: int(s["step"]) for e, s in opt.state[p]["experts"].items()}
        assert steps == {e: (e in routed[n]) + (e in again[n]) for e in routed[n] | again[n]}, n


def test_each_expert_is_projected_as_a_matrix_of_its_own():
    model = moe_model()
    opt = make_optimizer(model, "apollo", lr=1e-2, rank=4)
    Trainer(model, opt, max_tokens_per_step=64).train(batch())
    gate_up = next(p for n, p in stacks(model).items() if n.endswith("gate_up_proj"))  # [E, 2I, H]
    for e, state in opt.state[gate_up]["experts"].items():
        assert state["exp_avg"].shape == (2 * INTERMEDIATE, 4) and state["proj"].shape == (HIDDEN, 4), e
    projections = [s["proj"] for s in opt.state[gate_up]["experts"].values()]
    assert not torch.equal(projections[0], projections[1])  # drawn per expert
    # the estimate counts every expert, as if each had been routed to
    stack_state = sum(4 * (8 * max(p.shape[1:]) + p.element_size() * min(p.shape[1:])) * p.shape[0]
                      for p in stacks(model).values())
    assert memory.estimate(model, opt, Settings())["optimizer_state"] >= stack_state


def test_an_expert_stack_steps_alike_in_backward_and_after_it():
    runs = []
    for step_in_backward in (False, True):
        model = moe_model()
        opt = make_optimizer(model, "apollo", lr=1e-2, rank=4)
        Trainer(model, opt, max_tokens_per_step=64, step_in_backward=step_in_backward).train(batch(), epochs=3)
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, optimizer_state_bytes(opt)))
    (a, sa), (b, sb) = runs
    assert sa == sb and all(torch.equal(a[n], b[n]) for n in a)


def test_an_expert_stack_state_saves_and_loads():
    model = moe_model()
    opt = make_optimizer(model, "apollo", lr=1e-2, rank=4)
    Trainer(model, opt, max_tokens_per_step=64).train(batch())
    again = make_optimizer(model, "apollo", lr=1e-2, rank=4)
    again.load_state_dict(opt.state_dict())
    for p in stacks(model).values():
        mine, theirs = opt.state[p]["experts"], again.state[p]["experts"]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[e][k], theirs[e][k]) for e in mine for k in mine[e])
