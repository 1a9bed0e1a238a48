"""The config reference, generated from the schema's own field descriptions (``poptrain schema``).

The documentation's config reference page (``docs/config-reference.md``) is this output between its
markers; a test keeps the two in sync.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Set as AbstractSet
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from poptrain.config import schema


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")
    args = [a for a in typing.get_args(annotation)]
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if getattr(origin, "__name__", "") == "SerializeAsAny" or origin is typing.Annotated:
        return _type_name(args[0])
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.get_default(call_default_factory=True)
        return f"`{value}`" if not isinstance(value, BaseModel) else "(see below)"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{info.default}`"


def _table(model: type[BaseModel], prefix: str, skip: AbstractSet[str] = frozenset()) -> list[str]:
    rows = [f"| `{prefix}` key | type | default | meaning |", "| --- | --- | --- | --- |"]
    # What a CodeRef adds (``digest``) after the fields a reader looks for first.
    for name, info in sorted(model.model_fields.items(), key=lambda item: item[0] in schema.CodeRef.model_fields):
        if name in skip:
            continue
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {description} |")
    return rows


def sections() -> list[tuple[str, type[BaseModel], set[str]]]:
    """(title, model, fields documented elsewhere) for every part of the schema, in reading order."""
    from poptrain.config.registry import BUILTIN_COUPLINGS, resolve_coupling
    from poptrain.couplings.function import FunctionCouplingConfig, Read

    out: list[tuple[str, type[BaseModel], set[str]]] = [
        ("top level", schema.RunConfig, set()),
        ("exchange", schema.ExchangeConfig, set()),
        ("tracking", schema.TrackingConfig, set()),
        ("placement", schema.PlacementConfig, set()),
        ("checkpoint", schema.CheckpointConfig, set()),
        ("failure", schema.FailureConfig, set()),
        ("evaluation", schema.EvaluationConfig, set()),
        ("evaluation.metrics[]", schema.MetricConfig, set()),
        ("pbt", schema.PBTConfig, set()),
        ("pbt.hyperparameters.<key>", schema.Perturbation, set()),
        ("members[]", schema.MemberConfig, set()),
        ("members[].vary.<key> (a draw)", schema.Draw, set()),
        ("members[].model / loss / any component", schema.Component, set()),
        ("members[].data", schema.DataConfig, set()),
        ("members[].eval_data", schema.EvalDataConfig, set()),
        ("members[].optimizer", schema.OptimizerConfig, set()),
        ("members[].optimizer.groups[]", schema.ParamGroup, set()),
        ("members[].terms[]", schema.TermConfig, set()),
        ("members[].balancing", schema.BalancingConfig, set()),
        ("members[].grad_transforms[]", schema.GradTransform, set()),
        ("members[].resources", schema.Resources, set()),
        ("couplings[] (every type)", schema.CouplingConfig, set()),
    ]
    common = set(schema.CouplingConfig.model_fields)
    # poptrain's own couplings only: not whatever user modules this process happened to import.
    for name in sorted(BUILTIN_COUPLINGS):
        out.append((f"couplings[] with `type: {name}`", resolve_coupling(name).Config, common))
    out.append(("couplings[] made by `coupling_function`", FunctionCouplingConfig, common))
    out.append(("couplings[].reads.<argument>", Read, set()))
    return out


def config_reference() -> str:
    out = []
    for title, model, skip in sections():
        out.append(f"## {title}\n")
        doc = (model.__doc__ or "").strip().splitlines()
        if doc and not doc[0].startswith("!!!") and model.__doc__ != BaseModel.__doc__:
            out.append(doc[0] + "\n")
        out.extend(_table(model, title.split(" ")[0], skip))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


PAGE = "docs/config-reference.md"  # relative to the repository's root


def page_with_reference(page: str) -> str:
    """``page`` (a Markdown text holding the two reference markers) with the text between them
    replaced by :func:`config_reference`."""
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference()}{END}{tail}"


if __name__ == "__main__":  # python -m poptrain.config_docs [PAGE]  (rewrites the page's reference, from the repository's root)
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else PAGE
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    text = page_with_reference(text)  # computed before the file is opened for writing: a failure leaves it as it was
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
