"""Member processes kept warm between the runs of one driver.

Every run's members used to start fresh processes, and on a small machine that is most of a
short run: each one is a Ray worker that imports torch and the optimizer's compiler stack (about
6 s of CPU per member on 2 cores, ``benchmarks/README.md``). When Ray was already initialized
in the driver before the run (``ray.init()`` in a notebook, a sweep written in Python, a test
session), a run that ends well hands its
placement group, its member actors and its coordinator to this module instead of ending them. The next run of the
same shape (the same resource bundles and placement strategy, on the same Ray) takes them over:
each member re-creates everything it holds for the new run in the same process
(``MemberHost.rebind``: model, data, optimizer, seeds, the connection to the new coordinator),
as Ray Tune's ``reuse_actors`` does for trials; the coordinator likewise (``CoordinatorActor.rebind``).

Before they are kept, the processes let go of everything the run held (``park``), but they keep
their Ray resources reserved: other Ray work waits for those CPUs and GPUs. They are ended after
``keep_warm_s`` seconds unused, when a poptrain run of another shape (or one with
``keep_warm_s=0``) starts, or by :func:`release_warm_members`. A run that fails never leaves
warm processes behind. One set is kept at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WarmMembers:
    """A finished run's placement group, member actors (one per bundle, in bundle order) and
    coordinator, with the tag its name and the members' shared-memory files carry."""

    key: tuple
    group: Any
    actors: list[Any] = field(default_factory=list)
    coordinator: Any = None
    run_tag: str = ""

    @property
    def processes(self) -> list[Any]:
        """Every actor of the set: the members, then the coordinator."""
        return [*self.actors, self.coordinator]


_lock = threading.Lock()
_warm: WarmMembers | None = None
_timer: threading.Timer | None = None


def shape_key(bundles: list[dict[str, float]], strategy: str) -> tuple:
    """What two runs must share for one to take over the other's members: this Ray session (job
    and driver node), the placement strategy, and every member's resource bundle, in order."""
    import ray

    context = ray.get_runtime_context()
    return (context.get_job_id(), context.get_node_id(), strategy, tuple(tuple(sorted(b.items())) for b in bundles))


def take(key: tuple) -> WarmMembers | None:
    """The warm members for a run of shape ``key``, now that run's own (None if there are none).
    Warm members of another shape are ended first, so their resources are free for the run."""
    warm = _pop()
    if warm is None:
        return None
    if warm.key == key:
        return warm
    end(warm)
    return None


def keep(warm: WarmMembers, idle_s: float) -> None:
    """Keep ``warm`` for the next run of its shape, for at most ``idle_s`` seconds unused."""
    global _warm, _timer
    with _lock:
        previous, _warm = _warm, warm
        _cancel_timer()
        _timer = threading.Timer(idle_s, _expire, args=(warm,))
        _timer.daemon = True
        _timer.start()
    if previous is not None:  # another thread's run kept a set meanwhile: one set at a time
        end(previous)


def kept() -> WarmMembers | None:
    """The set kept now (it stays kept), or None: to look at its processes."""
    with _lock:
        return _warm


def release_warm_members() -> None:
    """End the member processes kept warm by the last run now, and free their resources."""
    warm = _pop()
    if warm is not None:
        end(warm)


def _pop() -> WarmMembers | None:
    """The warm set, no longer kept (its timer cancelled), or None."""
    global _warm
    with _lock:
        warm, _warm = _warm, None
        _cancel_timer()
    return warm


def end(warm: WarmMembers) -> None:
    """Kill ``warm``'s actors and remove its placement group (nothing to do once its Ray is gone)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    if not ray.is_initialized():
        return
    context = ray.get_runtime_context()
    if warm.key[:2] != (context.get_job_id(), context.get_node_id()):
        return  # from an earlier Ray session: its processes ended with it
    for actor in warm.processes:
        ray.kill(actor, no_restart=True)
    remove_placement_group(warm.group)


def _expire(warm: WarmMembers) -> None:
    global _warm
    with _lock:
        if _warm is not warm:  # taken by a run meanwhile
            return
        _warm = None
    try:
        end(warm)
    except Exception:  # Ray was shut down under the timer: the processes ended with it
        pass


def _cancel_timer() -> None:
    global _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None
