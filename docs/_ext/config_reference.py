"""Sphinx extension: the reference of every command's config keys, generated from ``conf/`` at build time.

For each command it composes the root config with Hydra (the same defaults list the command uses), then
reads the comments of every YAML file that contributed (``key: value  # comment`` lines, comment lines just
above a key, and comment lines continuing a key's trailing comment) and writes one table per command: key,
default, the file that sets it, and its comment. A second part lists every option of every config group
(``conf/<group>/<option>.yaml``, experiments included). The page is ``docs/_generated/config.md``, included by
``docs/config.md``; it is rewritten only when its text changes, so it cannot drift from the configs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

COMMANDS = ["simulate", "ingest", "train", "generate", "validate", "infer", "bench"]
# Groups whose options belong to Hydra itself or only hold the commands' --help text.
SKIP_GROUPS = {"hydra"}

_KEY = re.compile(r"""^(?P<indent>\s*)(?P<key>[A-Za-z_][\w\-]*|"[^"]*"|'[^']*')\s*:(?:\s+(?P<rest>.*))?$""")


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, comment) of the text after ``key:``; a ``#`` starts a comment only outside quotes and after space."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[:i].strip(), rest[i + 1 :].strip()
    return rest.strip(), ""


def parse_comments(path: Path) -> tuple[str, dict[str, str]]:
    """The file's leading comment and ``{dotted key: comment}`` for every key outside ``defaults`` and ``hydra``."""
    header: list[str] = []
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] = []  # comment lines waiting for the key below them
    last: tuple[str, int] | None = None  # (path, indent) of the key on the previous line, for continuations
    seen_key = False
    skipping = False  # inside the defaults list or the hydra block
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped:
            pending, last = [], None
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            if not seen_key:
                header.append(text)
            elif last is not None and indent > last[1] and last[0] in comments:
                comments[last[0]] += " " + text
            elif not skipping:
                pending.append(text)
            continue
        seen_key = True
        m = _KEY.match(line)
        if not m:  # a list item or a flow continuation: not a key
            pending, last = [], None
            continue
        key = m["key"].strip("\"'")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if indent == 0:
            skipping = key in ("defaults", "hydra")
        stack.append((indent, key))
        if skipping:
            pending, last = [], None
            continue
        dotted = ".".join(k for _, k in stack)
        _, comment = _split_comment(m["rest"] or "")
        text = " ".join([*pending, comment]).strip()
        if text:
            comments[dotted] = text
        pending, last = [], (dotted, indent)
    return " ".join(header).strip(), comments


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """(dotted key, value, is_section) for every node of a plain container, sections before their keys."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield dotted, None, True
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value, False


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if value == "???":
        return "??? (required)"
    return str(value)


_CODE = re.compile(r"(`[^`]*`)")


def _md_text(text: str) -> str:
    """Comment text for a Markdown table cell: code spans kept, the rest escaped (no HTML, math or emphasis)."""
    parts = _CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.replace("|", "\\|"))
        else:
            out.append(re.sub(r"([\\|<>*$\[\]_])", r"\\\1", part))
    return "".join(out)


def _code(value: str) -> str:
    value = value.replace("|", "\\|")
    return f"``{value}``" if "`" in value else f"`{value}`"


def _table(rows: list[tuple[str, str, str, str]], with_source: bool) -> list[str]:
    head = (
        ["| key | default | set in | meaning |", "|---|---|---|---|"]
        if with_source
        else [
            "| key | value | meaning |",
            "|---|---|---|",
        ]
    )
    lines = list(head)
    for key, default, source, comment in rows:
        cells = [_code(key), default, *([source] if with_source else []), _md_text(comment)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def command_section(name: str, conf_dir: Path) -> list[str]:
    """The Markdown section of one command: its composed defaults with each key's file and comment."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    defaults = GlobalHydra.instance().config_loader().compute_defaults_list(name, [], RunMode.RUN).defaults
    comments: dict[str, str] = {}
    sources: dict[str, str] = {}
    for d in defaults:
        package = d.package or ""
        if d.config_path is None or package == "hydra" or package.startswith("hydra."):
            continue
        if d.config_path.startswith(NODE_ROOT):
            node = d.config_path[len(NODE_ROOT) :]
            rel, keys, file_comments = _node_where(node), _node_keys(node), node_comments(node)
        else:
            path = conf_dir / f"{d.config_path}.yaml"
            _, file_comments = parse_comments(path)
            rel, keys = f"conf/{d.config_path}.yaml", _file_keys(path)
        for key in keys:
            sources[f"{package}.{key}" if package else key] = rel
        for key, text in file_comments.items():
            comments[f"{package}.{key}" if package else key] = text
    cfg = compose(config_name=name, overrides=[])
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    rows = []
    for key, value, section in _flatten(container):
        if section and key not in comments:
            continue
        default = "" if section else _code(_fmt(value))
        rows.append((key, default, _code(sources.get(key, "—")), comments.get(key, "")))
    lines = [f"### `{name}`", "", f"`python -m lensflow.{name} [key=value ...]`, root config `conf/{name}.yaml`.", ""]
    usage = _header_lines(conf_dir / f"{name}.yaml")
    if usage:
        lines += ["```text", *usage, "```", ""]
    lines += _table(rows, with_source=True)
    return lines + [""]


