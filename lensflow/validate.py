"""``python -m lensflow.validate reference=sims.h5 candidate=mocks.h5 out=reports/NAME [key=value ...]``.

The command (config ``conf/validate.yaml``): :func:`lensflow.validation.validate` behind
:func:`lensflow.cli.command`. Exit code 0 when every statistic and the memorisation check pass, 1 when
one fails, 2 on bad input (one line ``error: ...`` on stderr). The verdict is printed on stdout, warnings on stderr.
"""

from __future__ import annotations

from typing import Any

from lensflow import cli
from lensflow.validation.run import validate, verdict_text

__all__ = ["main", "validate"]


def _exit_code(summary: dict[str, Any]) -> int:
    return 0 if summary["pass"] else 1


main = cli.command("validate", validate, result_code=_exit_code, open_nodes=("select",), render=verdict_text)

if __name__ == "__main__":
    main()
