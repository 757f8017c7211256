"""An independent reference for concept maps and concept relevance (CRP), built on zennit 1.0.0 and autograd, not
on our engine: the relevance (zennit's modified gradient) is masked at the named modules' outputs by tensor hooks
registered in forward hooks, as zennit-crp's `MaskHook` does; with exclude_parallel the backward pass is partial,
as zennit-crp's `CondAttribution.backward`: `autograd.grad` from the output to the topmost conditioned layer's
output, masked there, then on to the next conditioned layer, and the last one's masked relevance alone is
propagated to the input, so relevance that went around a conditioned layer (a skip connection) is left out.

The mask hooks are registered after zennit's own (inside the composite's context): zennit 1.0 wraps a module's
output in an identity whose backward stores the relevance the module's rule then uses, so a mask must act on that
wrapped output, or the rule would see the unmasked relevance.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def zennit_name(name: str) -> str:
    """Our name of a residual addition (`layer1.0.add`) -> the module zennit's ResNet canonizer adds for it."""
    return name[: -len("add")] + "canonizer_sum" if name.endswith(".add") else name


def start_relevance(logits: Tensor, target: Tensor) -> Tensor:
    """one-hot(target) * logits, the start relevance of our composites' `logit` start (and of zennit-crp)."""
    index = target[:, None]
    return torch.zeros_like(logits).scatter_(1, index, logits.gather(1, index))


def channel_masks(rows: Sequence[Sequence[int]], like: Tensor) -> Tensor:
    """Per batch row, 1 at the row's listed channels of dimension 1, 0 elsewhere, broadcastable to `like` (CRP's
    `ChannelConcept.mask`, one condition per batch row as zennit-crp's broadcast batches)."""
    mask = torch.zeros(like.shape[0], like.shape[1], dtype=like.dtype, device=like.device)
    for row, channels in enumerate(rows):
        mask[row, list(channels)] = 1.0
    return mask.reshape(*mask.shape, *(1,) * (like.ndim - 2))


@contextmanager
def _outputs(model: nn.Module, names: Sequence[str], on_output: Callable[[str, Tensor], None]) -> Iterator[list[str]]:
    """Forward hooks on the named modules calling on_output(name, output); yields the names in the order their
    outputs were made (the last is the topmost layer)."""
    modules = dict(model.named_modules())
    order: list[str] = []

    def hook(name: str):
        def record(module, inputs, output):
            order.append(name)
            on_output(name, output)
        return record

    handles = [modules[zennit_name(name)].register_forward_hook(hook(name)) for name in names]
    try:
        yield order
    finally:
        for handle in handles:
            handle.remove()


def masked_relevance(model: nn.Module, composite, x: Tensor, target: Tensor,
                     conditions: Sequence[Mapping[str, Sequence[int]]], exclude_parallel: bool = True) -> Tensor:
    """The input relevance (B, C, H, W) of batch row b under conditions[b] {module name: [channels]}; every
    condition names the same layers (zennit-crp's requirement for exclude_parallel, met by grouping)."""
    names = list(conditions[0])
    assert all(set(c) == set(names) for c in conditions), "one set of layer names per pass"
    x = x.detach().clone().requires_grad_(True)
    outputs: dict[str, Tensor] = {}

    def mask_hook(name: str, output: Tensor) -> None:
        outputs[name] = output
        if not exclude_parallel:
            output.register_hook(lambda grad: grad * channel_masks([c[name] for c in conditions], grad))

    with composite.context(model) as modified, _outputs(modified, names, mask_hook) as order:
        logits = modified(x)
        start = start_relevance(logits.detach(), target)
        if not exclude_parallel:
            torch.autograd.backward(logits, start)
        else:
            above, grad = logits, start
            for name in reversed(order):  # topmost first
                (grad,) = torch.autograd.grad(above, outputs[name], grad, retain_graph=True)
                grad = grad * channel_masks([c[name] for c in conditions], grad)
                above = outputs[name]
            torch.autograd.backward(above, grad)
    return x.grad.detach()


def conditional_relevance(model: nn.Module, composite, x: Tensor, target: Tensor,
                          condition: Mapping[str, Sequence[int]], exclude_parallel: bool = True) -> Tensor:
    """The input relevance (N, C, H, W) of one condition {module name: [channels]} applied to every image."""
    return masked_relevance(model, composite, x, target, [condition] * x.shape[0], exclude_parallel)


def layer_relevance(model: nn.Module, composite, x: Tensor, target: Tensor, layers: Sequence[str]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """The input relevance (N, C, H, W) and, per layer, the relevance arriving at its output summed over space
    (N, C) (CRP's concept relevance, not normalised), from one unconditional backward pass."""
    x = x.detach().clone().requires_grad_(True)
    found: dict[str, Tensor] = {}

    def record_hook(name: str, output: Tensor) -> None:
        def record(grad: Tensor) -> None:
            found[name] = grad.detach().flatten(2).sum(2) if grad.ndim > 2 else grad.detach()
        output.register_hook(record)

    with composite.context(model) as modified, _outputs(modified, list(layers), record_hook):
        logits = modified(x)
        torch.autograd.backward(logits, start_relevance(logits.detach(), target))
    return x.grad.detach(), found


def concept_maps(model: nn.Module, composite, x: Tensor, target: Tensor,
                 conditions: Sequence[Mapping[str, Sequence[int]]] | Sequence[Sequence[Mapping[str, Sequence[int]]]],
                 exclude_parallel: bool = True, channel_sum: bool = True) -> Tensor:
    """(N, K, H, W) maps ((N, K, C, H, W) with channel_sum=False), as `LRPModel.concept_maps`: K conditions for
    every image, or N lists of K (one per image). As zennit-crp, the (image, condition) pairs that name the same
    layers run as one batch (each image repeated), one backward pass per set of layer names."""
    rows = [list(conditions)] * x.shape[0] if isinstance(conditions[0], Mapping) else [list(r) for r in conditions]
    k = len(rows[0])
    groups: dict[frozenset[str], list[tuple[int, int]]] = {}
    for i, row in enumerate(rows):
        for j, condition in enumerate(row):
            groups.setdefault(frozenset(condition), []).append((i, j))
    maps = torch.zeros(x.shape[0], k, *x.shape[1:], dtype=x.dtype)
    for pairs in groups.values():
        images = torch.tensor([i for i, _ in pairs])
        found = masked_relevance(model, composite, x[images], target[images], [rows[i][j] for i, j in pairs],
                                 exclude_parallel)
        for (i, j), relevance in zip(pairs, found):
            maps[i, j] = relevance
    return maps.sum(2) if channel_sum else maps