def _header_lines(path: Path) -> list[str]:
    """The leading comment block of a file, line by line (for usage examples, which need their layout)."""
    out = []
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s.startswith("#"):
            break
        text = s[1:]
        if text.strip().startswith("@package"):
            continue
        out.append(text[1:] if text.startswith(" ") else text)
    return out


def _file_keys(path: Path) -> list[str]:
    """Every dotted key a YAML file sets (outside ``defaults``), from the parsed file."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    data.pop("defaults", None)
    data.pop("hydra", None)
    return [k for k, _, _ in _flatten(data)]


def group_section(group: Path, conf_dir: Path) -> list[str]:
    """The Markdown section of one config group: each option's header and its keys, values and comments."""
    from omegaconf import OmegaConf

    name = group.relative_to(conf_dir).as_posix()
    lines = [f"### `{name}`", ""]
    for path in sorted(group.glob("*.yaml")):
        header, comments = parse_comments(path)
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
        data.pop("hydra", None)
        option_defaults = data.pop("defaults", None)
        nodes = [_node_entry(e) for e in option_defaults or []]
        for node, package in filter(None, nodes):  # the Python defaults this option takes, then its own keys
            pre = "" if package == "_here_" else f"{package}."
            values = {f"{pre}{k}": v for k, v in _flatten_values(_node_values(node))}
            data = {**_unflatten(values), **data}
            comments = {**{f"{pre}{k}": v for k, v in node_comments(node).items()}, **comments}
        title = {"bench": f"python -m lensflow.bench {path.stem}", "experiment": f"+experiment={path.stem}"}.get(
            name, f"{name}={path.stem}"
        )
        about = f": {_md_text(header)}" if header else ""
        lines += [f"#### `{title}`", "", f"`conf/{name}/{path.name}`{about}", ""]
        if option_defaults:
            lines += [f"Defaults list: {_code(_fmt(option_defaults))}.", ""]
        rows = []
        for key, value, section in _flatten(data):
            if section and key not in comments:
                continue
            rows.append((key, "" if section else _code(_fmt(value)), "", comments.get(key, "")))
        if rows:
            lines += _table(rows, with_source=False)
        lines.append("")
    return lines


def render(conf_dir: Path) -> str:
    """The whole generated page (Markdown)."""
    from hydra import initialize_config_dir

    lines = [
        "<!-- Generated by docs/_ext/config_reference.py from conf/ at build time; do not edit. -->",
        "",
        "## Commands",
        "",
    ]
    from lensflow.confstore import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for name in COMMANDS:
            lines += command_section(name, conf_dir)
    lines += [
        "## Config groups",
        "",
        "Every option of every group, with the keys it sets relative to where the group is mounted (for example "
        "`model=glow_small` sets `model.*` in `train`; an experiment, `+experiment=NAME`, sets keys at the top "
        "level). Choose an option with `group=option` on the command line.",
        "",
    ]
    groups = sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS and any(p.glob("*.yaml")))
    for group in groups:
        lines += group_section(group, conf_dir)
    return "\n".join(lines).rstrip() + "\n"


def _generate(app: Any) -> None:
    conf_dir = (Path(app.srcdir) / ".." / "conf").resolve()
    out = Path(app.srcdir) / "_generated" / "config.md"
    text = render(conf_dir)
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# -- comments of the defaults that live in Python (lensflow.confstore) ---------------------------------------------

