"""ci-magic's kernelspec for gateways: kernels started through the project's sandbox launcher.

::

    python -m ci_magic.backends.gateway.kernelspec install            # for all users (sys.prefix)
    python -m ci_magic.backends.gateway.kernelspec install --user     # for this user
    python -m ci_magic.backends.gateway.kernelspec install --prefix /opt/jupyter --name ci-sandbox

Then start the gateway with ``--KernelGatewayApp.default_kernel_name=ci-magic-sandbox`` or set
``CodeInterpreter.gateway_kernel_name = "ci-magic-sandbox"``. The kernel runs
:mod:`ci_magic.backends.gateway.sandbox_kernel` with the interpreter that ran this command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_NAME", "install", "kernel_json", "main"]

DEFAULT_NAME = "ci-magic-sandbox"


def kernel_json(python: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The kernel.json of the sandbox kernelspec (``python``: the interpreter on the gateway host).

    ``env`` is set for every kernel: gateways pass a kernel little of their own environment (Kernel
    Gateway only PATH and ``KERNEL_*`` variables), so settings such as CI_MAGIC_GATEWAY_DATA_ROOT or
    CI_MAGIC_ISOLATION belong here.
    """
    return {
        "argv": [python or sys.executable, "-m", "ci_magic.backends.gateway.sandbox_kernel", "-f",
                 "{connection_file}"],
        "display_name": "Python 3 (ci-magic sandbox)",
        "language": "python",
        # SIGINT reaches the relay process, which interrupts the kernel through the launcher.
        "interrupt_mode": "signal",
        "env": dict(env or {}),
        "metadata": {"ci_magic": {"sandbox": True, "data_folder": "/mnt/data"}},
    }  # fmt: skip


def install(
    *,
    name: str = DEFAULT_NAME,
    user: bool = False,
    prefix: str | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Install the kernelspec with jupyter_client; returns the folder it was installed into."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as source:
        (Path(source) / "kernel.json").write_text(json.dumps(kernel_json(python, env), indent=1))
        return KernelSpecManager().install_kernel_spec(source, name, user=user, prefix=prefix)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ci_magic.backends.gateway.kernelspec",
        description="Install the kernelspec that runs gateway kernels inside ci-magic's sandbox.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("install", help="install the kernelspec")
    setup.add_argument("--name", default=DEFAULT_NAME, help=f"kernelspec name (default {DEFAULT_NAME})")
    where = setup.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels (e.g. a venv)")
    setup.add_argument("--python", help="the gateway host's Python with ci-magic (default: this one)")
    setup.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for every kernel (repeatable), e.g. CI_MAGIC_GATEWAY_DATA_ROOT=/srv/ci",
    )
    commands.add_parser("show", help="print the kernel.json that would be installed")
    args = parser.parse_args(argv)
    if args.command == "show":
        print(json.dumps(kernel_json(), indent=1))
        return 0
    env = {}
    for pair in args.env:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            parser.error(f"--env needs NAME=VALUE, not {pair!r}")
        env[name] = value
    folder = install(name=args.name, user=args.user, prefix=args.prefix, python=args.python, env=env)
    print(f"Installed the kernelspec {args.name!r} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
