"""The command line's one vocabulary: every option that more than one command takes is declared here
once, with one help text, for `jaxbench …` and `jaxbench remote …` alike; so are the exit statuses,
`-v`, and the parser whose errors are one line.

A command is made with `command(subcommands, name, help)` (it accepts `-v` after its name); a group
of commands (`remote`) with `group(…)`, whose subcommands are made with `command` in turn and name
the function that runs them with `set_defaults(run=…)`.
"""

from __future__ import annotations

import argparse

from .fields import DEFAULT_SCREEN_MARGIN, SCREEN_PRODUCTS
from .params import DEFAULT_R_TARGET, PRESETS

EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure; `remote search`: a part given up
EXIT_BAD_INPUT = 2  # an option, a file, a missing setting (VAST_API_KEY), a set the memory cannot hold
EXIT_FRAUD = 3  # `validate` found fraud
EXIT_INTERRUPTED = 130
EXIT_STATUSES = ("exit status: 0 done, 1 unexpected failure (remote search: a part given up), 2 bad input, "
                 "3 validate found fraud, 130 interrupted")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump; a missing or unknown command names --help
        if "COMMAND" in message:
            message += f" (`{self.prog} --help` lists the commands)"
        raise UsageError(message)


def verbose(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress details to stderr")


def command(subcommands, name: str, help: str) -> argparse.ArgumentParser:
    """A command's parser; `-v` is accepted after its name too (absent there, the level above stands)."""
    p = subcommands.add_parser(name, help=help, description=help)
    verbose(p, argparse.SUPPRESS)
    return p


def group(subcommands, name: str, help: str, dest: str):
    """A command made of commands (`jaxbench remote search`): its parser and its subcommands."""
    p = command(subcommands, name, help)
    return p, p.add_subparsers(dest=dest, required=True, parser_class=Parser, metavar="COMMAND")


# The options ---------------------------------------------------------------------------------------


def params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", required=True, metavar="P",
                   help=f"a preset ({', '.join(PRESETS)}), a JSON object of parameter fields, or @file.json")


def seeds(p: argparse.ArgumentParser, block_hash: str | None = None, public_key: str | None = None) -> None:
    """--block-hash and --public-key: required unless given defaults."""
    p.add_argument("--block-hash", required=block_hash is None, default=block_hash, metavar="H",
                   help="the block hash the weights and target come from"
                        + (f" (default {block_hash})" if block_hash else ""))
    p.add_argument("--public-key", required=public_key is None, default=public_key, metavar="K",
                   help="the public key that seeds each nonce's input" + (f" (default {public_key})" if public_key else ""))


def dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float16", help="float16 (default, what validators run), bfloat16, float32")


def search(p: argparse.ArgumentParser, stop_required: bool = False) -> None:
    """What a search covers and finds: --r-target, --start-nonce, --block-height, --max-nonces | --duration."""
    p.add_argument("--r-target", type=float, default=DEFAULT_R_TARGET, metavar="R",
                   help=f"a nonce is valid when its distance is below this (default {DEFAULT_R_TARGET})")
    p.add_argument("--start-nonce", type=int, default=0, metavar="N", help="offset of the nonce sequence (default 0)")
    p.add_argument("--block-height", type=int, default=0, metavar="H", help="echoed in every result line (default 0)")
    stop = p.add_mutually_exclusive_group(required=stop_required)
    stop.add_argument("--max-nonces", type=int, default=None, metavar="N",
                      help="stop after this many nonces (on one node, and in `remote search`: the nonces "
                           "start … start + N − 1)")
    stop.add_argument("--duration", type=float, default=None, metavar="S", help="stop after this many seconds")


def screen(p: argparse.ArgumentParser) -> None:
    """--screen and --screen-margin (jaxbench/screen.py)."""
    p.add_argument("--screen", default=None, choices=SCREEN_PRODUCTS,
                   help="screen every nonce with e4m3 weight products and recompute in the model dtype only those "
                        "below r_target + margin; every reported distance is still the model dtype's, a valid "
                        "nonce the screen misses is lost (default: no screen, the exact search)")
    p.add_argument("--screen-margin", type=float, default=None, metavar="M",
                   help=f"with --screen: how far above r_target a screened distance still makes a candidate "
                        f"(default {DEFAULT_SCREEN_MARGIN})")


def runtime(p: argparse.ArgumentParser) -> None:
    """How this machine computes: dtype, draws, devices, batch, groups, memory, compile cache."""
    dtype(p)
    p.add_argument("--draws", default="auto", choices=("auto", "host", "device"),
                   help="where inputs are drawn: auto = device on GPUs, host elsewhere")
    p.add_argument("--devices", type=int, default=None, metavar="N", help="use the first N local devices (default: all)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="nonces per device per step (default: measured once per configuration on a GPU, 8 on the "
                        "CPU; never more than the work or the memory allows)")
    p.add_argument("--group-size", type=int, default=None, metavar="S",
                   help="devices that share one replica of the weights, each running a share of the layers "
                        "(1, 2, 4 or 8; default: the fewest whose memory holds the parameter set)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory the engine may use on each device, e.g. 24GiB (default: what the device reports)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="XLA compilation cache directory (default $JAXBENCH_CACHE_DIR or ~/.cache/jaxbench/xla; "
                        "'' turns it off)")


def name_options(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records its options' names (`option_names`: dest → `--flag`), so
    that a field error can name the option at fault."""
    parser.set_defaults(option_names={a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings})
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                name_options(subparser)
