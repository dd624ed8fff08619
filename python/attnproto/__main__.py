"""``python -m attnproto`` == the ``attnproto`` command."""
from .cli import main

raise SystemExit(main())