#: Where :func:`lensflow.confstore.register` stores the Python defaults in Hydra's ConfigStore.
NODE_ROOT = "lensflow/"


def _node_entry(entry: Any) -> tuple[str, str] | None:
    """``(node, package)`` of a defaults-list entry ``{/lensflow/<group>@<package>: <name>}``, else ``None``."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    ((key, name),) = entry.items()
    group, _, package = str(key).partition("@")
    group = group.lstrip("/")
    if not group.startswith(NODE_ROOT):
        return None
    return f"{group[len(NODE_ROOT) :]}/{name}", package or group.rsplit("/", 1)[-1]


def _node_values(node: str) -> dict[str, Any]:
    from lensflow.confstore import node as node_values

    return node_values(node)


def _node_keys(node: str) -> list[str]:
    return [k for k, _, _ in _flatten(_node_values(node))]


def _node_where(node: str) -> str:
    from lensflow.confstore import NODES

    module, attr, *key = NODES[node]
    return f"{module}.{attr}" + (f"[{key[0]!r}]" if key else "")


def _flatten_values(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten_values(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _unflatten(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, v in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


#: Subtrees of a node whose keys are a dataclass's fields (documented in its body), not a literal in the node's table.
SUBSOURCES: dict[str, dict[str, str]] = {
    "validate/default": {
        "tolerances": "lensflow.compare.tolerances:Tolerances",
        "memorization": "lensflow.compare.tolerances:MemorizationTolerances",
    },
}


def _line_comments(text: str) -> tuple[dict[int, str], dict[int, str]]:
    """(trailing comments, comment-only lines) of Python source, by 1-based line number."""
    import io
    import tokenize

    trailing: dict[int, str] = {}
    alone: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            body = tok.string.lstrip("#").strip()
            if body.startswith(("fmt:", "noqa", "type:")):
                continue
            (trailing if line in code_lines else alone)[line] = body
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return trailing, alone


def _comment_at(line: int, trailing: dict[int, str], alone: dict[int, str]) -> str:
    """The comment lines just above ``line`` and its trailing comment, joined."""
    above = []
    k = line - 1
    while k in alone:
        above.insert(0, alone[k])
        k -= 1
    return " ".join([*above, trailing.get(line, "")]).strip()


def _dict_comments(node: Any, prefix: str, trailing: dict, alone: dict, out: dict[str, str]) -> None:
    import ast

    for k, v in zip(node.keys, node.values, strict=True):
        if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
            continue
        dotted = prefix + k.value
        text = _comment_at(k.lineno, trailing, alone)
        if text:
            out[dotted] = text
        if isinstance(v, ast.Dict):
            _dict_comments(v, dotted + ".", trailing, alone, out)


def python_comments(module: str, attr: str, key: str | None = None) -> dict[str, str]:
    """``{dotted key: comment}`` of a defaults table in Python: a module-level dict literal ``attr`` (its entry
    ``key`` for a table of presets) or the fields of dataclass ``attr``. A key's comment is the comment lines just
    above it and its trailing comment."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    text = Path(spec.origin).read_text()
    tree = ast.parse(text)
    trailing, alone = _line_comments(text)
    out: dict[str, str] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == attr:
            for f in stmt.body:
                if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name):
                    text_ = _comment_at(f.lineno, trailing, alone)
                    if text_:
                        out[f.target.id] = text_
            return out
        targets = [stmt.target] if isinstance(stmt, ast.AnnAssign) else getattr(stmt, "targets", [])
        target = targets[0] if targets else None
        if isinstance(target, ast.Name) and target.id == attr and isinstance(stmt.value, ast.Dict):
            value = stmt.value
            if key is not None:
                pairs = zip(value.keys, value.values, strict=True)
                value = next(v for k, v in pairs if getattr(k, "value", None) == key)
            _dict_comments(value, "", trailing, alone, out)
            return out
    raise LookupError(f"{module}.{attr}: no dict literal or class of that name")


def node_comments(path: str) -> dict[str, str]:
    """The comments of :data:`lensflow.confstore.NODES` entry ``path``, subtrees from :data:`SUBSOURCES` included."""
    from lensflow.confstore import NODES

    out = python_comments(*NODES[path])
    for sub, where in SUBSOURCES.get(path, {}).items():
        module, attr = where.split(":")
        out.update({f"{sub}.{k}": v for k, v in python_comments(module, attr).items()})
    return out
