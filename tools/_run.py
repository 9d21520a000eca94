"""What every tool script shares: it runs from a checkout without installing, and `run_tool(main)` runs its
`main(argv)` (bad input: one paragraph and exit status 2, see `mae_vit.config.cli.run_tool`).

A tool starts with `from _run import run_tool`: run as `python tools/x.py` (or `accelerate launch tools/x.py`),
Python has put tools/ first on sys.path, and this module puts the checkout beside it so that `mae_vit` imports.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mae_vit.config.cli import run_tool  # noqa: E402  (needs the line above)

__all__ = ["run_tool"]
