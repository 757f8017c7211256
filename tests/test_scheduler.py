"""ShardScheduler's constructor: keyword-only (its eleven settings are never confused by position), and a
scheduler built with them runs every shard, on a synchronous stand-in for Ray."""
from __future__ import annotations

import pytest

from pipeline.contracts import ShardResult
from pipeline.scheduler import ShardScheduler


class _Done:
    """A remote call that has already returned `value`."""

    def __init__(self, value) -> None:
        self.value = value


class _Method:
    def __init__(self, function) -> None:
        self.function = function

    def remote(self, *args) -> _Done:
        return _Done(self.function(*args))


class _Actor:
    def __init__(self) -> None:
        self.ready = _Method(lambda: True)
        self.explain_shard = _Method(lambda shard, records, out, skip: ShardResult(shard, len(records), 0))


class _Ray:
    class exceptions:  # noqa: N801 (as ray.exceptions)
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            pass

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.value

    def kill(self, actor) -> None:
        pass


def _settings(results: list[ShardResult]) -> dict:
    return {"ray": _Ray(), "make_actor": _Actor, "count": 2, "shards": [["a", "b"], ["c"], ["d", "e", "f"]],
            "out": "/nowhere", "timeout_s": 60.0, "retries": 1, "on_result": results.append}


def test_the_scheduler_takes_its_settings_by_name_only():
    with pytest.raises(TypeError, match="positional"):
        ShardScheduler(*_settings([]).values())


def test_a_scheduler_built_by_keyword_runs_every_shard():
    results: list[ShardResult] = []
    counts = ShardScheduler(**_settings(results)).run([0, 1, 2])
    assert sorted((r.shard, r.explained) for r in results) == [(0, 2), (1, 1), (2, 3)]
    assert counts["crashed"] == counts["timed_out"] == counts["error"] == 0
