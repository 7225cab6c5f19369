from __future__ import annotations

from shadowproxy.models import main

raise SystemExit(main())
