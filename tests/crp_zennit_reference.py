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


def channel_mask(channels: Sequence[int], like: Tensor) -> Tensor:
    """1 at the listed channels of dimension 1, 0 elsewhere, broadcastable to `like` (CRP's `ChannelConcept.mask`)."""
    mask = torch.zeros(like.shape[1], dtype=like.dtype, device=like.device)
    mask[list(channels)] = 1.0
    return mask.reshape(1, -1, *(1,) * (like.ndim - 2))


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


def conditional_relevance(model: nn.Module, composite, x: Tensor, target: Tensor,
                          condition: Mapping[str, Sequence[int]], exclude_parallel: bool = True) -> Tensor:
    """The input relevance (N, C, H, W) of one condition {module name: [channels]} applied to every image."""
    x = x.detach().clone().requires_grad_(True)
    outputs: dict[str, Tensor] = {}

    def mask_hook(name: str, output: Tensor) -> None:
        outputs[name] = output
        if not exclude_parallel:
            output.register_hook(lambda grad: grad * channel_mask(condition[name], grad))

    with composite.context(model) as modified, _outputs(modified, list(condition), mask_hook) as order:
        logits = modified(x)
        start = start_relevance(logits.detach(), target)
        if not exclude_parallel:
            torch.autograd.backward(logits, start)
        else:
            above, grad = logits, start
            for name in reversed(order):  # topmost first
                (grad,) = torch.autograd.grad(above, outputs[name], grad, retain_graph=True)
                grad = grad * channel_mask(condition[name], grad)
                above = outputs[name]
            torch.autograd.backward(above, grad)
    return x.grad.detach()


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
                 exclude_parallel: bool = True) -> Tensor:
    """(N, K, H, W) channel-summed maps, as `LRPModel.concept_maps`: K conditions for every image, or N lists of K
    (one per image); one zennit backward pass per condition (and per image for per-image conditions)."""
    if isinstance(conditions[0], Mapping):
        return torch.stack([conditional_relevance(model, composite, x, target, c, exclude_parallel).sum(1)
                            for c in conditions], dim=1)
    return torch.cat([concept_maps(model, composite, x[i:i + 1], target[i:i + 1], row, exclude_parallel)
                      for i, row in enumerate(conditions)])
