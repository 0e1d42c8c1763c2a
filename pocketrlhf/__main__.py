from pocketrlhf.cli import main

raise SystemExit(main())
