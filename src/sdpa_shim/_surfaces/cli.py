"""Command line: ``sdpa-shim doctor | run -- CMD ... | demo`` (also ``python -m sdpa_shim``).

Parsing and ``run`` live here; ``doctor`` and ``demo`` have their own modules, imported only when
chosen, so ``run`` starts the user's command without paying for torch or transformers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from .._core.settings import ENV_ENABLED, is_false
from .._version import __version__

_RUN_USAGE = "%(prog)s [-h] -- COMMAND [ARGS ...]"


def build_parser(prog: str = "sdpa-shim") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Load and run Hugging Face models that ask for flash_attention_2 when flash-attn "
        "cannot run here, on PyTorch's kernels, with one warning saying what runs instead and why: on "
        "transformers 4.56+ the model keeps transformers' flash path (the config still reads "
        "flash_attention_2) and each attention call runs on PyTorch kernels; before 4.56 the request is "
        "downgraded to sdpa (or eager).",
        epilog=f"Set {ENV_ENABLED}=1 to activate the shim in every Python process, no code change needed.",
    )
    parser.add_argument("--version", action="version", version=f"sdpa_shim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = commands.add_parser(
        "doctor",
        help="explain what flash-attn, SDPA and the shim can do on this machine",
        description="Report versions, CUDA devices, why flash-attn 2/3/4 is or is not usable, which SDPA "
        "backends work, what a flash_attention_2 request becomes now, the shim's environment variables "
        "and whether start-up activation is installed. Exit status 1, with a PROBLEM line, when the shim "
        "cannot do its job here: torch or transformers missing, no model can be built, or its own set-up "
        "broken.",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run = commands.add_parser(
        "run",
        usage=_RUN_USAGE,
        help="run a command with the shim active in it and in every Python process it starts",
        description=f"Run COMMAND with {ENV_ENABLED}=1, so it and all its child processes (torchrun "
        "workers, notebook kernels, ...) start with the shim active. Exit status: COMMAND's.",
    )
    run.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS ...]", help="the command to run, after `--`"
    )
    run.set_defaults(run_parser=run)  # its own usage line for "run needs a command"
    demo = commands.add_parser(
        "demo",
        help="load a tiny random Llama with flash_attention_2 and run a forward pass (offline)",
        description="Build a tiny random LlamaForCausalLM in a temporary directory, load it with "
        'attn_implementation="flash_attention_2", show what the shim decided and run a forward pass.',
    )
    demo.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: cuda when available, else cpu)",
    )
    demo.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="weights dtype (default: bfloat16/float16 on cuda, float32 on cpu)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sdpa-shim`` and ``python -m sdpa_shim``; returns the exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser(_prog_name())
    options = parser.parse_args(arguments)
    if options.command == "doctor":
        from . import doctor as _doctor

        return _doctor.main(as_json=options.json)
    if options.command == "run":
        command = options.argv[1:] if options.argv[:1] == ["--"] else options.argv
        if not command:
            options.run_parser.error("run needs a command, e.g.: run -- python train.py")
        return run(command)
    if options.command == "demo":
        from . import demo as _demo

        return _demo.main(device=options.device, dtype=options.dtype)
    parser.print_help(sys.stderr)
    return 2


def _prog_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m sdpa_shim" if program in ("__main__.py", "", "-c") else "sdpa-shim"


def command_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``run`` gives its command: ``SDPA_SHIM=1``, plus our ``sitecustomize`` on
    ``PYTHONPATH`` when this Python has no start-up file installed (a source checkout, or an install
    that dropped the ``.pth``). That ``sitecustomize`` runs the user's own one after activating."""
    from . import startup as _startup

    env = dict(os.environ if environ is None else environ)
    if shim_switched_off(env):
        return env  # SDPA_SHIM=0 wins: the command runs as it would without ``run``
    env[ENV_ENABLED] = "1"
    if not _startup.startup_installed():
        directory = str(_startup.sitecustomize_directory())
        entries = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
        if directory not in entries:
            env["PYTHONPATH"] = os.pathsep.join([directory, *entries])
    return env


def shim_switched_off(environ: dict[str, str] | None = None) -> bool:
    """True when ``SDPA_SHIM`` is 0/false/off/no: it wins over ``run``, as over ``import sdpa_shim``."""
    env = os.environ if environ is None else environ
    return is_false(ENV_ENABLED, env.get(ENV_ENABLED))


def run(command: list[str]) -> int:
    """Run ``command`` with the shim active in it and its children; return its exit status.

    ``SDPA_SHIM=0`` in the environment wins: the command then runs without the shim, and one line on
    stderr says so.

    On POSIX the process replaces itself with the command (exec), so signals, the process id and the
    exit status are the command's own. Elsewhere the command runs as a child and its status is
    returned.
    """
    if shim_switched_off():
        print(
            f"sdpa-shim run: {ENV_ENABLED}=0 keeps the shim off; running {command[0]} without it",
            file=sys.stderr,
        )
    env = command_environment()
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        print(f"sdpa-shim run: command not found: {command[0]}", file=sys.stderr)
        return 127
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if os.name == "posix":
            os.execve(executable, command, env)
        return _run_child(executable, command, env)
    except OSError as exc:
        print(f"sdpa-shim run: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 126


def _run_child(executable: str, command: list[str], env: dict[str, str]) -> int:
    with subprocess.Popen([executable, *command[1:]], env=env) as child:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the child got the same Ctrl-C; its exit status decides
                continue
