"""The one command wrapper: every ``python -m lensflow.X`` goes through :func:`command`.

Only this module calls ``hydra.main`` or ``sys.exit`` or prints ``error:``. Library code raises:

- bad input (``ValueError`` and its subclasses, missing/existing files, config errors) → one
  ``error: ...`` line and exit code 2;
- a run that started and failed (an exception with an ``exit_code`` attribute, or one mapped in
  ``exit_codes``) → one ``error: ...`` line and that code (1 by convention);
- anything else is a bug: the traceback, then ``error: internal error: ...`` and exit 2, so a crash
  never reads as "validation failed" (1).

``LENSFLOW_DEBUG=1`` re-raises instead, with the full traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lensflow._util.log import setup_logging

__all__ = [
    "BAD_INPUT",
    "argv_command",
    "command",
    "compose",
    "config_error",
    "echo",
    "exit_with",
    "one_line",
    "open_node_overrides",
    "precheck",
]

#: Exceptions that mean "the input was bad" (exit 2).
BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    OmegaConfBaseException,
)


def one_line(e: BaseException) -> str:
    """An exception's message folded onto one line."""
    msg = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return msg or type(e).__name__


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def compose(config_name: str, overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """The composed config ``config_name`` of ``lensflow.conf`` with ``overrides``, outside a running command.

    The one place that composes configs from Python (tests, notebooks, library defaults); inside a running
    Hydra app it composes with that app's search path.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lensflow.confstore import register

    register(config_name)
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )
    try:
        with initialize_config_module(config_module="lensflow.conf", version_base="1.3"):
            return hydra_compose(
                config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
            )
    finally:
        GlobalHydra.instance().clear()


def config_error(e: BaseException) -> str:
    """A Hydra composition error as one short line (no search path, no HYDRA_FULL_ERROR hint)."""
    msg = one_line(e).split("Config search path:")[0]
    msg = msg.replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "")
    msg = msg.replace("Available options in", "; available options in")
    return msg.strip()


def precheck(config_name: str, overrides: list[str], open_nodes: Sequence[str] = ()) -> None:
    """Compose the config once before Hydra runs, so typos give one ``error:`` line and exit code 2.

    An override of a key the config lacks is refused, with or without ``+``/``++`` (Hydra would add it, and the
    job would ignore it), naming the nearest valid key; keys under ``open_nodes`` (``cond``, ``select``) are the
    user's to add, and the job checks them.
    """
    if any(a.startswith("-") for a in overrides):
        return  # --help, --cfg, --multirun, ...: leave them to Hydra
    import re

    from hydra.errors import HydraException

    try:
        cfg = compose(config_name, overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        msg = config_error(e)
        m = re.match(r"Could not override '([^']+)'\. To append to your config use \+", msg)
        if m:  # a plain key=value typo: Hydra's hint (+key=value) would add a key nothing reads
            msg = unknown_key_message(m.group(1), _keys_without(config_name, overrides, m.group(1)))
        _error(f"config: {msg}")
        sys.exit(2)
    check_run_dir(cfg)
    groups = _conf_groups()
    added = [(p, k) for p, k in filter(None, map(_override_key, overrides)) if p]
    added = [
        (p, k)
        for p, k in added
        if k.split(".")[0] not in (*open_nodes, *_ALWAYS_OPEN) and k.replace(".", "/") not in groups
    ]
    if not added:
        return
    base = compose(config_name, [a for a in overrides if not (_override_key(a) or ("", ""))[0]])
    keys = config_keys(base)
    for _, key in added:
        if key not in keys:
            _error(f"config: {unknown_key_message(key, keys)}")
            sys.exit(2)


def _keys_without(config_name: str, overrides: list[str], key: str) -> list[str]:
    """The keys of the config composed without the overrides of ``key`` (for a nearest-key hint)."""
    rest = [a for a in overrides if (_override_key(a) or ("", ""))[1] != key]
    try:
        return config_keys(compose(config_name, rest))
    except Exception:  # noqa: BLE001 - another bad override: hint from the defaults
        return config_keys(compose(config_name))


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse (one line, exit 2) a Hydra run folder that cannot be created (``train``'s ``paths.output_dir`` on a
    read-only or missing mount), before Hydra tries and prints a traceback."""
    from omegaconf import OmegaConf

    run_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None, throw_on_resolution_failure=False)
    if not run_dir or run_dir == ".":
        return
    from lensflow._util.lock import check_writable

    try:
        check_writable(str(run_dir), what="hydra.run.dir (paths.output_dir)", folder=True)
    except OSError as e:
        _error(os_error_line(e))
        sys.exit(2)


