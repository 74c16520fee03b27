"""What both training CLIs (``pretrain.py``, ``finetune.py``) do around their work.

* ``parse_and_validate(parser, argv, checks, demo_argv)``: argparse with ``--config`` YAML defaults
  (the demo's without ``--data_path``/``--config``), then the table-driven checks; any problem
  exits with code 2 and the error lines alone, before any work.
* ``cli_errors(parser)``: a context for the run itself: a late configuration error (found once a
  checkpoint or dataset is read) also exits 2; a fault of the run (non-finite loss or gradients,
  unusable checkpoint, no readable image, failed write, another rank's failure) is logged and
  exits 1; the process group is always torn down.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterable, Iterator, Optional, Sequence

from .checkpoint import CheckpointError, OutputWriteError
from .config import Check, ConfigError, official_flag_notes, parse_args, validate
from .data import UnreadableDatasetError
from .distributed import PeerFailedError, destroy_distributed
from .progress import NonFiniteGradientsError, NonFiniteLossError

_logger = logging.getLogger(__name__)

RUN_FAULTS = (NonFiniteLossError, NonFiniteGradientsError, CheckpointError, UnreadableDatasetError, OutputWriteError,
              PeerFailedError)


def parse_and_validate(
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    checks: Iterable[Check],
    demo_argv: Optional[Sequence[str]] = None,
) -> argparse.Namespace:
    """Parsed and checked arguments (``--lr`` and ``--blr`` are mutually exclusive; ``argv`` None:
    ``sys.argv``). Besides the flags: ``args.demo`` (the demo settings are the defaults: no
    ``--data_path``, no ``--config``), ``args.set_by_user`` (flags set on the command line or in
    the user's ``--config``) and ``args.notes`` (official flags accepted but ignored, to log)."""
    args = parse_args(parser, argv, exclusive=[("lr", "blr")], demo_argv=demo_argv)
    official_checks = tuple(flag.check() for flag in getattr(parser, "official_flags", ()) if flag.changes_recipe)
    try:
        validate(args, (*checks, *official_checks))
    except ConfigError as error:
        parser.error(str(error))
    args.notes = official_flag_notes(parser, args)
    return args


@contextlib.contextmanager
def cli_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Exit 2 on a configuration error, 1 on a fault of the run; always leave the process group."""
    try:
        yield
    except ConfigError as error:
        parser.error(str(error))
    except RUN_FAULTS as error:
        _logger.error("%s", error)
        sys.exit(1)
    finally:
        destroy_distributed()
