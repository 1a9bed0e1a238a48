"""Python objects given in place of import paths (the Python API): what each is, and whether it can travel.

``poptrain.run`` takes the object itself wherever a config takes an import path: an ``nn.Module``
class or factory, a dataset or a function returning one, a loss, a metric, a term, an optimizer
class, a coupling class. Such an object reaches Ray's workers inside the run's config, pickled as
Ray pickles everything (cloudpickle): by reference when its module is importable there, by value
when it was defined in a notebook or a script's ``__main__``. The record a run saves names it by
:func:`qualified_name` with its :func:`digest`, so that ``poptrain resume`` can tell whether the
same object is still there.

Nothing here imports Ray or torch until an object is given.
"""

from __future__ import annotations

import hashlib
import inspect
import io
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# Every host and the coordinator receive the config, and a restarted host receives it again: a
# dataset this large belongs in a function that reads it where it is used.
MAX_SHIPPED_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Described:
    """What the record says of a given object, and why it cannot travel (None: it can)."""

    name: str  # ``module:qualname`` of the object (of its class, for an instance)
    digest: str  # ``source:sha256:<hex>`` or ``pickle:sha256:<hex>``
    problem: str | None


# Described objects by id, each kept with its object (so the id stays its own while cached): a
# thousand members naming one class are described once.
_DESCRIBED: OrderedDict[int, tuple[Any, Described]] = OrderedDict()
_CACHE_SIZE = 64


def describe(obj: Any) -> Described:
    """:func:`qualified_name`, :func:`digest` and the reason ``obj`` cannot travel to Ray's workers."""
    cached = _DESCRIBED.get(id(obj))
    if cached is not None and cached[0] is obj:
        return cached[1]
    name = qualified_name(obj)
    pickled, problem = _pickled(obj, name)
    source = _source(obj) if is_code(obj) else None
    if source is not None:
        digest = "source:sha256:" + hashlib.sha256(source.encode()).hexdigest()
    else:
        digest = "pickle:sha256:" + hashlib.sha256(pickled or b"").hexdigest()
    described = Described(name, digest, problem)
    _DESCRIBED[id(obj)] = (obj, described)
    while len(_DESCRIBED) > _CACHE_SIZE:
        _DESCRIBED.popitem(last=False)
    return described


def is_given(value: Any) -> bool:
    """Whether a raw config value is a Python object given in place of a name: not a value YAML can hold."""
    return not isinstance(value, (str, int, float, bool, list, tuple, dict, type(None)))


def is_code(obj: Any) -> bool:
    """A class or a function (its source identifies it), rather than an instance (its pickle does)."""
    return isinstance(obj, type) or inspect.isroutine(obj)


def qualified_name(obj: Any) -> str:
    """``module:qualname`` of a class or function, or of an instance's class."""
    named = obj if is_code(obj) else type(obj)
    return f"{getattr(named, '__module__', None) or 'builtins'}:{getattr(named, '__qualname__', type(named).__name__)}"


def digest(obj: Any) -> str:
    """sha256 of a class's or function's source (of its methods' sources where Python finds no file
    for the class, as in a notebook), else of its pickle (an instance: a dataset, a partial)."""
    return describe(obj).digest


def _source(obj: Any) -> str | None:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        pass
    if not isinstance(obj, type):
        return None
    # A class defined in a notebook cell (or made at run time): Python finds no file for the class,
    # but finds each of its functions through their code.
    parts = [f"class {obj.__qualname__}({', '.join(b.__qualname__ for b in obj.__bases__)})"]
    for key, value in vars(obj).items():
        fn = getattr(value, "__func__", value)  # staticmethod, classmethod
        if inspect.isfunction(fn):
            try:
                parts.append(inspect.getsource(fn))
            except (OSError, TypeError):
                return None
        elif not key.startswith("__") and not isinstance(value, type) and " at 0x" not in repr(value):
            parts.append(f"{key} = {value!r}")
    return "\n".join(parts)


class _CannotTravel(Exception):
    pass


def _pickled(obj: Any, name: str) -> tuple[bytes | None, str | None]:
    """``obj`` pickled as Ray pickles it (cloudpickle), or why it cannot be. Tensors are written as
    their dtype, shape and bytes: torch's own reduction adds a random serialization id, which would
    give the same data a new digest each time."""
    import torch
    from ray import cloudpickle

    class Probe(cloudpickle.CloudPickler):
        def reducer_override(self, value):
            if isinstance(value, torch.Tensor):
                if value.device.type not in ("cpu", "meta"):
                    raise _CannotTravel(
                        f"`{name}` holds a tensor on {value.device}, which a worker could only unpickle onto that very device: keep what "
                        "you pass on the CPU and move it inside the model or function, or create the tensor inside the function"
                    )
                if value.layout == torch.strided:  # else (sparse, ...) torch's own reduction
                    data = None if value.device.type == "meta" else value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                    return _tensor_of, (str(value.dtype), tuple(value.shape), data)
            return super().reducer_override(value)

    buffer = io.BytesIO()
    try:
        Probe(buffer, protocol=cloudpickle.DEFAULT_PROTOCOL).dump(obj)
    except _CannotTravel as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, it is why the object cannot travel
        return None, (
            f"`{name}` cannot be sent to Ray's workers: pickling it (cloudpickle, as Ray does) fails with {type(exc).__name__}: {exc}. "
            "An open file, a lock, a thread, a socket or a generator cannot travel: create it inside the function (which runs in "
            "the worker), or give an import path the workers can import"
        )
    size = buffer.getbuffer().nbytes
    if size > MAX_SHIPPED_BYTES:
        return None, (
            f"`{name}` is {size / 2**20:,.0f} MiB pickled, more than the {MAX_SHIPPED_BYTES // 2**20} MiB a run sends to each of its "
            "workers: load large data in the worker instead: give a function that builds or reads the dataset (from a file every "
            "node can reach), not the dataset itself"
        )
    return buffer.getvalue(), None


def _tensor_of(dtype: str, shape: tuple, data: bytes | None) -> Any:
    """The tensor :func:`_pickled` wrote (so that what it writes is a pickle that loads)."""
    import torch

    kind = getattr(torch, dtype.removeprefix("torch."))
    if data is None:
        return torch.empty(shape, dtype=kind, device="meta")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind).reshape(shape)
