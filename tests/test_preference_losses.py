"""Preference losses == TRL's on the same log-probabilities; gradients by finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pref_reference import trl_dpo, trl_kto, trl_orpo_ratio, trl_simpo

from xtuner_lite.errors import XtunerError
from xtuner_lite.objectives.preference.losses import (
    DPO_LOSSES,
    SequenceLogps,
    dpo_losses,
    kto_losses,
    orpo_losses,
    reward_losses,
    simpo_losses,
)
from xtuner_lite.objectives.preference.objective import DPOObjective

N = 6


def _logps(seed: int) -> SequenceLogps:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (N,), generator=g)
    return SequenceLogps(-torch.rand(N, generator=g, dtype=torch.float64) * tokens * 2, tokens)


def _pairs():
    return _logps(0), _logps(1), _logps(2), _logps(3)


def _args(s: SequenceLogps):
    return (s.total, s.tokens)


# TRL applies label_smoothing to robust only (sigmoid with smoothing, cDPO: the next test)
TRL_CASES = [(t, 0.1, 0.0) for t in DPO_LOSSES if t != "kto_pair"] + [
    ("sigmoid", 0.5, 0.0),
    ("ipo", 0.5, 0.0),
    ("robust", 0.5, 0.2),
]


@pytest.mark.parametrize("loss_type,beta,smoothing", TRL_CASES)
def test_dpo_losses_equal_trl(loss_type, beta, smoothing):
    c, r, rc, rr = _pairs()
    ours = dpo_losses(loss_type, beta, smoothing, c, r, rc, rr).losses.mean()
    theirs = trl_dpo(loss_type, beta, smoothing, _args(c), _args(r), _args(rc), _args(rr))
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_cdpo_and_kto_pair_follow_xtuner():
    """Conservative DPO and kto_pair as XTuner 0.x (and TRL < 0.9) wrote them."""
    c, r, rc, rr = _pairs()
    beta, eps = 0.3, 0.1
    logits = (c.total - rc.total) - (r.total - rr.total)
    cdpo = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    ours = dpo_losses("sigmoid", beta, eps, c, r, rc, rr).losses
    torch.testing.assert_close(ours, cdpo)
    chosen_kl = (c.total - rc.total).mean().clamp(min=0)
    rejected_kl = (r.total - rr.total).mean().clamp(min=0)
    both = torch.cat(
        (
            1 - torch.sigmoid(beta * ((c.total - rc.total) - rejected_kl)),
            1 - torch.sigmoid(beta * (chosen_kl - (r.total - rr.total))),
        )
    )
    ours = dpo_losses("kto_pair", beta, 0.0, c, r, rc, rr).losses
    torch.testing.assert_close(ours.mean(), both.mean())


def test_orpo_equals_trl_on_one_pair():
    """TRL's ORPO loss is the batch's token-mean NLL minus the odds-ratio term; for one pair
    that is the chosen response's mean NLL, as ours is per pair."""
    c, r, _, _ = _pairs()
    beta = 0.1
    ours = orpo_losses(beta, c, r).losses
    ratio = trl_orpo_ratio(beta, c.mean, r.mean)
    torch.testing.assert_close(ours, -c.mean.float() - ratio)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trl(smoothing):
    c, r, _, _ = _pairs()
    ours = simpo_losses(2.0, 0.5, smoothing, 0.0, c, r).losses
    torch.testing.assert_close(ours, trl_simpo(2.0, 0.5, smoothing, c.mean, r.mean))


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(weights):
    policy, reference, kl, kl_ref = _pairs()
    labels = torch.tensor([True, False, True, True, False, False])
    ours, _ = kto_losses(0.1, *weights, policy, reference, kl, kl_ref, labels)
    theirs = trl_kto(
        0.1, *weights, _args(policy), _args(reference), _args(kl), _args(kl_ref), labels
    )
    torch.testing.assert_close(ours.losses.mean(), theirs)


def test_reward_loss_is_bradley_terry():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(N, generator=g), torch.randn(N, generator=g)
    ours = reward_losses(chosen, rejected, margin=0.5, center_coefficient=0.01).losses
    expected = -torch.log(torch.sigmoid(chosen - rejected - 0.5)) + 0.01 * (chosen + rejected) ** 2
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_dpo_gradients_match_finite_differences(loss_type):
    c, r, rc, rr = _pairs()

    def f(chosen, rejected):
        return dpo_losses(
            loss_type,
            0.2,
            0.1 if loss_type == "robust" else 0.0,
            SequenceLogps(chosen, c.tokens),
            SequenceLogps(rejected, r.tokens),
            rc,
            rr,
        ).losses.sum()

    inputs = (c.total.clone().requires_grad_(), r.total.clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)


def test_unknown_loss_type_is_named():
    with pytest.raises(XtunerError, match="objective.loss_type must be one of"):
        DPOObjective(loss_type="sigmod")
