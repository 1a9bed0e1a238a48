"""Member processes kept warm between the runs of one driver.

Every run's members used to start fresh processes, and on a small machine that is most of a
short run: each one is a Ray worker that imports torch and the optimizer's compiler stack (about
6 s of CPU per member on 2 cores, ``benchmarks/README.md``). When Ray was already initialized
in the driver before the run (``ray.init()`` in a notebook, a sweep written in Python, a test
session), a run that ends well hands its
placement group, its member actors and its coordinator to this module instead of ending them. The next run of the
same shape (the same resource bundles and placement strategy, on the same Ray; on one node, the
same number of hosts holding the same resources in all, however the CPUs are split among them:
:func:`fits`) takes them over:
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
    one_node: bool = False  # whether all its bundles sit on one node (:func:`fits`); set by :func:`keep`

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


def fits(kept: tuple, wanted: tuple, one_node: bool) -> bool:
    """Whether warm members of shape ``kept`` (:func:`shape_key`) can carry a run of shape ``wanted``:
    the same shape; or, when all their bundles sit on one node (``one_node``), the same session,
    strategy and number of hosts, each host with the same resources but CPUs, and the same CPUs
    in all (to the rounding of shares). Ray's CPU shares are accounting, not isolation: on one node
    the run reserves what it needs either way. The run then takes the warm group's bundles as its
    own: what a host restarted in one asks for (a share the bundle does not hold would never be
    placed), and the CPUs each host sets its torch threads from (``MemberHost.rebind``). Runs of
    2, 3 or 5 members on a 2-core machine then share their processes (bundles of 1 + 1,
    1.33 + 0.66, 1.2 + 0.8 CPUs)."""
    if kept == wanted:
        return True
    if not one_node or kept[:3] != wanted[:3] or len(kept[3]) != len(wanted[3]):
        return False
    others = lambda bundles: [tuple((k, v) for k, v in b if k != "CPU") for b in bundles]  # noqa: E731
    cpus = lambda bundles: sum(v for b in bundles for k, v in b if k == "CPU")  # noqa: E731
    return others(kept[3]) == others(wanted[3]) and abs(cpus(kept[3]) - cpus(wanted[3])) <= 0.01 * max(1.0, cpus(kept[3]))


def take(key: tuple) -> WarmMembers | None:
    """The warm members for a run of shape ``key`` (:func:`fits`), now that run's own (None if there
    are none); their ``key`` stays their placement group's. Warm members that do not fit are ended
    first, so their resources are free for the run."""
    warm = _pop()
    if warm is None:
        return None
    if fits(warm.key, key, warm.one_node):
        return warm
    end(warm)
    return None


def keep(warm: WarmMembers, idle_s: float) -> None:
    """Keep ``warm`` for the next run of its shape, for at most ``idle_s`` seconds unused."""
    global _warm, _timer
    warm.one_node = _one_node(warm.group)
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


def _one_node(group: Any) -> bool:
    """Whether every bundle of placement group ``group`` sits on one node."""
    from ray.util import placement_group_table

    return len(set(placement_group_table(group).get("bundles_to_node_id", {}).values())) == 1


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
