"""What both training CLIs (``pretrain.py``, ``finetune.py``) do around their work.

* ``parse_and_validate(parser, argv, checks)``: argparse with ``--config`` YAML defaults, then the
  table-driven checks; any problem exits with code 2 (argparse's usage error) before any work.
* ``cli_errors(parser)``: a context for the run itself: a late configuration error (found once a
  checkpoint or dataset is read) also exits 2; a fault of the run (non-finite loss, unusable
  checkpoint, no readable image, failed write) is logged and exits 1; the process group is
  always torn down.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterable, Iterator, Optional, Sequence

from .checkpoint import CheckpointError, OutputWriteError
from .config import Check, ConfigError, parse_args, validate
from .data import UnreadableDatasetError
from .distributed import destroy_distributed
from .loop import NonFiniteLossError

_logger = logging.getLogger(__name__)

RUN_FAULTS = (NonFiniteLossError, CheckpointError, UnreadableDatasetError, OutputWriteError)


def parse_and_validate(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], checks: Iterable[Check]
) -> argparse.Namespace:
    """Parsed and checked arguments (``--lr`` and ``--blr`` are mutually exclusive)."""
    args = parse_args(parser, argv, exclusive=[("lr", "blr")])
    try:
        validate(args, checks)
    except ConfigError as error:
        parser.error(str(error))
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
