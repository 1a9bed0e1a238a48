"""Where a population runs: Ray joined or started (:func:`ensure_ray`), each member's resources
resolved from ``auto`` against the cluster, the members grouped into hosts (processes) and one
placement group that fits them all or fails before anything starts (:class:`PlacementError`).
"""

from __future__ import annotations

import math
import os

from poptrain.config.schema import RunConfig


class PopulationError(RuntimeError):
    """The run failed while training; the message names the member and its error."""


class PlacementError(PopulationError):
    """The cluster cannot fit the population."""


def ensure_ray() -> bool:
    """Join ``$RAY_ADDRESS`` when set (e.g. inside ``ray job submit``), else start a local Ray on
    127.0.0.1 sized to this machine. Returns whether this call started (and so must stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # No runtime_env: workers find user code (import paths in the config) without one, since Ray
    # puts the driver's working directory on their sys.path and the local Ray's processes inherit
    # the driver's environment (PYTHONPATH included). With a job runtime_env, the workers Ray
    # starts ahead of time matched no actor, and two idle processes were started for nothing.
    ray.init(
        address="local",  # a cluster left by `ray start` on this machine is not joined unless RAY_ADDRESS says so
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        log_to_driver=True,
    )
    return True


def member_resources(cfg: RunConfig, cluster: dict[str, float]) -> list[dict[str, float]]:
    """One placement bundle per member: ``{CPU: c, GPU: g}`` resolved from `auto` against the cluster."""
    total_cpus, total_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    n = len(cfg.members)
    asked = [float(m.resources.num_gpus) for m in cfg.members if m.resources.num_gpus != "auto"]
    gpu_share = auto_gpus(n - len(asked), total_gpus - sum(asked))  # what `auto` members share
    bundles = []
    for member in cfg.members:
        gpus = member.resources.num_gpus
        gpus = gpu_share if gpus == "auto" else float(gpus)
        cpus = member.resources.num_cpus
        if cpus == "auto":
            cpus = 1.0 if total_cpus >= n else max(0.01, int(100 * total_cpus / n) / 100)
        bundle = {"CPU": float(cpus)}
        if gpus:
            bundle["GPU"] = gpus
        bundles.append(bundle)
    return bundles


def auto_gpus(members: int, gpus: float) -> float:
    """Each of ``members`` members' GPUs under ``num_gpus: auto``, with ``gpus`` GPUs free for them.
    A whole GPU each when there are enough. Else k = ceil(members / whole GPUs) members share each
    GPU, 1/k each, so that the shares pack onto whole GPUs (equal shares of members / GPUs would
    not: 3 members at 0.67 fit no 2 GPUs). With less than one GPU free (the rest asked for by
    number), an equal share of what is left. Floored to Ray's 1e-4 resource precision; 0 without GPUs."""
    if members == 0 or gpus < 1e-4:
        return 0.0
    whole = int(gpus + 1e-9)
    if whole >= members:
        return 1.0
    share = gpus / members if whole == 0 else 1 / math.ceil(members / whole)
    return math.floor(1e4 * share + 1e-6) / 1e4


def plan_hosts(cfg: RunConfig, cluster: dict[str, float]) -> list[list[str]]:
    """The members each host carries (``placement.members_per_host``). ``auto``: one member per
    host when every member gets a GPU of its own. Members that share GPUs under ``num_gpus: auto``
    go to one host per GPU free for them, carrying its members (they stack), and members that ask
    for GPUs by number keep a host each. Without GPUs: one member per host while there are no more
    members than CPUs, else one host per CPU, the members split evenly among them. Hosts are in
    the order of their first member."""
    names = cfg.member_names
    given = cfg.placement.members_per_host
    per = given if given != "auto" else 1
    if given == "auto":
        bundles = member_resources(cfg, cluster)
        auto = [m.name for m, b in zip(cfg.members, bundles, strict=True) if m.resources.num_gpus == "auto" and 0 < b.get("GPU", 0.0) < 1]
        if auto:
            # A process per member at 1/k of a GPU each is k CUDA contexts (hundreds of MiB each) on
            # one GPU and k small computations taking turns on it; one process per GPU stacks them.
            asked = sum(float(m.resources.num_gpus) for m in cfg.members if m.resources.num_gpus != "auto")
            hosts = max(1, int(cluster.get("GPU", 0.0) - asked + 1e-9))
            per = math.ceil(len(auto) / hosts)
            shared = set(auto)
            position = {name: i for i, name in enumerate(names)}
            planned = [auto[i : i + per] for i in range(0, len(auto), per)] + [[n] for n in names if n not in shared]
            return sorted(planned, key=lambda host: position[host[0]])
        own_gpus = all(b.get("GPU", 0.0) >= 1.0 for b in bundles)
        if not own_gpus and len(names) > cluster.get("CPU", 0.0):
            gpus = int(cluster.get("GPU", 0.0) + 1e-9) if any(b.get("GPU") for b in bundles) else 0
            hosts = max(1, gpus or int(cluster.get("CPU", 0.0) + 1e-9))
            per = math.ceil(len(names) / hosts)
    return [names[i : i + per] for i in range(0, len(names), per)]


