"""Entry-point wrapper shared by the tools: user errors become one readable line, not a traceback."""

import sys
import textwrap
from typing import Any, Callable, List, Optional

from mae_vit.errors import NonFiniteLossError, UserError


def run_tool(main_fn: Callable[[List[str]], Any], argv: Optional[List[str]] = None) -> Any:
    """Call `main_fn(argv)` (argv defaults to sys.argv[1:]) and return its result.

    A `mae_vit.errors.UserError` (bad config, data path, checkpoint) is printed to stderr as one
    paragraph, `error: <message>` wrapped to 100 columns, and the process exits with status 2.
    A `NonFiniteLossError` (training diverged) is printed the same way with exit status 1.
    Ctrl-C exits with status 130 after a short note. Other exceptions are bugs: they propagate with
    their traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main_fn(argv)
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(textwrap.fill(f"error: {message}", width=100, break_on_hyphens=False, break_long_words=False),
              file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:  # a training failure, not a bug: say what happened, exit 1
        print(textwrap.fill(f"error: {e}", width=100, break_on_hyphens=False), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the last saved checkpoint is kept.", file=sys.stderr)
        sys.exit(130)
