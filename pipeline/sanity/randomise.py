"""Which layers MPRT randomises and how, as Quantus 0.6.0 does (`PyTorchModel.get_random_layer_generator`): every
module with `reset_parameters` (convolutions, linear layers, batch norms: a batch norm's reset is its identity,
mean 0, variance 1, scale 1, shift 0), in the model's module order; each is re-initialised by its own
`reset_parameters` right after `torch.manual_seed(seed + 1)`, so a layer's random weights depend on the seed and
its shape only, never on the order or the mode. Cascading randomises from the top (output) layer down, cumulatively;
independent one layer at a time."""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

MODES = ("cascading", "independent")
DEFAULT_SEED = 42  # Quantus's


def randomisable(model: nn.Module) -> list[str]:
    """The names of the model's modules that MPRT randomises, bottom (input) first."""
    return [name for name, module in model.named_modules() if name and hasattr(module, "reset_parameters")]


def reset(module: nn.Module, seed: int) -> None:
    """Quantus's draw for one layer: the global CPU generator seeded with seed + 1, then the module's own
    reset_parameters (the caller's generator state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        module.reset_parameters()


def randomised(model: nn.Module, layers: Sequence[str], seed: int = DEFAULT_SEED) -> nn.Module:
    """A CPU copy of `model` with `layers` re-initialised (the definition; `randomised_models` makes the same
    models one after the other in a single working copy)."""
    copied = copy.deepcopy(model).cpu()
    modules = dict(copied.named_modules())
    for name in layers:
        reset(modules[name], seed)
    return copied.eval()


def randomised_models(model: nn.Module, layers: Sequence[str], mode: str, seed: int = DEFAULT_SEED
                      ) -> Iterator[tuple[int, str, tuple[str, ...], nn.Module]]:
    """`steps` with each step's model: one CPU working copy, changed in place (cascading: the next layer reset;
    independent: the previous layer's weights put back, this one reset), so a step costs one layer's draw, not a
    copy of the model. The model yielded is valid until the next step."""
    work = copy.deepcopy(model).cpu().eval()
    modules = dict(work.named_modules())
    kept = {name: copy.deepcopy(modules[name].state_dict()) for name in layers} if mode == "independent" else {}
    previous = None
    for step, layer, random_layers in steps(layers, mode):
        if previous is not None and mode == "independent":
            modules[previous].load_state_dict(kept[previous])
        reset(modules[layer], seed)
        previous = layer
        yield step, layer, random_layers, work


def steps(layers: Sequence[str], mode: str) -> Iterator[tuple[int, str, tuple[str, ...]]]:
    """(step, the layer randomised at this step, every layer randomised in this model), top layer first: cascading
    step s randomises the s top layers, independent step s only the s-th from the top (Quantus walks `independent`
    bottom first; the results are per layer, so the order changes nothing but the plot's shared axis)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    top_down = list(reversed(layers))
    for index, name in enumerate(top_down, start=1):
        yield index, name, tuple(top_down[:index]) if mode == "cascading" else (name,)
