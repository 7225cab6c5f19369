from shadowproxy.commands.cli import main

raise SystemExit(main())
