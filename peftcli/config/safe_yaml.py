"""Recipe YAML read safely: a size cap, UTF-8 only, and no duplicate keys, deep nesting or alias bombs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from peftcli.errors import RecipeError

MAX_RECIPE_BYTES = 1_000_000
# Guards against hostile YAML: a recipe is a few levels deep and, even with anchors, a few hundred
# values. A "billion laughs" file is a few lines of aliases that expand to billions of values.
MAX_YAML_DEPTH = 20
MAX_ALIAS_VALUES = 10_000


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found. Check the path (relative to {Path.cwd()}).")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: recipe is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short YAML file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (got byte 0x{raw[exc.start]:02x} at byte offset {exc.start}). "
            "Save the recipe as UTF-8."
        ) from None
    try:
        data = safe_yaml(text)
    except Refused as exc:
        raise RecipeError(f"{path}:{_line_of(exc)} {exc.message}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{_line_of(exc)} invalid YAML ({problem}). Fix the syntax there.") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty. Write its keys: task, model, method and data at least.")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping of keys (got {type(data).__name__}). Write `key: value` lines: "
            "task, model, method, data, ..."
        )
    return data


def _line_of(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f" line {mark.line + 1}:" if mark else ""


class Refused(yaml.YAMLError):
    """YAML that parses but that a recipe must not be: duplicate keys, deep nesting, alias bombs."""

    def __init__(self, message: str, mark: Any = None) -> None:
        super().__init__(message)
        self.message, self.problem_mark = message, mark


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader with guards: a repeated key is an error (PyYAML keeps the last one
    silently), nesting is capped, and aliases may not expand past MAX_ALIAS_VALUES values. Aliases
    are shared objects to PyYAML, so a bomb loads instantly; it explodes later, in whatever walks it
    (validation, printing), which is why the expansion is counted before anything is built."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise Refused(
                    f"values nested more than {MAX_YAML_DEPTH} levels deep. A recipe is a few levels deep; "
                    "check the brackets.",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                first = seen.setdefault((key.tag, key.value), key.start_mark)
                if first is not key.start_mark:
                    raise Refused(
                        f"duplicate key {key.value!r} (first on line {first.line + 1}). Keep one of them.",
                        key.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str) -> Any:
    """yaml.safe_load through RecipeLoader, refusing alias expansions past MAX_ALIAS_VALUES."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_alias_values(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_alias_values(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}  # node id -> values in it, aliases expanded
    building: set[int] = set()
    repeated = 0

    def size(node: yaml.Node) -> int:
        nonlocal repeated
        if id(node) in sizes:  # reached again: an alias repeats the whole node
            repeated += sizes[id(node)]
            if repeated > MAX_ALIAS_VALUES:
                raise Refused(
                    f"aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values, refused as a possible YAML "
                    "bomb. Write the values out instead."
                )
            return sizes[id(node)]
        if id(node) in building:
            raise Refused(
                "an alias refers to a value that contains it (a recursive structure). Remove the alias.",
                node.start_mark,
            )
        building.add(id(node))
        children = (
            [c for pair in node.value for c in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        building.discard(id(node))
        return sizes[id(node)]

    size(root)
