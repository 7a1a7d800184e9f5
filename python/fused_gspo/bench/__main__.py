"""``python -m fused_gspo.bench``: the same as ``fused-gspo-bench``."""

from .cli import main

raise SystemExit(main())
