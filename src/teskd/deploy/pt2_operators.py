"""What the graph of a ``.pt2`` may contain: teskd's operator list and the checks every graph must pass.

A graph is code: an ``aten`` operator can map a file (``aten.from_file``, then ``copy_`` writes through to disk),
write one (``aten.save``), seed the global generator, or update a network's buffers in place. So:

* :data:`OPERATORS` is every operator (overload) the graphs of teskd's own exports contain, found by exporting
  each architecture (``tests/test_pt2_hostile.py`` re-derives it and fails when an export needs one more, or the
  list holds one no export uses). Only a graph made of these is run on a file teskd did not just write itself;
  with each operator come the constant arguments it must have (``batch_norm`` with ``training=True`` would update
  the running statistics in place, ``dropout`` with ``train=True`` draws random numbers).
* Every graph, run or not, is refused if it calls an operator that touches files, storages, seeds or printing
  (:data:`REFUSED` and what an operator's schema says: no result, ``str filename``/``Storage``/``Generator``
  arguments, ``out=`` overloads, random draws), writes in place to one of its inputs, weights or buffers (or a view
  of them: the schema's alias annotations are followed through views), passes an argument the schema lacks or
  in another's place, or declares mutated buffers or inputs in its signature. A file with such a graph is hostile
  whether or not teskd would run it.

Reading a name below ``torch.ops.aten`` only looks the operator up; nothing from the file is called here.
"""

from __future__ import annotations

import re

import torch

# operator -> the constant arguments it must be given (as the graph's JSON writes them)
OPERATORS: dict[str, dict[str, dict]] = {
    "aten.adaptive_avg_pool2d.default": {},
    "aten.add.Tensor": {},
    "aten.add_.Tensor": {},  # in place, on the graph's own intermediate values only (see check_graph)
    "aten.batch_norm.default": {"training": {"as_bool": False}},  # training=True updates the running statistics
    "aten.conv2d.default": {},
    "aten.dropout.default": {"train": {"as_bool": False}},  # the identity; train=True draws random numbers
    "aten.dropout_.default": {"train": {"as_bool": False}},
    "aten.flatten.using_ints": {},
    "aten.hardsigmoid.default": {},
    "aten.hardswish_.default": {},
    "aten.hardtanh_.default": {},
    "aten.linear.default": {},
    "aten.max_pool2d.default": {},
    "aten.mul.Tensor": {},
    "aten.relu.default": {},
    "aten.relu_.default": {},
    "aten.sigmoid.default": {},
    "aten.slice.Tensor": {},
    "aten.unsqueeze.default": {},
}
# refused in every graph: files, storages and aliasing, copies into a tensor, printing, seeds, global caches
REFUSED = frozenset({
    "from_file", "save", "_print", "manual_seed", "seed", "set", "set_", "copy_", "_copy_from",
    "_copy_from_and_resize", "as_strided_", "_set_item", "_cufft_set_plan_cache_max_size", "_cufft_clear_plan_cache",
})
# the graph's inputs and outputs: one image batch in, one logits tensor out (no mutations, tokens, objects)
INPUT_KINDS = frozenset({"user_input", "parameter", "buffer"})
OUTPUT_KINDS = frozenset({"user_output"})
NODE_KEYS = frozenset({"target", "inputs", "outputs", "metadata", "name", "is_hop_single_tensor_return"})

