"""``python -m correctnet.evaluate checkpoint=PATH [key=value ...]``; see :mod:`correctnet.evaluate.cli`."""
from .cli import main

raise SystemExit(main())