def host_resources(cfg: RunConfig, hosts: list[list[str]], cluster: dict[str, float]) -> list[dict[str, float]]:
    """One placement bundle per host: its members' resources (:func:`member_resources`) summed.
    Members under ``num_cpus: auto`` that share hosts share the cluster's CPUs evenly: each host
    gets its members' share of them, not the 0.01 CPU floor each of a thousand would get alone;
    a host of members under ``num_gpus: auto`` gets the GPU share a member would if each such host
    were one member (a whole GPU per host when hosts match the GPUs free for them). Raises
    :class:`PlacementError`, before anything is placed, for a host whose GPU shares Ray cannot
    place or whose GPUs its members cannot use evenly (:func:`poptrain.config.host_gpu_problem`)."""
    from poptrain.config.schema import host_gpu_problem

    members = member_resources(cfg, cluster)
    if all(len(h) == 1 for h in hosts):
        return members
    index = {name: i for i, name in enumerate(cfg.member_names)}
    auto_share = cluster.get("CPU", 0.0) / len(cfg.members)
    all_auto = [all(cfg.member(n).resources.num_gpus == "auto" for n in names) for names in hosts]
    asked = sum(float(m.resources.num_gpus) for m in cfg.members if m.resources.num_gpus != "auto")
    auto_host_gpus = auto_gpus(sum(all_auto), cluster.get("GPU", 0.0) - asked)  # as if those hosts were members
    bundles = []
    for names, automatic in zip(hosts, all_auto, strict=True):
        cpus = sum(auto_share if cfg.member(n).resources.num_cpus == "auto" else members[index[n]]["CPU"] for n in names)
        bundle = {"CPU": max(0.01, math.floor(100 * cpus + 1e-6) / 100)}
        if automatic:
            gpus = auto_host_gpus if any(members[index[n]].get("GPU") for n in names) else 0.0
        else:
            shares = [members[index[n]].get("GPU", 0.0) for n in names]
            reason = host_gpu_problem(shares)
            if reason:
                raise PlacementError(f"the host of members {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} cannot be placed: {reason}.")
            gpus = math.floor(1e4 * sum(shares) + 1e-6) / 1e4
        if gpus:
            bundle["GPU"] = gpus
        bundles.append(bundle)
    return bundles


def placement_strategy(cfg: RunConfig, nodes: int) -> str:
    """``placement.strategy``, with ``auto`` resolved: SPREAD on a cluster of several (``nodes``
    alive) nodes, else PACK."""
    if cfg.placement.strategy != "auto":
        return cfg.placement.strategy
    return "SPREAD" if nodes > 1 else "PACK"


def place_population(cfg: RunConfig, bundles: list[dict[str, float]], strategy: str):
    """A placement group, a bundle per host: the whole population starts, or nothing does (within
    ``placement.timeout_s``)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cluster = ray.cluster_resources()
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    if any(need[k] > cluster.get(k, 0.0) + 1e-9 for k in need):
        raise PlacementError(
            f"the population needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs ({len(cfg.members)} members on {len(bundles)} hosts: {bundles}), "
            f"but the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs. "
            "Lower members' `resources`, or add nodes."
        )
    group = placement_group(bundles, strategy=strategy, name=f"poptrain-{cfg.name}-{os.getpid()}")
    try:
        ray.get(group.ready(), timeout=cfg.placement.timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"the cluster could not place the population within {cfg.placement.timeout_s:g} s: it asks for "
            f"{bundles} with strategy {strategy}, and the cluster has {ray.available_resources()} free."
        ) from None
    return group