_TARGET = re.compile(r"torch\.ops\.(aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SIDE_EFFECT_TYPES = ("Storage", "Generator")
_POSITIONAL = 1  # schema.ArgumentKind.POSITIONAL


class Refused(Exception):
    """The graph is not one teskd writes; the message says why (one clause, no path)."""


def operator_name(target) -> str:
    """``aten.NAME.OVERLOAD`` of a node target, or :class:`Refused` when it is not an aten operator."""
    match = _TARGET.fullmatch(str(target))
    if match is None or "__" in str(target):
        raise Refused(f"operator {str(target)[:80]!r} is not an aten operator")
    return match.group(1)


def graph_operators(program: dict) -> set[str]:
    """The operators (``aten.NAME.OVERLOAD``) of a serialized program's graph."""
    return {operator_name(node.get("target")) for node in program["graph_module"]["graph"]["nodes"]}


def _lookup(name: str) -> torch._ops.OpOverload:
    _, op, overload = name.split(".")
    try:
        return getattr(getattr(torch.ops.aten, op), overload)
    except (AttributeError, RuntimeError):
        raise Refused(f"operator {name} is not one this torch has") from None


def _tensor_names(arg) -> list[str]:
    """The tensor values an argument (or output) refers to, in any of the forms the schema nests them in (a
    ``TensorArgument`` is the one object with a ``name``; symbolic sizes use ``as_name``)."""
    if isinstance(arg, dict):
        if isinstance(arg.get("name"), str):
            return [arg["name"]]
        return [n for item in arg.values() for n in _tensor_names(item)]
    if isinstance(arg, list):
        return [n for item in arg for n in _tensor_names(item)]
    return []


def _check_schema(name: str, op) -> None:
    """Refuse an operator whose schema says it acts outside its tensors."""
    schema = op._schema
    if name.split(".")[1] in REFUSED:
        raise Refused(f"it calls {name}, which reaches files, storages or global state")
    if not schema.returns:
        raise Refused(f"it calls {name}, which has only side effects")
    for argument in schema.arguments:
        if argument.name == "filename" or any(t in str(argument.type) for t in _SIDE_EFFECT_TYPES):
            raise Refused(f"it calls {name}, which takes a {argument.name} ({argument.type})")
        if argument.kwarg_only and argument.alias_info is not None and argument.alias_info.is_write:
            raise Refused(f"it calls {name}, which writes into an out= tensor")
    if torch.Tag.out in op.tags:
        raise Refused(f"it calls {name}, which writes into an out= tensor")
    if torch.Tag.nondeterministic_seeded in op.tags and not OPERATORS.get(name):
        raise Refused(f"it calls {name}, which draws random numbers")


def check_graph(graph_module: dict, listed_only: bool) -> None:
    """Raise :class:`Refused` unless ``graph_module`` (the JSON of a program's graph module) passes the checks in
    the module docstring; ``listed_only``: also every operator must be in :data:`OPERATORS` (a graph to be run)."""
    graph, signature = graph_module["graph"], graph_module["signature"]
    inputs = _check_signature(signature)
    if [_tensor_names(a) for a in graph["inputs"]] != [[n] for n in inputs]:
        raise Refused("its graph inputs differ from its signature")
    if graph.get("custom_obj_values") or graph.get("sym_bool_values") or graph.get("sym_float_values") \
            or graph_module.get("treespec_namedtuple_fields"):
        raise Refused("it holds custom objects or symbolic values teskd does not write")
    aliases_input = set(inputs)  # values that are an input, weight or buffer, or a view of one
    defined = set(inputs)
    for node in graph["nodes"]:
        if not isinstance(node, dict) or not set(node) <= NODE_KEYS:
            raise Refused("a graph node has fields teskd does not write")
        name = operator_name(node.get("target"))
        if listed_only and name not in OPERATORS:
            raise Refused(f"operator {name} is not one teskd's exports contain")
        op = _lookup(name)
        _check_schema(name, op)
        args, kinds = {}, {}
        for item in node["inputs"]:
            if not _NAME.fullmatch(str(item.get("name"))) or item["name"] in args:
                raise Refused(f"a call of {name} has a malformed argument list")
            args[item["name"]], kinds[item["name"]] = item["arg"], item.get("kind")
        _check_arguments(name, op, kinds)
        for arg, required in OPERATORS.get(name, {}).items():
            if args.get(arg) != required:
                raise Refused(f"it calls {name} with {arg}={args.get(arg)}, which teskd's exports never do")
        outputs = [n for out in node["outputs"] for n in _tensor_names(out)]
        if not all(_NAME.fullmatch(n) for n in outputs + [str(node.get("name"))]) or defined & set(outputs) \
                or len(set(outputs)) != len(outputs):
            raise Refused("a graph value has a name that is not an identifier or is defined twice")
        defined.update(outputs)
        viewed = False
        for argument in op._schema.arguments:
            names = set(_tensor_names(args.get(argument.name)))
            info = argument.alias_info
            if info is None or not names & aliases_input:
                continue
            if info.is_write:
                raise Refused(f"it writes in place to its input or weights ({name} on {sorted(names)[0]})")
            viewed = True  # an annotated alias: the result may be a view of an input
        if viewed:
            aliases_input.update(outputs)
    outputs = [n for out in graph["outputs"] for n in _tensor_names(out)]
    results = [spec["user_output"]["arg"] for spec in signature["output_specs"]]
    if outputs != [n for arg in results for n in _tensor_names(arg)]:
        raise Refused("its graph outputs differ from its signature")
    _check_call_graph(graph_module.get("module_call_graph"))


def _check_arguments(name: str, op, kinds: dict) -> None:
    """The call's arguments are the schema's, and none lands in another's place: torch's deserializer appends
    positional arguments in schema order, so one given after an omitted optional one would fill that slot."""
    schema_names = [a.name for a in op._schema.arguments]
    if not set(kinds) <= set(schema_names):
        raise Refused(f"a call of {name} names arguments its schema lacks")
    for i, arg in enumerate(schema_names):
        if kinds.get(arg) == _POSITIONAL and not all(earlier in kinds for earlier in schema_names[:i]):
            raise Refused(f"a call of {name} passes {arg} in the place of an omitted argument")


def _check_signature(signature: dict) -> list[str]:
    """The graph's input names in order; refuse mutations, tokens, objects, more than one image input or result."""
    names, fqns, user_inputs = [], set(), 0
    for spec in signature["input_specs"]:
        kind = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind not in INPUT_KINDS:
            raise Refused(f"its graph takes a {kind or 'malformed'} input, which teskd's exports never do")
        body = spec[kind]
        name = _tensor_names(body["arg"])[0] if kind == "user_input" else str(body["arg"].get("name"))
        fqn = body.get("parameter_name") if kind == "parameter" else body.get("buffer_name")
        if kind == "user_input":
            user_inputs += 1
        elif not (isinstance(fqn, str) and FQN.fullmatch(fqn)) or fqn in fqns:
            raise Refused(f"its graph names a weight {str(fqn)[:80]!r} that is not a module path")
        else:
            fqns.add(fqn)
        if not _NAME.fullmatch(name) or name in names:
            raise Refused("a graph input has a name that is not an identifier")
        names.append(name)
    outputs = signature["output_specs"]
    for spec in outputs:
        kind = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind not in OUTPUT_KINDS:
            raise Refused(f"its signature declares a {kind or 'malformed'} output: the graph would change its "
                          f"buffers or inputs")
    if user_inputs != 1 or len(outputs) != 1:
        raise Refused(f"its graph takes {user_inputs} inputs and returns {len(outputs)} values (teskd's: one each)")
    return names


# torch.export's pytree specs of ``forward(images) -> logits`` (the deserializer looks type names up by these)
_IN_SPEC = ('[1, {"type": "builtins.tuple", "context": "null", "children_spec": [{"type": "builtins.tuple", '
            '"context": "null", "children_spec": [{"type": null, "context": null, "children_spec": []}]}, '
            '{"type": "builtins.dict", "context": "[]", "children_spec": []}]}]')
_OUT_SPEC = '[1, {"type": null, "context": null, "children_spec": []}]'


def _check_call_graph(calls) -> None:
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict) or calls[0].get("fqn") != "":
        raise Refused("its module call graph is not one teskd writes")
    root = calls[0].get("signature") or {}
    if root.get("in_spec") != _IN_SPEC or root.get("out_spec") != _OUT_SPEC or root.get("inputs") \
            or root.get("outputs"):
        raise Refused("its calling convention is not forward(images) -> logits")
    for entry in calls[1:]:
        if not (isinstance(entry, dict) and entry.get("signature") is None and FQN.fullmatch(str(entry.get("fqn")))):
            raise Refused("its module call graph is not one teskd writes")
