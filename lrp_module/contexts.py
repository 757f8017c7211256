"""What the engine proves about each layer from the graph alone, and which fast path each proof makes exact.

A rule's general path is its formula as zennit 1.0 computes it. A fast path drops terms that are exactly zero, or
reads a value the forward already holds, and is exact only where the facts below hold. `prove` derives them from
the step graph and the chosen rules, never from data; a path's `applies` predicate names the facts it needs, and
the engine binds the first path of a rule whose predicate holds (lrp_module/rules/base.py, `Rule.bind`).

fact (`LayerContext`)  proved when                                  makes exact                   enables
---------------------  -------------------------------------------  ----------------------------  --------------------
input_nonnegative      every input of the step is a ReLU output, or  a- = 0: every term on the     ZPlusNonnegative,
                       a pooling, flatten, concatenation or sum of   input's negative part is      AlphaBetaNonnegative,
                       such values                                   zero                          GammaFromOutput
relu                   the ReLU that alone reads the layer's output  (the output is relu(o): a     (with the next fact)
                       is fused into the step                        path that needs o stashes it)
relevance_on_active    `relu`, the output is not the model's, and    relevance is zero wherever    EpsilonOnActive,
                       every reader gives zero relevance where its   relu(o) = 0: relu(o) stands   SumNormOnActive; with
                       input is zero (`multiplies_input`), or routes  in for o, only the o > 0      input_nonnegative
                       relevance to where its input equals its       terms remain                  GammaOnActive
                       output (arg-max pooling, flatten, ReLU,
                       split) and its own output has the property

Rules that give relevance where their input is zero (flat, w^2, z^B, z+ on an all-ones input) end the third fact
below them: the layers that feed them keep their general path (tests/test_resnet.py shows it on a ResNet).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .graph import Step, StepKind


@dataclass(frozen=True)
class LayerContext:
    """What the model builder proved about one layer's surroundings (the table above)."""

    input_nonnegative: bool  # the layer's input is >= 0 everywhere (it follows a ReLU)
    relu: bool  # a ReLU follows the layer (fused into the step)
    relevance_on_active: bool  # incoming relevance is zero wherever that ReLU outputs zero


class ZeroPattern(Protocol):
    """What `prove` asks of a rule: does its input relevance vanish where its input does?"""

    multiplies_input: bool  # the input relevance is a * (something): zero where the input is zero
    routes_to_input: bool  # relevance goes to input positions that equal an output value (arg-max pooling)


_MAKES_NONNEGATIVE = (StepKind.AFFINE, StepKind.ADD)  # with a fused ReLU


def prove(specs: Sequence[Step], rules: Sequence[ZeroPattern | None], output: int) -> list[LayerContext]:
    """The `LayerContext` of every step. `rules[k]` is step k's rule (None for steps without one: flatten, ReLU,
    concatenation, which pass the zero pattern on); `output` is the step whose value the model returns."""
    nonnegative: dict[int, bool] = {-1: False}  # the image may be negative
    readers: dict[int, list[int]] = {k: [] for k in range(-1, len(specs))}
    for k, spec in enumerate(specs):
        for i in spec.inputs:
            readers[i].append(k)
        if spec.kind in _MAKES_NONNEGATIVE and spec.relu or spec.kind is StepKind.RELU:
            nonnegative[k] = True
        elif spec.kind is StepKind.AFFINE:
            nonnegative[k] = False
        else:  # pooling, flatten, concatenation and sums of non-negative values stay non-negative
            nonnegative[k] = all(nonnegative[i] for i in spec.inputs)
    zero_where_zero: dict[int, bool] = {}

    def keeps(reader: int) -> bool:
        """Does `reader` give zero relevance to its input wherever that input is zero?"""
        rule = rules[reader]
        if rule is None or rule.routes_to_input:  # flatten, ReLU, split, arg-max: the property carries over
            return zero_where_zero[reader]
        return rule.multiplies_input

    for k in range(len(specs) - 1, -1, -1):
        zero_where_zero[k] = k != output and all(keeps(r) for r in readers[k])
    return [LayerContext(all(nonnegative[i] for i in spec.inputs), spec.relu, spec.relu and zero_where_zero[k])
            for k, spec in enumerate(specs)]