def open_node_overrides(argv: Sequence[str], open_nodes: Sequence[str]) -> list[str]:
    """``NODE.NAME=v`` → ``++NODE.NAME=v`` for open-ended nodes (``cond``, ``select``), whose keys are added."""
    out = []
    for a in argv:
        if "=" in a and not a.startswith(("+", "~", "-")) and any(a.startswith(f"{n}.") for n in open_nodes):
            a = f"++{a}"
        out.append(a)
    return out


def exit_code_of(e: BaseException, exit_codes: Mapping[type[BaseException], int]) -> int | None:
    """The exit code a run failure maps to (``None`` when ``e`` is not a known failure)."""
    for kind, code in exit_codes.items():
        if isinstance(e, kind):
            return code
    code = getattr(e, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(e, (*BAD_INPUT, OSError)):  # an OS error on an input or output (full disk, read-only folder)
        return 2
    try:  # Lightning refuses bad trainer settings with its own exception type
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # pragma: no cover - lightning is a dependency
        return None
    return 2 if isinstance(e, MisconfigurationException) else None


def report_failure(e: BaseException, codes: Mapping[type[BaseException], int]) -> int:
    """Print a failed run's one ``error:`` line and return its exit code (re-raises interrupts and, with
    ``LENSFLOW_DEBUG``, everything). An unknown exception is a bug: its traceback first, then exit 2."""
    if os.environ.get("LENSFLOW_DEBUG") or isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    code = exit_code_of(e, codes)
    if code is None:
        traceback.print_exc()
        _error(f"internal error: {type(e).__name__}: {one_line(e)}")
        return 2
    _error(os_error_line(e) if isinstance(e, OSError) else one_line(e))
    return code


def os_error_line(e: OSError) -> str:
    """An OS error as one line naming its path: ``<path>: No space left on device``."""
    if e.filename is not None and e.errno:
        two = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{two}: {os.strerror(e.errno)}"
    if e.strerror and e.errno and len(e.args) == 2:
        return one_line(e.strerror)  # OSError(errno, "path: what went wrong") raised by lensflow
    return one_line(e)


def _exit_now_if_hdf5_broken(code: int) -> None:
    """End the process at once when a store write failed inside HDF5: its files cannot be closed, and HDF5's
    clean-up at exit would crash (exit 139) after the error line (see :data:`lensflow.mapstore._BROKEN`)."""
    mapstore = sys.modules.get("lensflow.mapstore")
    if mapstore is not None and mapstore.hdf5_broken():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


#: Keys under these top-level nodes are never "unknown" to :func:`precheck`.
_ALWAYS_OPEN = ("hydra",)


def _conf_groups() -> set[str]:
    """The config groups of ``lensflow.conf`` (folders, as ``a/b``)."""
    import lensflow.conf

    root = os.path.dirname(lensflow.conf.__file__)
    out = set()
    for folder, dirs, _ in os.walk(root):
        for d in dirs:
            if not d.startswith(("_", ".")):
                out.add(os.path.relpath(os.path.join(folder, d), root).replace(os.sep, "/"))
    return out


def group_options(group: str) -> list[str]:
    """The options (``*.yaml`` names) of config group ``group`` of ``lensflow.conf``, sorted."""
    import lensflow.conf

    folder = os.path.join(os.path.dirname(lensflow.conf.__file__), *group.split("/"))
    return sorted(n[: -len(".yaml")] for n in os.listdir(folder) if n.endswith(".yaml"))


def _register_resolvers() -> None:
    """``${lensflow_options:GROUP}``: a group's options, ``a | b | c``, read from its folder (``--help`` texts)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("lensflow_options"):
        OmegaConf.register_new_resolver("lensflow_options", lambda group: " | ".join(group_options(str(group))))


_register_resolvers()


def config_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of ``cfg`` (nodes and leaves; not ``hydra``)."""
    from omegaconf import OmegaConf

    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not OmegaConf.is_dict(node):
            return
        for k in node.keys():
            key = f"{prefix}{k}"
            if key in _ALWAYS_OPEN:
                continue
            out.append(key)
            walk(node._get_node(k), f"{key}.")

    walk(cfg, "")
    return out


def nearest_key(key: str, keys: Sequence[str]) -> str | None:
    """The valid key closest to ``key`` (difflib), or ``None``."""
    import difflib

    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    for pool in (siblings, keys):
        best = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if best:
            return best[0]
    return None


def unknown_key_message(key: str, keys: Sequence[str]) -> str:
    """``unknown key 'n_map' (did you mean 'n_maps'?)``."""
    near = nearest_key(key, keys)
    return f"unknown key {key!r}" + (f" (did you mean {near!r}?)" if near else "")


def _override_key(arg: str) -> tuple[str, str] | None:
    """(``+``/``++``/``""`` prefix, key) of a ``key=value`` override, or ``None`` (deletions, flags)."""
    if "=" not in arg or arg.startswith(("~", "-")):
        return None
    prefix = "++" if arg.startswith("++") else "+" if arg.startswith("+") else ""
    key = arg[len(prefix) :].split("=", 1)[0].strip()
    return prefix, key.split("@", 1)[0]


def command(
    config_name: str,
    fn: Callable[[DictConfig], Any],
    *,
    exit_codes: Mapping[type[BaseException], int] | None = None,
    result_code: Callable[[Any], int] | None = None,
    open_nodes: Sequence[str] = (),
    first_word: str | None = None,
    render: Callable[[Any], str | None] | None = None,
    added_nodes: Sequence[str] = (),
) -> Callable[[], None]:
    """A console ``main()`` running ``fn(cfg)`` under Hydra with config ``config_name``.

    Args:
        config_name: the root config in ``lensflow.conf``.
        fn: the job, a plain function of the composed config.
        exit_codes: run-failure exception types and their exit codes (e.g. ``{TrainingDivergedError: 1}``).
        result_code: exit code from the job's result (``validate``: 0 pass, 1 fail); default 0.
        open_nodes: config nodes whose keys the user adds (``cond``, ``select``), see :func:`open_node_overrides`.
        first_word: a bare first argument ``X`` means ``first_word=X`` (``bench stats``).
        render: the console text of the job's result, printed to stdout (``None`` prints nothing); the
            report's text lives in :mod:`lensflow.report`, the printing here.
        added_nodes: nodes whose added keys (``+trainer.X=v``) the job itself checks (``train``: Lightning's
            ``Trainer`` arguments); any other unknown key is refused by :func:`precheck`.
    """
    codes = dict(exit_codes or {})
    state: dict[str, int] = {}

    def run(cfg: DictConfig) -> None:
        setup_logging()
        try:
            result = fn(cfg)
        except BaseException as e:  # noqa: BLE001 - mapped to one line and an exit code by report_failure
            state["code"] = report_failure(e, codes)
            _exit_now_if_hdf5_broken(state["code"])
            return
        text = render(result) if render is not None else None
        if text:
            print(text, flush=True)
        state["code"] = result_code(result) if result_code is not None else 0

    def main() -> None:
        import hydra

        args = sys.argv[1:]
        if first_word and args and "=" not in args[0] and not args[0].startswith("-"):
            args[0] = f"{first_word}={args[0]}"
        args = open_node_overrides(args, open_nodes)
        sys.argv = [sys.argv[0], *args]
        from lensflow.confstore import register

        register(config_name)
        precheck(config_name, args, (*open_nodes, *added_nodes))
        state.clear()
        entry = hydra.main(config_path="pkg://lensflow.conf", config_name=config_name, version_base="1.3")(run)
        try:
            entry()
        except SystemExit as e:
            if "code" not in state and e.code not in (0, None):
                sys.exit(2)  # Hydra rejected the command line and has said why
            raise
        sys.exit(state.get("code", 0))

    main.__doc__ = f"``python -m lensflow.{config_name} key=value ...``: exit 0 done, 1 run failed, 2 bad input."
    return main


def echo(text: str) -> None:
    """Print a line of a command's console output on stdout (results, progress a user reads)."""
    print(text, flush=True)


def argv_command(
    fn: Callable[[list[str], Callable[[str], None]], int],
    *,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> Callable[[Sequence[str] | None], int]:
    """A ``main(argv=None) -> exit code`` for a command that parses its own argv (not Hydra).

    ``fn(argv, echo)`` runs the command and returns its exit code; bad input and run failures give one
    ``error:`` line and their code as in :func:`command`. The caller exits with :func:`exit_with`.
    """
    codes = dict(exit_codes or {})

    def main(argv: Sequence[str] | None = None) -> int:
        setup_logging()
        try:
            return fn(list(sys.argv[1:] if argv is None else argv), echo)
        except BaseException as e:  # noqa: BLE001 - mapped to one line and an exit code by report_failure
            return report_failure(e, codes)

    return main


def exit_with(main: Callable[[], int]) -> None:
    """Run an argv-style ``main`` (:func:`argv_command`) and exit with its code."""
    sys.exit(main())
