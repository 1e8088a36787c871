"""The vlmguard-edit command line: the group, its error handling, and the commands of
``vlmguard_edit.commands`` (one module per group, one thin function per command)."""

from __future__ import annotations

import logging
import os
import traceback

import click

from vlmguard_edit import __version__
from vlmguard_edit.commands import guard, measure, organisms, publish
from vlmguard_edit.errors import Terminated, VlmguardError, raise_on_termination

INTERRUPTED = "interrupted: nothing was written (temporary files removed)"


class Main(click.Group):
    """Turns library errors into one line on stderr and a non-zero exit (traceback with -v)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise  # click's own control flow (--help, usage errors) is not a failure of ours
        except VlmguardError as exc:
            _fail(ctx, f"error: {exc}", exc.exit_code)
        except Terminated as exc:  # SIGTERM / SIGHUP: the shell's code for the signal
            _fail(ctx, _terminated(exc), 128 + exc.signum)
        except KeyboardInterrupt:
            _fail(ctx, INTERRUPTED, 130)
        except (OSError, ValueError, RuntimeError) as exc:
            interrupt = _interrupt_behind(exc)
            if isinstance(interrupt, Terminated):
                _fail(ctx, _terminated(interrupt), 128 + interrupt.signum)
            elif interrupt is not None:
                _fail(ctx, INTERRUPTED, 130)
            else:
                _fail(ctx, f"error: {type(exc).__name__}: {exc} (run with -v for the traceback)", 1)


def _terminated(exc: Terminated) -> str:
    return INTERRUPTED.replace(":", f" by {exc}:", 1)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / signal an error wraps, if any: Python re-raises one that lands while a
    class is being created (a module imported mid-run) as RuntimeError('Error calling
    __set_name__ ...') from it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("verbose"):
        traceback.print_exc()
    click.echo(message, err=True)
    ctx.exit(code)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log details and show tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (also after the command).")
@click.version_option(__version__, prog_name="vlmguard-edit")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Fold a VLM-Guard safety edit into a vision-language model's weights.

    The result is a standalone checkpoint that loads with plain transformers.
    """
    ctx.ensure_object(dict).update(verbose=verbose, quiet=quiet)
    if not verbose:  # transformers' advisory warnings (e.g. the torchvision fallback) only with -v
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


COMMANDS = (guard.convert, guard.calibrate, guard.direction, guard.validate)
COMMANDS += (publish.inspect, publish.verify, publish.adapter, publish.push)
COMMANDS += (measure.eval_command, organisms.organism, organisms.demo)
for command in COMMANDS:
    main.add_command(command)


def run() -> None:
    """The installed command: SIGTERM and SIGHUP end a run like Ctrl-C (everything cleaned
    up, one line, exit 143 / 129); in-process callers keep their own signal handling."""
    raise_on_termination()
    main()
