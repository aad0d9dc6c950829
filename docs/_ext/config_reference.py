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
        path = conf_dir / f"{d.config_path}.yaml"
        _, file_comments = parse_comments(path)
        rel = f"conf/{d.config_path}.yaml"
        for key in _file_keys(path):
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
