"""FusionRoute's combination rule and training objectives, as pure functions on tensors.

Position convention (the same everywhere here): for token ids `input_ids` [B, T], `lm_logits[:, t]`
and `route_logits[:, t]` predict and route the token `input_ids[:, t + 1]`. Per-prediction inputs
(`expert_token_logprobs`, `informative`) are indexed by the prediction position t, like the logits;
`target_mask` is indexed by the token, like `input_ids`: `target_mask[:, t + 1]` says whether the
prediction made at t is trained on. The last position predicts nothing and the first token is
never a target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import RouterOutput


def combine_logprobs(router_logprobs: Tensor, expert_logprobs: Tensor) -> Tensor:
    """Log of the normalised product of two distributions given as log-probs: log_softmax(r + e) on
    the last dim, for [V] or any batched [..., V] shape.

    >>> r = torch.tensor([0.7, 0.1, 0.2]).log()
    >>> e = torch.tensor([0.4, 0.5, 0.1]).log()
    >>> combine_logprobs(r, e).exp().round(decimals=4)  # 0.28, 0.05, 0.02 normalised
    tensor([0.8000, 0.1429, 0.0571])
    """
    return torch.log_softmax(router_logprobs.float() + expert_logprobs.float(), dim=-1)


def informative_mask(expert_greedy: Tensor) -> Tensor:
    """[B, T] mask of the positions where the experts' greedy next tokens ([E, B, T]) do not all agree.

    >>> informative_mask(torch.tensor([[[1, 2, 3]], [[1, 5, 3]]]))
    tensor([[False,  True, False]])
    """
    if expert_greedy.dim() != 3:
        raise ValueError(f"expert_greedy must be [E, B, T], got shape {tuple(expert_greedy.shape)}")
    return (expert_greedy != expert_greedy[:1]).any(dim=0)


def sequence_logprob(lm_logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> Tensor:
    """[B] sums of log p(input_ids[:, t+1] | input_ids[:, :t+1]) over the tokens t+1 with target_mask set.

    `target_mask` is aligned with `input_ids` (True on e.g. the response tokens); a mask on the first
    token is ignored, since nothing predicts it.

    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> sequence_logprob(logits, torch.tensor([[0, 1, 2]]), torch.tensor([[False, True, True]]))
    tensor([-2.7726])
    """
    logprobs = _token_logprobs(lm_logits, input_ids)
    return (logprobs * target_mask[:, 1:].to(logprobs.dtype)).sum(dim=-1)


def sft_loss(
    out: RouterOutput,
    input_ids: Tensor,
    target_mask: Tensor,
    expert_token_logprobs: Tensor,
    informative: Tensor,
    lam: float = 1 / 3,
) -> tuple[Tensor, dict[str, float]]:
    """FusionRoute's supervised objective: L_LM + lam * L_expert.

    L_LM is the router LM's mean NLL over the target tokens. L_expert is the sum over informative
    target predictions of -log sum_i softmax(route_logits)_i * p_i(y), the likelihood of the gold
    token under the routing mixture of the experts, divided by the same number of target tokens
    as L_LM: an example whose experts disagree more often carries more routing signal, as in the
    paper's sum, and lam weighs the two per target token. It is 0, with no gradient reaching the
    routing head, when no prediction is informative.
    `expert_token_logprobs[b, t, i]` is log p_i(input_ids[b, t+1] | input_ids[b, :t+1]) ([B, T, E]),
    `informative[b, t]` ([B, T]) refers to that same prediction (see the module's convention).

    Returns the loss and its parts {"lm", "expert", "informative" (number of positions)}.
    """
    B, T = input_ids.shape
    if expert_token_logprobs.shape[:2] != (B, T) or expert_token_logprobs.shape[-1] != out.route_logits.shape[-1]:
        raise ValueError(
            f"expert_token_logprobs must be [B, T, E] = [{B}, {T}, {out.route_logits.shape[-1]}], "
            f"got {tuple(expert_token_logprobs.shape)}"
        )
    targets = target_mask[:, 1:].bool()  # [B, T-1], per prediction position
    nll = -_token_logprobs(out.lm_logits, input_ids)
    lm = (nll * targets).sum() / targets.sum().clamp(min=1)

    chosen = targets & informative[:, :-1].bool()
    count = int(chosen.sum())
    if count:
        route = torch.log_softmax(out.route_logits[:, :-1].float(), dim=-1)[chosen]  # [N, E]
        mixture = torch.logsumexp(route + expert_token_logprobs[:, :-1].float()[chosen], dim=-1)
        expert = -mixture.sum() / targets.sum()
    else:
        # No graph to the routing head: a zero gradient would still move it through AdamW's momentum.
        expert = out.lm_logits.new_zeros((), dtype=torch.float32)
    loss = lm + lam * expert
    return loss, {"lm": float(lm.detach()), "expert": float(expert.detach()), "informative": float(count)}


def cdpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    expert_chosen: Tensor,
    expert_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Complementary DPO on the router LM: the DPO margin plus the selected expert's chosen-vs-rejected
    log-likelihood ratio as a fixed (stop-gradient) bias. Every argument is [B] sequence log-likelihoods.

    Where the expert already prefers the chosen answer the loss saturates, so the router LM learns
    mostly where the expert is wrong.

    >>> zero = torch.zeros(2)
    >>> cdpo_loss(zero, zero, zero, zero, zero, zero).round(decimals=4)  # -log(1/2)
    tensor(0.6931)
    """
    policy_margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    expert_margin = (expert_chosen - expert_rejected).detach()
    return -F.logsigmoid(beta * policy_margin + beta * expert_margin).mean()


def routing_accuracy(route_logits: Tensor, best_expert: Tensor, mask: Tensor) -> float:
    """Fraction of the masked positions where the highest routing logit picks `best_expert`
    (all three aligned on the same positions); nan when the mask is empty.

    >>> routing_accuracy(torch.tensor([[[2.0, 1.0], [0.0, 3.0]]]), torch.tensor([[0, 0]]), torch.tensor([[True, True]]))
    0.5
    """
    mask = mask.bool()
    total = int(mask.sum())
    if total == 0:
        return float("nan")
    correct = (route_logits.argmax(dim=-1) == best_expert) & mask
    return int(correct.sum()) / total


def _token_logprobs(lm_logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T-1] log p(input_ids[:, t+1] | ..t), in float32."""
    logprobs = torch.log_softmax(lm_logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
