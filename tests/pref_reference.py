"""TRL's preference losses called on log-probabilities we choose (test helpers).

TRL computes its losses inside the trainers' ``_compute_loss`` from a model's per-token
log-probabilities; these helpers call those very methods with a stand-in trainer (the attributes
they read) and a stand-in model whose per-token log-probabilities sum to the given values.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer


def _accelerator():
    return SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
    )


def _trainer(**attrs) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _per_token(totals: torch.Tensor, tokens: torch.Tensor, width: int):
    """(log_probs (n, width-1), completion_mask (n, width)): each row's first ``tokens[i]``
    completion positions share ``totals[i]`` equally."""
    n = len(totals)
    mask = torch.zeros(n, width, dtype=torch.long)
    logps = torch.zeros(n, width - 1, dtype=torch.float64)
    for i in range(n):
        k = int(tokens[i])
        mask[i, 1 : 1 + k] = 1
        logps[i, :k] = totals[i].double() / k
    return logps, mask


class _Model:
    """Returns the chosen per-token log-probabilities for whichever input ids it is given."""

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def __call__(self, input_ids, **kwargs):
        logps = self.table[id(input_ids)]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(
            log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo(loss_type, beta, label_smoothing, chosen, rejected, ref_chosen, ref_rejected):
    """TRL's DPO loss (the batch mean); each argument is (totals, tokens)."""
    width = int(max(chosen[1].max(), rejected[1].max())) + 2
    logps, mask = _per_token(
        torch.cat([chosen[0], rejected[0]]), torch.cat([chosen[1], rejected[1]]), width
    )
    ids = torch.zeros_like(mask)
    trainer = _trainer(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_chosen[0].double(),
        "ref_rejected_logps": ref_rejected[0].double(),
    }
    return DPOTrainer._compute_loss(trainer, _Model({id(ids): logps}), inputs, False)


def trl_kto(beta, desirable_weight, undesirable_weight, policy, reference, kl, kl_ref, labels):
    width = int(max(policy[1].max(), kl[1].max())) + 2
    logps, mask = _per_token(policy[0], policy[1], width)
    kl_logps, kl_mask = _per_token(kl[0], kl[1], width)
    ids, kl_ids = torch.zeros_like(mask), torch.ones_like(kl_mask)
    trainer = _trainer(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(
        trainer, model, batch
    )
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": labels,
        "ref_logps": reference[0].double(),
        "ref_KL_logps": kl_ref[0].double(),
    }
    model = _Model({id(ids): logps, id(kl_ids): kl_logps})
    return KTOTrainer._compute_loss(trainer, model, batch, False)


def trl_orpo_ratio(beta, chosen_mean, rejected_mean):
    """ORPO's odds-ratio term (its losses, before the batch mean) on mean log-probabilities."""
    trainer = _trainer(beta=beta)
    return ORPOTrainer.odds_ratio_loss(trainer, chosen_mean, rejected_mean)[0]


def trl_simpo(beta, gamma, label_smoothing, chosen_mean, rejected_mean):
    trainer = _trainer(
        beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, loss_type="simpo", alpha=0.0
    )
    return CPOTrainer.cpo_loss(trainer, chosen_mean, rejected_mean)[0]
