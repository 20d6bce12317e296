"""Reading a recipe's YAML safely: plain data only (yaml.SafeLoader), within limits.

A recipe is a few sections of keys, so krpo refuses what no recipe needs and what a hostile
file uses to hang or crash a reader: a key written twice in one mapping, nesting deeper than
MAX_YAML_DEPTH, and aliases that refer to themselves or expand past MAX_YAML_VALUES values
(an alias bomb). Every recipe krpo reads goes through `load_yaml`, its own saved ones included.
"""

from __future__ import annotations

from typing import Any

import yaml

# A recipe is a few sections of keys: nesting and alias expansion far past what one needs are refused
# before they reach the validator (an alias bomb, 20,000 nested brackets, an alias inside itself).
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 100_000


class RefusedYAML(yaml.composer.ComposerError):
    """YAML that parses, but that a recipe refuses (see RecipeLoader)."""


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also refuses a key written twice in one mapping, nesting deeper than
    MAX_YAML_DEPTH, and aliases that refer to themselves or expand past MAX_YAML_VALUES values."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise RefusedYAML(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
                if first is not key_node.start_mark:
                    raise RefusedYAML(
                        None, None, f"key '{key_node.value}' is written twice (first at line {first.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a document whose aliases refer to themselves, or expand past the size or depth limits.

    Aliases share nodes, so the composed graph stays small while what it stands for (and what the
    validator would walk) grows exponentially: count each node's expanded size and depth once.
    """
    if root is None:
        return
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = [] if isinstance(node, yaml.ScalarNode) else (
            [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else list(node.value)
        )
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_VALUES:
                raise RefusedYAML(
                    None, None, f"more than {MAX_YAML_VALUES:,} values, counting each alias as what it stands for", node.start_mark
                )
            if depth[key] > MAX_YAML_DEPTH:
                raise RefusedYAML(
                    None, None, f"aliases expand to nesting deeper than {MAX_YAML_DEPTH} levels", node.start_mark
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise RefusedYAML(None, None, "an alias refers to the value that contains it", node.start_mark)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children)


def load_yaml(text: str) -> Any:
    """YAML as krpo reads every recipe, its own saved ones included: plain data only (a SafeLoader),
    within RecipeLoader's limits; a refusal is a yaml.YAMLError. RecipeLoader is a yaml.SafeLoader,
    so a tag that would build a Python object (`!!python/object/apply:…`) is an error, never a call."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint as one line: where (line, column) and what."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")
