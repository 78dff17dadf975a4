"""Bad input: the exception for a value the user can fix, and how an entrypoint reports it.

Every entrypoint (`src.train`, `src.eval`, `src.data.prepare`) follows Hydra's convention for bad input: one
line `error: <message>` on stderr and exit status 2, the traceback only with HYDRA_FULL_ERROR=1. Any other
exception is a bug and keeps its traceback. A leaf module, so that every config schema can import it.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import NoReturn


class ConfigError(ValueError):
    """A config value, or what it points at (a file, a directory, a device), is unusable; the message names
    the key and says what to do."""


def exit_bad_input(error: BaseException) -> NoReturn:
    """Report `error` as bad input and exit with status 2."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(error)
    else:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, also for OmegaConf's messages
    sys.exit(2)
